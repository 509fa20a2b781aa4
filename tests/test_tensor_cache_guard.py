"""The guard on a worker's tensor-cache disk (localp2p/worker/tensor_cache.py), without root: real
workers and servers; the disk's free space is moved against LOCALP2P_CACHE_MIN_FREE_MB by
setting the threshold relative to what is free now (tests/test_p2p_faults.py fills a real
tmpfs, as root)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import time
from collections.abc import Iterator
from unittest import mock

import pytest
from test_tensor_cache import CACHE_SHAPE, big_tensor_models  # noqa: F401 - the fixture

from localp2p.testing.cluster import LOCALP2P, Proc, Server, free_port, rpc_server_child, start_server, start_worker
from localp2p.worker.tensor_cache import CACHE_MIN_FREE_ENV

#: Bytes the first load writes to the cache: ffn gate/up/down of each layer, F16.
CACHED_BYTES = 3 * CACHE_SHAPE.layers * CACHE_SHAPE.embd * CACHE_SHAPE.ff * 2
#: The threshold sits this far below the free space when the worker starts: the load's
#: cache writes stay above it, the filler below goes past it; the rest absorbs other
#: processes writing to the same disk meanwhile.
HEADROOM = CACHED_BYTES + (96 << 20)
#: Written next to the cache to make its disk run low.
FILLER = HEADROOM + (160 << 20)
#: Seconds to wait for a worker's log line.
LOG_WAIT = 60.0


def _free(path: pathlib.Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _wait_stderr(worker: Proc, needle: str, timeout: float = LOG_WAIT) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = worker.stderr()
        if needle in text:
            return text
        assert worker.popen.poll() is None, f"worker exited:\n{text[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {needle!r} in the worker's log:\n{worker.stderr()[-3000:]}")


def _rpc_server_argv(worker: Proc) -> list[str]:
    """Command line of the worker's (current) rpc-server child."""
    return rpc_server_child(worker)[1]


def _answer(server: Server, limit: float = 120.0) -> str:
    """First 200 answer, retrying while the server's backend recovers from a lost rpc-server."""
    deadline = time.monotonic() + limit
    last = ""
    while time.monotonic() < deadline:
        reply = server.chat("Say something about lighthouses.", max_tokens=12)
        if reply.status_code == 200:
            return str(reply.json()["choices"][0]["message"]["content"])
        last = reply.text[:300]
        time.sleep(0.5)
    raise AssertionError(f"no answer within {limit}s: {last}")


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers a test started, closed when it ends (also when it fails)."""
    started: list[Server] = []
    yield started
    for server in started:
        server.close()


def test_bad_threshold_is_one_line_error(tmp_path: pathlib.Path) -> None:
    result = subprocess.run(
        [*LOCALP2P, "worker", "llama-cpp-rpc", "127.0.0.1", str(free_port()), "--cache-dir", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, CACHE_MIN_FREE_ENV: "lots"},
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("localp2p: error: ") and CACHE_MIN_FREE_ENV in lines[-1], result.stderr


def test_low_disk_starts_the_rpc_server_without_the_cache(
    tmp_path: pathlib.Path, big_tensor_models: pathlib.Path, servers: list[Server]
) -> None:
    cache = tmp_path / "rpc-cache"
    with mock.patch.dict(os.environ, {CACHE_MIN_FREE_ENV: str(2**40)}):  # 1 EiB: no disk has that
        worker, endpoint = start_worker(tmp_path, None, "--cache-dir", str(cache), name="low-disk-worker")
    try:
        log = worker.stderr()
        warnings = [line for line in log.splitlines() if "tensor cache disk nearly full" in line]
        assert len(warnings) == 1 and str(cache) in warnings[0] and "free_mib" in warnings[0], log
        assert "--cache-dir" not in _rpc_server_argv(worker)
        assert " cache=off " in f"{worker.ready_line.rstrip()} ", worker.ready_line
        server = start_server(tmp_path, "--models-path", str(big_tensor_models), rpc_servers=[endpoint], name="low-disk-server")
        servers.append(server)
        reply = server.chat("hello", max_tokens=4)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
        assert list(cache.iterdir()) == []  # the load cached nothing: the cache was really off
    finally:
        worker.stop()


def test_cache_disk_running_low_restarts_without_the_cache(
    tmp_path: pathlib.Path, big_tensor_models: pathlib.Path, servers: list[Server]
) -> None:
    cache = tmp_path / "rpc-cache"
    cache.mkdir()
    (cache / "00112233aabbccdd").touch()  # an empty cache file: never valid, removed at start
    (cache / "notes.txt").write_text("not llama.cpp's: left alone")
    threshold_mib = (_free(tmp_path) - HEADROOM) >> 20
    with mock.patch.dict(os.environ, {CACHE_MIN_FREE_ENV: str(threshold_mib)}):
        worker, endpoint = start_worker(tmp_path, None, "--cache-dir", str(cache), name="guard-worker")
    filler = tmp_path / "filler"
    try:
        assert "removed empty tensor cache files" in worker.stderr(), worker.stderr()
        assert sorted(p.name for p in cache.iterdir()) == ["notes.txt"]
        assert "--cache-dir" in _rpc_server_argv(worker)
        assert f" cache={cache} " in f"{worker.ready_line.rstrip()} ", worker.ready_line

        first = start_server(tmp_path, "--models-path", str(big_tensor_models), rpc_servers=[endpoint], name="guard-first")
        servers.append(first)
        answer = _answer(first)
        first.close()
        servers.remove(first)
        cached = {p.name: p.stat().st_size for p in cache.iterdir()}
        assert len(cached) == 1 + 3 * CACHE_SHAPE.layers, cached  # the cache was on
        assert "tensor cache disk ran low" not in worker.stderr()

        with filler.open("wb") as out:  # the disk runs low under the running rpc-server
            chunk = b"\0" * (16 << 20)
            for _ in range(FILLER // len(chunk)):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        log = _wait_stderr(worker, "tensor cache disk ran low")
        filler.unlink()
        _wait_stderr(worker, "rpc-server restarted")
        assert "--cache-dir" not in _rpc_server_argv(worker)
        left = {p.name: p.stat().st_size for p in cache.iterdir()}
        # Only cache files are deleted (the recent ones); what is left is whole.
        assert "notes.txt" in left and all(left[name] == cached[name] for name in left), (cached, left, log[-2000:])

        second = start_server(tmp_path, "--models-path", str(big_tensor_models), rpc_servers=[endpoint], name="guard-second")
        servers.append(second)
        assert _answer(second) == answer
        assert {p.name: p.stat().st_size for p in cache.iterdir()} == left  # the cache stays off
        assert worker.popen.poll() is None
    finally:
        filler.unlink(missing_ok=True)
        worker.stop()
