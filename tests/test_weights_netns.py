"""Issue 16 across hosts: (c) in network namespaces, a server and three workers on one bridge.

One worker holds the model file; the other two fetch their layers from it over the
bridge (worker to worker: they dial each other at the addresses the server learned by
mDNS), and the answer is byte-identical to the model run locally. Needs root; skips
with the reason otherwise.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest
from test_weights_swarm import CHAT, SHAPE, check_caches, local_answer, model_dir  # noqa: F401 - the fixtures

from localp2p.testing.cluster import Proc, netns_prefix, netns_server, new_token, p2p_worker, wait_for_workers, worker_peer_id
from localp2p.testing.netns import netns_unavailable_reason, topology
from localp2p.worker.weight_fetch import SERVER_SHARE

pytestmark = pytest.mark.skipif(netns_unavailable_reason() is not None, reason=f"network namespaces: {netns_unavailable_reason()}")


def test_fetch_from_a_peer_across_hosts(tmp_path: pathlib.Path, model_dir: pathlib.Path, local_answer: str) -> None:
    held = tmp_path / "held"
    held.mkdir()
    shutil.copy2(model_dir / "swarm.gguf", held / "swarm.gguf")
    caches = [tmp_path / "state-ns-w1" / "tensor-cache", tmp_path / "cache-w2", tmp_path / "cache-w3"]
    token = new_token()
    with topology(4) as topo:
        flags = {1: ["--models-path", str(held)], 2: ["--cache-dir", str(caches[1])], 3: ["--cache-dir", str(caches[2])]}
        workers: list[Proc] = []
        try:
            for i, f in flags.items():
                workers.append(p2p_worker(tmp_path, token, f"ns-w{i}", "--p2p-no-dht", *f, prefix=netns_prefix(topo, i)))
            with netns_server(topo, 0, tmp_path, token, "--p2p-no-dht", "--min-workers", "3", "--models-path", str(model_dir)) as server:
                wait_for_workers(server, [worker_peer_id(w) for w in workers])
                weights = server.status()["load_progress"]["weights"]
                assert weights["ns-w1"]["local"] == weights["ns-w1"]["total"] > 0, weights
                for name in ("ns-w2", "ns-w3"):
                    w = weights[name]
                    assert w["peers"] + w["server"] == w["total"] > 0 and w["peers"] > 0, (name, w)
                    assert w["server"] <= SERVER_SHARE * w["total"], (name, w)
                reply = server.http.post("/v1/chat/completions", json=CHAT)
                assert reply.status_code == 200, reply.text
                assert reply.json()["choices"][0]["message"]["content"] == local_answer
        finally:
            for w in workers:
                w.stop()
    assert check_caches(caches) == 3 * SHAPE.layers
