"""Issue 16: weights reach workers from their own model files, from each other, from the server.

A server and three workers, each in its own network namespace on one bridge (as four
machines on a LAN; on loopback where namespaces are not available: not root), a model
whose FFN matrices are above llama.cpp's 10 MiB hash threshold (the only tensors an
rpc-server cache holds). The fills overlap the load
(the workers' tensor gates hold llama.cpp's requests), so the byte counts also say that
nothing crossed twice. Every variant must answer
byte-identically to the same model run locally (temperature 0); the byte counters of
``/api/status`` ``load_progress`` say where each worker's weights came from.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from localp2p.genmodel import Shape, write_model
from localp2p.llama.fnv import Hasher
from localp2p.llama.model_index import ModelIndex
from localp2p.testing.cluster import (
    Proc,
    Server,
    netns_prefix,
    netns_server,
    new_token,
    p2p_server,
    p2p_worker,
    start_server,
    wait_for_workers,
    worker_peer_id,
)
from localp2p.testing.netns import Topology, netns_unavailable_reason, topology
from localp2p.worker.weight_fetch import SERVER_SHARE

#: F16 1024x5632 FFN matrices (11 MiB, cached); five layers, split 2/2/1 over three equal workers.
SHAPE = Shape(layers=5, embd=1024, ff=5632, tensor_type="f16")
CHAT = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A models dir (YAML + GGUF) for the server; the GGUF is copied into the workers' --models-path dirs."""
    models = tmp_path_factory.mktemp("models")
    write_model(models / "swarm.gguf", SHAPE)
    (models / "swarm.yaml").write_text("name: swarm\ncontext_size: 512\nparameters:\n  model: swarm.gguf\n")
    return models


@pytest.fixture(scope="module")
def local_answer(tmp_path_factory: pytest.TempPathFactory, model_dir: pathlib.Path) -> str:
    server = start_server(tmp_path_factory.mktemp("local"), "--models-path", str(model_dir), name="local")
    try:
        return _answer(server)
    finally:
        server.close()


@pytest.fixture(scope="module")
def cacheable(tmp_path_factory: pytest.TempPathFactory, model_dir: pathlib.Path) -> dict[str, int]:
    """Bytes of the model's block tensors: above the hash threshold (cacheable), and below."""
    index = ModelIndex(tmp_path_factory.mktemp("index"), Hasher(tmp_path_factory.mktemp("native")))
    model = index.entry(model_dir / "swarm.gguf")
    above = sum(t.size for t in model.tensors if t.layer is not None and t.cacheable)
    below = sum(t.size for t in model.tensors if t.layer is not None and not t.cacheable)
    return {"above": above, "below": below}


def _answer(server: Server) -> str:
    reply = server.http.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def _holder_dir(tmp_path: pathlib.Path, model_dir: pathlib.Path, name: str) -> pathlib.Path:
    held = tmp_path / f"held-{name}"
    held.mkdir()
    shutil.copy2(model_dir / "swarm.gguf", held / "swarm.gguf")
    return held


@contextlib.contextmanager
def hosts(workers: int) -> Iterator[Topology | None]:
    """Host 0 for the server and 1..``workers`` for the workers, in namespaces; None (loopback) without them."""
    if netns_unavailable_reason() is not None:
        yield None
        return
    with topology(1 + workers) as topo:
        yield topo


def start_worker_on(topo: Topology | None, i: int, tmp_path: pathlib.Path, token: str, name: str, *flags: str) -> Proc:
    """A p2p worker on host ``i`` of ``topo`` (loopback when None)."""
    return p2p_worker(tmp_path, token, name, "--p2p-no-dht", *flags, prefix=netns_prefix(topo, i) if topo is not None else ())


