"""Issue 15: a lite client finds servers through the DHT alone (no mDNS): servers provide the
network's rendezvous keys as workers do, and the client looks them up from its bootstrap peer.
Needs root; skips with the reason otherwise."""

from __future__ import annotations

import contextlib
import pathlib

import pytest
from test_mesh_api import MODEL, chat_text, start_client, start_server, streamed_text, wait_models

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
