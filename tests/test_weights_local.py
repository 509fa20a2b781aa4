"""Issue 16: the pieces under weight distribution, and a static worker loading from its own copy.

The hash is llama.cpp's (FNV-1a 64, checked against a reference implementation); the
index is reused while a file is unchanged and redone when it changes; a tensor whose
bytes do not match never enters the cache; a static worker with ``--models-path``
puts its model's big tensors in its cache before it is ready, so a load sends almost
none of them, and the answer is the same.
"""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest
from test_weights_swarm import CHAT, SHAPE, check_caches

from localp2p.genmodel import write_model
from localp2p.llama.fnv import Hasher, fnv1a_py
from localp2p.llama.model_index import ModelIndex
from localp2p.testing.cluster import LOCALP2P, CountingProxy, start_server, start_worker
from localp2p.worker.tensor_store import TensorMismatch, TensorStore


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    models = tmp_path_factory.mktemp("models")
    write_model(models / "local.gguf", SHAPE)
    (models / "local.yaml").write_text("name: local\ncontext_size: 512\nparameters:\n  model: local.gguf\n")
    return models


def test_fnv_matches_reference(tmp_path: pathlib.Path) -> None:
    hasher = Hasher(tmp_path / "native")
    data = os.urandom(3 << 20) + b"tail"
    (tmp_path / "data").write_bytes(data)
    assert hasher.buffer(b"") == fnv1a_py(b"") == 0xCBF29CE484222325
    assert hasher.buffer(b"a") == 0xAF63DC4C8601EC8C  # the published FNV-1a 64 test vector
    for offset, size in ((0, len(data)), (1, 1000), (12345, (1 << 20) + 7)):
        assert hasher.file_range(tmp_path / "data", offset, size) == fnv1a_py(data[offset : offset + size])
    with pytest.raises(OSError):
        hasher.file_range(tmp_path / "data", len(data) - 10, 20)  # past the end


def test_index_is_reused_until_the_file_changes(tmp_path: pathlib.Path, model_dir: pathlib.Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes((model_dir / "local.gguf").read_bytes())
    index = ModelIndex(tmp_path / "index", Hasher(tmp_path / "native"))
    first = index.entry(path)
    assert index.hash_seconds > 0 and len(first.cacheable()) == 3 * SHAPE.layers + 2  # FFN + embeddings/output
    again = ModelIndex(tmp_path / "index", index.hasher)  # a restarted worker
    assert again.entry(path) == first and again.hash_seconds == 0
    os.utime(path)  # touched: its mtime changed, so it is hashed again
    assert again.entry(path).content_id == first.content_id and again.hash_seconds > 0


def test_bad_bytes_never_enter_the_cache(tmp_path: pathlib.Path) -> None:
    hasher = Hasher(tmp_path / "native")
    store = TensorStore(tmp_path / "cache", hasher, None, 0)
    store.prepare()
    good = os.urandom(4096)
    part = store.begin(fnv1a_py(good), len(good))
    part.write_at(0, good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(TensorMismatch):
        part.commit()
    assert list((tmp_path / "cache").iterdir()) == []  # neither a cache file nor a temporary one
    part = store.begin(fnv1a_py(good), len(good))
    part.write_at(0, good)
    part.commit()
    assert store.has(fnv1a_py(good), len(good))
    assert check_caches([tmp_path / "cache"]) == 1


def test_models_path_must_be_a_directory(tmp_path: pathlib.Path) -> None:
    for argv in (["llama-cpp-rpc", "127.0.0.1", "1"], ["p2p-llama-cpp-rpc", "--token", "x"]):
        done = subprocess.run([*LOCALP2P, "worker", *argv, "--models-path", str(tmp_path / "nope")], capture_output=True, text=True)
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        if argv[0] == "llama-cpp-rpc":
            assert lines == [f"localp2p: error: --models-path: not a directory: {tmp_path / 'nope'}"]


def test_static_worker_loads_from_its_own_copy(tmp_path: pathlib.Path, model_dir: pathlib.Path) -> None:
    reference = start_server(tmp_path, "--models-path", str(model_dir), name="local")
    try:
        expected = reference.http.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"]
    finally:
        reference.close()
    held = tmp_path / "held"
    held.mkdir()
    (held / "local.gguf").write_bytes((model_dir / "local.gguf").read_bytes())
    cache = tmp_path / "cache"
    worker, endpoint = start_worker(tmp_path, None, "--models-path", str(held), "--cache-dir", str(cache), name="static")
    proxy = CountingProxy(endpoint)
    try:
        assert check_caches([cache]) == 3 * SHAPE.layers + 2  # in place before the ready line
        server = start_server(tmp_path, "--models-path", str(model_dir), rpc_servers=[proxy.endpoint], name="server")
        try:
            reply = server.http.post("/v1/chat/completions", json=CHAT)
            assert reply.json()["choices"][0]["message"]["content"] == expected
        finally:
            server.close()
        ffn = 3 * SHAPE.layers * SHAPE.embd * SHAPE.ff * 2
        attention = SHAPE.layers * (2 * SHAPE.embd * SHAPE.embd + 2 * SHAPE.embd * (SHAPE.embd // SHAPE.heads) * SHAPE.kv_heads) * 2
        assert proxy.to_target < attention + 0.05 * ffn, (proxy.to_target, attention, ffn)
    finally:
        proxy.close()
        worker.stop()


def test_the_disk_floor_and_a_tripped_guard_stop_placement(tmp_path: pathlib.Path) -> None:
    """The tensor-cache guard's rules hold for placed tensors: no write below the free-space floor, none once it tripped."""
    from localp2p.worker.tensor_cache import CacheGuard
    from localp2p.worker.tensor_store import NoRoom

    hasher = Hasher(tmp_path / "native")
    data = os.urandom(4096)
    (tmp_path / "src").write_bytes(data)
    stats = os.statvfs(tmp_path)
    free = stats.f_bavail * stats.f_frsize
    full = TensorStore(tmp_path / "full", hasher, None, free + (1 << 30))  # a floor above what is free
    full.prepare()
    with pytest.raises(NoRoom):
        full.place_from_file(fnv1a_py(data), len(data), str(tmp_path / "src"), 0)
    guard = CacheGuard(tmp_path / "guarded", 0)
    guard.tripped = True
    guarded = TensorStore(tmp_path / "guarded", hasher, guard, 0)
    guarded.prepare()
    with pytest.raises(NoRoom):
        guarded.place_from_file(fnv1a_py(data), len(data), str(tmp_path / "src"), 0)
    assert list((tmp_path / "full").iterdir()) == [] and list((tmp_path / "guarded").iterdir()) == []
    guard.tripped = False
    guarded.place_from_file(fnv1a_py(data), len(data), str(tmp_path / "src"), 0)
    assert guarded.has(fnv1a_py(data), len(data))


def test_unfinished_files_of_a_killed_worker_are_removed(tmp_path: pathlib.Path) -> None:
    """A worker killed mid-fetch leaves only a hidden temporary file: never a cache entry, removed at its next start."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".0123456789abcdef.4242a1b2c3.part").write_bytes(b"half a tensor")
    (cache / "0123456789abcdef").write_bytes(b"an rpc-server's file")  # not ours: kept
    (cache / "notes.txt").write_text("the user's")  # not ours: kept
    store = TensorStore(cache, Hasher(tmp_path / "native"), None, 0)
    assert store.prepare() == 1
    assert sorted(p.name for p in cache.iterdir()) == ["0123456789abcdef", "notes.txt"]