@contextlib.contextmanager
def server_on(topo: Topology | None, tmp_path: pathlib.Path, token: str, *flags: str, wait: bool = True) -> Iterator[Server]:
    """A p2p server on host 0 of ``topo`` (loopback when None), closed on exit."""
    if topo is not None:
        with netns_server(topo, 0, tmp_path, token, "--p2p-no-dht", *flags, wait=wait) as server:
            yield server
        return
    server = p2p_server(tmp_path, token, "--p2p-no-dht", *flags, wait=wait)
    try:
        yield server
    finally:
        server.close()


def _cluster(tmp_path: pathlib.Path, model_dir: pathlib.Path, worker_flags: dict[str, list[str]]) -> Iterator[tuple[Server, list[Proc]]]:
    token = new_token()
    workers: list[Proc] = []
    with hosts(len(worker_flags)) as topo:
        try:
            for i, (name, flags) in enumerate(worker_flags.items(), start=1):
                workers.append(start_worker_on(topo, i, tmp_path, token, name, *flags))
            with server_on(topo, tmp_path, token, "--min-workers", str(len(workers)), "--models-path", str(model_dir)) as server:
                wait_for_workers(server, [worker_peer_id(w) for w in workers])
                yield server, workers
        finally:
            for w in workers:
                w.stop()


def check_caches(cache_dirs: list[pathlib.Path]) -> int:
    """Every cache file's bytes hash to its name (nothing corrupt entered any cache); returns how many files."""
    hasher = Hasher(cache_dirs[0].parent / "native-check")
    count = 0
    for cache in cache_dirs:
        for f in cache.iterdir() if cache.exists() else []:
            if len(f.name) == 16 and not f.name.startswith("."):
                assert hasher.file_range(f, 0, f.stat().st_size) == int(f.name, 16), f"{f} is corrupt"
                count += 1
    return count


def _weights(server: Server) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    progress = server.status()["load_progress"]
    return progress["weights"], progress


def test_a_today_path(tmp_path: pathlib.Path, model_dir: pathlib.Path, local_answer: str, cacheable: dict[str, int]) -> None:
    """(a) no cache, no local copy: everything crosses the tunnels; no plan runs."""
    for server, _ in _cluster(tmp_path, model_dir, {f"a{i}": [] for i in range(3)}):
        weights, progress = _weights(server)
        assert weights == {}, weights
        assert progress["network_bytes"] > cacheable["above"] + cacheable["below"], progress
        assert _answer(server) == local_answer


def test_b_every_worker_has_the_file(tmp_path: pathlib.Path, model_dir: pathlib.Path, local_answer: str, cacheable: dict[str, int]) -> None:
    """(b) each worker copies its share from its own file: only the small tensors cross the tunnels."""
    flags = {f"b{i}": ["--models-path", str(_holder_dir(tmp_path, model_dir, f"b{i}"))] for i in range(3)}
    for server, _ in _cluster(tmp_path, model_dir, flags):
        weights, progress = _weights(server)
        assert sorted(weights) == ["b0", "b1", "b2"], weights
        for name, w in weights.items():
            assert w["done"] and w["total"] > 0 and w["local"] == w["total"], (name, w)
            assert w["peers"] == 0 and w["server"] == 0, (name, w)
        assert sum(w["total"] for w in weights.values()) == cacheable["above"], weights
        # The block tensors below the threshold (and graph set-up) still cross; the big ones do not.
        assert progress["network_bytes"] < cacheable["below"] + 0.05 * cacheable["above"], progress
        assert _answer(server) == local_answer
        stderr = server.proc.stderr()
        assert stderr.count("worker weights in place") == 3, stderr[-3000:]
    assert check_caches([tmp_path / f"state-b{i}" / "tensor-cache" for i in range(3)]) == len(SHAPE_FFN_FILES)


#: The cached tensors: ffn gate/up/down of each layer.
SHAPE_FFN_FILES = range(3 * SHAPE.layers)


