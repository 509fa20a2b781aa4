"""Issue 16: the worker that holds the model file is killed while the others fetch from it.

Four hosts in network namespaces (loopback without them), as test_weights_swarm.

The load still completes (on the workers left, their missing tensors now from the
server), the answer is byte-identical to the model run locally, and nothing corrupt
stays in any worker's tensor cache.
"""

from __future__ import annotations

import pathlib
import shutil
import time

import httpx
import pytest
from test_weights_swarm import CHAT, check_caches, hosts, server_on, start_worker_on

from localp2p.genmodel import Shape, write_model
from localp2p.testing.cluster import Proc, Server, new_token, start_server, wait_for_workers, worker_peer_id

#: Bigger than test_weights_swarm's: 33 MiB FFN matrices, 200 MB per worker to fetch,
#: so a fetch lasts long enough (seconds) to be caught half-way.
SHAPE = Shape(layers=5, embd=2048, ff=8192, tensor_type="f16")
#: Seconds to wait for the peers' fetches to start (the server indexes the file first).
FETCH_START_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    models = tmp_path_factory.mktemp("models")
    write_model(models / "big.gguf", SHAPE)
    (models / "big.yaml").write_text("name: big\ncontext_size: 512\nparameters:\n  model: big.gguf\n")
    return models


def _answer(server: Server) -> str:
    reply = server.http.post("/v1/chat/completions", json=CHAT, timeout=300)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def _wait_fetching(server: Server) -> dict[str, dict[str, int]]:
    """Poll until a worker without the file has received some tensors from a peer but is not done."""
    deadline = time.monotonic() + FETCH_START_TIMEOUT
    weights: dict[str, dict[str, int]] = {}
    while time.monotonic() < deadline:
        try:
            weights = server.status()["load_progress"]["weights"]
        except (httpx.HTTPError, KeyError):
            weights = {}
        for name in ("k1", "k2"):
            w = weights.get(name, {})
            if w.get("peers", 0) > 0 and not w.get("done"):
                return weights
        time.sleep(0.05)
    raise AssertionError(f"no fetch from a peer caught half-way: {weights}\n{server.proc.stderr()[-3000:]}")


def test_holder_killed_mid_fetch(tmp_path: pathlib.Path, model_dir: pathlib.Path) -> None:
    local = start_server(tmp_path, "--models-path", str(model_dir), name="local")
    try:
        expected = _answer(local)
    finally:
        local.close()
    held = tmp_path / "held"
    held.mkdir()
    shutil.copy2(model_dir / "big.gguf", held / "big.gguf")
    token = new_token()
    caches = [tmp_path / "state-k0" / "tensor-cache", tmp_path / "cache-k1", tmp_path / "cache-k2"]
    workers: list[Proc] = []
    with hosts(3) as topo:
        try:
            workers = [
                start_worker_on(topo, 1, tmp_path, token, "k0", "--models-path", str(held)),
                start_worker_on(topo, 2, tmp_path, token, "k1", "--cache-dir", str(caches[1])),
                start_worker_on(topo, 3, tmp_path, token, "k2", "--cache-dir", str(caches[2])),
            ]
            with server_on(topo, tmp_path, token, "--min-workers", "3", "--models-path", str(model_dir), wait=False) as server:
                caught = _wait_fetching(server)
                workers[0].kill()  # the only worker with the file, half-way through the others' fetches
                wait_for_workers(server, [worker_peer_id(w) for w in workers[1:]], timeout=300)
                assert _answer(server) == expected
                weights = server.status()["load_progress"]["weights"]
                for name in ("k1", "k2"):  # the load that serves: every tensor of theirs was in place before it
                    assert weights[name]["done"] and weights[name]["missing"] == 0 and "error" not in weights[name], weights
                stderr = "".join(w.stderr() for w in workers[1:])
                assert "tensor fetch failed; trying another source" in stderr, (caught, stderr[-3000:])
        finally:
            for w in workers:
                w.stop()
    assert check_caches(caches) > 0
    for cache in caches[1:]:  # the workers still running left no unfinished file behind
        assert not [f for f in cache.iterdir() if f.name.endswith(".part")], sorted(cache.iterdir())
