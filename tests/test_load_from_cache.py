"""Issue 5, progress: a load whose weights come from the workers' tensor caches says so.

p2p on loopback: one worker with ``--cache-dir``; a first server loads a model with
cacheable (> 10 MiB) tensors onto it, a second server (a new peer) loads it again.
The tunnels' byte counters tell the two loads apart.
"""

from __future__ import annotations

import pathlib

from test_tensor_cache import CACHE_SHAPE, big_tensor_models  # noqa: F401 - the fixture

from localp2p.testing.cluster import new_token, p2p_server, p2p_worker, wait_for_workers, worker_peer_id

#: Bytes of the tensors llama.cpp caches (ffn gate/up/down, F16) on the worker.
CACHED_BYTES = 3 * CACHE_SHAPE.layers * CACHE_SHAPE.embd * CACHE_SHAPE.ff * 2


def _load(tmp_path: pathlib.Path, token: str, models: pathlib.Path, peer: str, name: str) -> tuple[dict, str]:
    server = p2p_server(tmp_path, token, "--p2p-no-dht", "--min-workers", "1", "--models-path", str(models), name=name)
    try:
        wait_for_workers(server, [peer])
        progress = server.status()["load_progress"]
        assert server.chat("hello", max_tokens=4).status_code == 200
        return progress, server.proc.stderr()
    finally:
        server.close()


def test_cached_load_is_reported(tmp_path: pathlib.Path, big_tensor_models: pathlib.Path) -> None:
    token = new_token()
    worker = p2p_worker(tmp_path, token, "cache-w", "--p2p-no-dht", "--cache-dir", str(tmp_path / "cache"))
    try:
        peer = worker_peer_id(worker)
        first, _first_log = _load(tmp_path, token, big_tensor_models, peer, "first")
        assert first["fraction"] == 1.0 and not first["active"], first
        assert first["network_bytes"] > CACHED_BYTES, first
        assert first["from_cache"] is False, first

        second, second_log = _load(tmp_path, token, big_tensor_models, peer, "second")
        # Only the tensors below llama.cpp's 10 MiB hashing threshold cross again.
        assert second["network_bytes"] < first["network_bytes"] - 0.95 * CACHED_BYTES, (first, second)
        assert second["from_cache"] is True, second
        loaded = [line for line in second_log.splitlines() if "model loaded" in line]
        assert loaded and "from_cache=True" in loaded[-1], loaded
    finally:
        worker.stop()
