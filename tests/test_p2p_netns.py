"""Issue 3 acceptance with several hosts for real: a server and two workers in separate
network namespaces on one bridge (10.231.k.0/24). Needs root; skips with the reason otherwise.

The test process stays in the root namespace and reaches the server's HTTP API through a
forwarder thread that connects from inside the server's namespace.
"""

from __future__ import annotations

import contextlib
import pathlib
import time
from collections.abc import Iterator

import pytest

from localp2p.testing.cluster import (
    Proc,
    Server,
    netns_prefix,
    netns_server,
    new_token,
    p2p_state,
    p2p_worker,
    wait_for_workers,
    worker_peer_id,
)
from localp2p.testing.netns import Topology, netns_unavailable_reason, topology

pytestmark = pytest.mark.skipif(netns_unavailable_reason() is not None, reason=f"network namespaces: {netns_unavailable_reason()}")

CHAT = {"messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}], "temperature": 0, "max_tokens": 48}


@contextlib.contextmanager
def _server(topo: Topology, log_dir: pathlib.Path, token: str, *flags: str) -> Iterator[Server]:
    with netns_server(topo, 0, log_dir, token, *flags) as server:
        yield server


def _worker(topo: Topology, i: int, log_dir: pathlib.Path, token: str, *flags: str) -> Proc:
    return p2p_worker(log_dir, token, f"ns-w{i}", *flags, prefix=netns_prefix(topo, i))


def _answer(server: Server) -> str:
    reply = server.http.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def _wait_offline(server: Server, peer_id: str, limit: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit + 5:
        workers = {w["peer_id"]: w for w in p2p_state(server)["workers"]}
        if not workers[peer_id]["online"]:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{peer_id} still online after {limit + 5}s")


def _addresses(state: dict[str, object], peer_id: str) -> list[str]:
    return next(w["addrs"] for w in state["workers"] if w["peer_id"] == peer_id)  # type: ignore[index,union-attr]


def test_mdns_across_hosts(tmp_path: pathlib.Path, local_server: Server) -> None:
    token = new_token()
    with topology(3) as topo:
        workers = [_worker(topo, i, tmp_path, token, "--p2p-no-dht") for i in (1, 2)]
        with _server(topo, tmp_path, token, "--p2p-no-dht") as server:
            ids = [worker_peer_id(w) for w in workers]
            state = wait_for_workers(server, ids)
            for i, peer in zip((1, 2), ids, strict=True):
                assert any(f"/ip4/{topo.hosts[i].ip}/" in a for a in _addresses(state, peer)), state
            assert _answer(server) == _answer(local_server)


def test_dht_across_hosts(tmp_path: pathlib.Path, local_server: Server) -> None:
    token = new_token()
    with topology(3) as topo:
        with _server(topo, tmp_path, token, "--p2p-no-mdns") as server:
            bootstrap = next(a for a in p2p_state(server)["node"]["addrs"] if f"/ip4/{topo.hosts[0].ip}/" in a)
            workers = [_worker(topo, i, tmp_path, token, "--p2p-no-mdns", "--p2p-bootstrap", bootstrap) for i in (1, 2)]
            state = wait_for_workers(server, [worker_peer_id(w) for w in workers])
            assert {w["source"] for w in state["workers"]} == {"dht"}
            assert _answer(server) == _answer(local_server)


def test_worker_joins_then_killed_and_link_cut(tmp_path: pathlib.Path, local_server: Server) -> None:
    token = new_token()
    expected = _answer(local_server)
    with topology(3) as topo:
        workers = {1: _worker(topo, 1, tmp_path, token)}
        with _server(topo, tmp_path, token) as server:
            # 0. One worker, one request; then a second worker joins a running server.
            ids = {1: worker_peer_id(workers[1])}
            wait_for_workers(server, [ids[1]])
            assert _answer(server) == expected
            pid = server.proc.pid
            workers[2] = _worker(topo, 2, tmp_path, token)
            ids[2] = worker_peer_id(workers[2])
            state = wait_for_workers(server, list(ids.values()))
            assert all(w["layers"] > 0 for w in state["workers"]), state
            assert _answer(server) == expected
            assert server.proc.popen.poll() is None and server.proc.pid == pid

            # 1. Kill worker 2: dropped within 10 s, the next request runs on worker 1.
            workers[2].kill()
            assert _wait_offline(server, ids[2], 10) < 10
            wait_for_workers(server, [ids[1]])
            assert _answer(server) == expected
            workers[2] = _worker(topo, 2, tmp_path, token)
            wait_for_workers(server, list(ids.values()))

            # 2. Unplug worker 1's cable: dropped within 10 s; plugged back, taken in again.
            topo.link_down(1)
            assert _wait_offline(server, ids[1], 10) < 10
            wait_for_workers(server, [ids[2]])
            assert _answer(server) == expected
            topo.link_up(1)
            wait_for_workers(server, list(ids.values()), timeout=90)
            assert _answer(server) == expected
        for worker in workers.values():
            worker.stop()