def test_c_one_worker_has_the_file(tmp_path: pathlib.Path, model_dir: pathlib.Path, local_answer: str, cacheable: dict[str, int]) -> None:
    """(c) one worker holds the file; the others fetch from it, the server sending at most its share."""
    flags = {
        "c0": ["--models-path", str(_holder_dir(tmp_path, model_dir, "c0"))],
        "c1": ["--cache-dir", str(tmp_path / "cache-c1")],
        "c2": ["--cache-dir", str(tmp_path / "cache-c2")],
    }
    for server, _ in _cluster(tmp_path, model_dir, flags):
        weights, progress = _weights(server)
        assert weights["c0"]["local"] == weights["c0"]["total"] > 0, weights
        for name in ("c1", "c2"):
            w = weights[name]
            assert w["peers"] + w["server"] == w["total"] > 0 and w["corrupt"] == 0, (name, w)
            assert w["peers"] > 0 and w["server"] <= SERVER_SHARE * w["total"], (name, w)
        # The fetched tensors crossed the network too (before the load; not the holder's local copy).
        fetched = sum(weights[name]["total"] for name in ("c1", "c2"))
        assert fetched <= progress["network_bytes"] < fetched + cacheable["below"] + 0.05 * cacheable["above"], progress
        assert progress["from_cache"] is False, progress
        # The load did not wait for the fetches: llama.cpp was on the workers before they ended
        # (their tensor gates held what was not there yet).
        stderr = server.proc.stderr()
        assert 0 <= stderr.find("rpc-server registered") < stderr.find("workers' weights ready"), stderr[-3000:]
        assert _answer(server) == local_answer
    assert check_caches([tmp_path / "state-c0" / "tensor-cache", tmp_path / "cache-c1", tmp_path / "cache-c2"]) == len(SHAPE_FFN_FILES)


def _corrupt_tensors(path: pathlib.Path, index_dir: pathlib.Path) -> None:
    """Flip one byte in every cacheable tensor of ``path``, keeping its size and mtime (the index still believes it)."""
    model = ModelIndex(index_dir, Hasher(index_dir.parent / "native-corrupt")).entry(path)
    st = path.stat()
    fd = os.open(path, os.O_RDWR)
    try:
        for t in model.cacheable():
            pos = t.offset + t.size // 2
            byte = os.pread(fd, 1, pos)
            os.pwrite(fd, bytes([byte[0] ^ 0xFF]), pos)
    finally:
        os.close(fd)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_corrupt_peer_is_routed_around(tmp_path: pathlib.Path, model_dir: pathlib.Path, local_answer: str) -> None:
    """A worker whose file no longer matches its index serves bad bytes: caught, logged, fetched from the server."""
    held = _holder_dir(tmp_path, model_dir, "x0")
    flags = {
        "x0": ["--models-path", str(held)],
        "x1": ["--cache-dir", str(tmp_path / "cache-x1")],
        "x2": ["--cache-dir", str(tmp_path / "cache-x2")],
    }
    token = new_token()
    workers: list[Proc] = []
    with hosts(3) as topo:
        try:
            workers = [start_worker_on(topo, i, tmp_path, token, name, *f) for i, (name, f) in enumerate(flags.items(), start=1)]
            _corrupt_tensors(held / "swarm.gguf", tmp_path / "corrupt-index")  # after x0 indexed it
            with server_on(topo, tmp_path, token, "--min-workers", "3", "--models-path", str(model_dir)) as server:
                wait_for_workers(server, [worker_peer_id(w) for w in workers])
                weights, _ = _weights(server)
                assert weights["x0"]["local"] == 0 and weights["x0"]["server"] == weights["x0"]["total"], weights
                for name in ("x1", "x2"):
                    w = weights[name]
                    assert w["corrupt"] >= 1 and w["bad_peers"] == ["x0"], (name, w)
                    assert w["server"] == w["total"] and w["peers"] == 0, (name, w)
                assert _answer(server) == local_answer
                assert "fails its hash check" in workers[1].stderr(), workers[1].stderr()[-2000:]
        finally:
            for w in workers:
                w.stop()
    assert check_caches([tmp_path / "state-x0" / "tensor-cache", tmp_path / "cache-x1", tmp_path / "cache-x2"]) == len(SHAPE_FFN_FILES)
