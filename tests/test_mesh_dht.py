"""Issue 15: a lite client finds servers through the DHT alone (no mDNS): servers provide the
network's rendezvous keys as workers do, and the client looks them up from its bootstrap peer.
Then the server answering a stream is killed mid-stream: the stream ends with an error event.
Needs root; skips with the reason otherwise."""

from __future__ import annotations

import contextlib
import json
import pathlib
from typing import Any

import pytest
from test_mesh_api import MESSAGES, MODEL, Node, chat_text, start_client, start_server, streamed_text, wait_models

from localp2p.testing.cluster import new_token
from localp2p.testing.netns import netns_unavailable_reason, topology

pytestmark = pytest.mark.skipif(netns_unavailable_reason() is not None, reason=f"network namespaces: {netns_unavailable_reason()}")


def test_client_finds_servers_by_dht(tmp_path: pathlib.Path) -> None:
    token = new_token()
    with topology(3) as topo, contextlib.ExitStack() as stack:
        first = start_server(topo, 1, tmp_path, token, "dht-server1", dht=True)
        stack.callback(first.close)
        bootstrap = next(a for a in first.p2p()["node"]["addrs"] if f"/ip4/{topo.hosts[1].ip}/" in a)
        second = start_server(topo, 2, tmp_path, token, "dht-server2", "--p2p-bootstrap", bootstrap, dht=True)
        stack.callback(second.close)
        client = start_client(topo, 0, tmp_path, token, "dht-client", "--p2p-no-mdns", "--p2p-bootstrap", bootstrap)
        stack.callback(client.close)
        wait_models(client, 2)  # both: the second one only through the DHT
        sources = {s["source"] for s in client.p2p()["servers"]}
        assert sources == {"dht"}, sources
        assert chat_text(client.sdk()) == chat_text(first.sdk()) == streamed_text(client.sdk())
        assert [m.id for m in client.sdk().models.list().data] == [MODEL]

        # The server answering a stream dies mid-stream: the stream ends with a clear error
        # event and [DONE] (not continued elsewhere); the next request goes to the other one.
        servers = {p["peer_id"]: node for p, node in zip(_by_name(client, "dht-server1", "dht-server2"), (first, second), strict=True)}
        body = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 2000, "stream": True}
        with client.http.stream("POST", "/v1/chat/completions", json=body) as reply:
            assert reply.status_code == 200
            lines = reply.iter_lines()
            events = [next(line for line in lines if line.startswith("data: ")) for _ in range(3)]
            running = [s["peer_id"] for s in client.p2p()["servers"] if s["requests_in_flight"] == 1]
            assert len(running) == 1, client.p2p()["servers"]
            servers[running[0]].proc.kill()
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", events[-3:]
        error = json.loads(events[-2][len("data: ") :])["error"]
        assert error["code"] == "server_gone" and "mid-stream" in error["message"], error
        survivor = next(node for peer, node in servers.items() if peer != running[0])
        assert chat_text(client.sdk()) == chat_text(survivor.sdk())


def _by_name(client: Node, *names: str) -> list[dict[str, Any]]:
    """The client's entries of the servers called ``names``, in that order."""
    entries = {s["name"]: s for s in client.p2p()["servers"]}
    return [entries[name] for name in names]
