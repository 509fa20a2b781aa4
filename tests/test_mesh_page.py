"""Issue 15: the web page lists the other API servers and the peers using this server's API.

The page's ``/api/p2p`` is answered with a mesh as a server sees it (names from other
machines, with markup in them): the page must show each server and client as text.
"""

from __future__ import annotations

import json

from test_web_page import RENDER_TIMEOUT_MS, Page, browser, expect, page  # noqa: F401 - the fixtures

from localp2p.testing.cluster import Server

HOSTILE = "s<b>1</b>"
SERVER, CLIENT = "12D3KooWServerPeerIdForThePageTest000000000001", "12D3KooWClientPeerIdForThePageTest000000000002"


def test_page_lists_servers_and_clients(local_server: Server, page: Page) -> None:
    p2p = {
        "node": {"peer_id": "12D3KooWSelf", "addrs": []},
        "network_id": "net",
        "workers": [],
        "backend_rpc_servers": [],
        "servers": [
            {
                "peer_id": SERVER,
                "name": HOSTILE,
                "state": "online",
                "online": True,
                "models": ["m1", "m2"],
                "admitted": 3,
                "tokens_per_second": 41.5,
                "requests_forwarded": 7,
            }
        ],
        "clients": [
            {"peer_id": CLIENT, "role": "client", "name": "laptop", "connected": True, "admitted": False, "requests_served": 5, "requests_in_flight": 1}
        ],
    }
    page.route("**/api/p2p", lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(p2p)))
    page.goto(local_server.base_url + "/")
    server = page.locator(f'tr.mesh-server[data-peer-id="{SERVER}"]')
    expect(server).to_contain_text(HOSTILE, timeout=RENDER_TIMEOUT_MS)
    expect(server).to_contain_text("m1, m2")
    expect(server).to_contain_text("3 queued or running, 41.5 tok/s")
    expect(server).to_contain_text("7 sent there")
    client = page.locator(f'tr.mesh-client[data-peer-id="{CLIENT}"]')
    expect(client).to_contain_text("laptop")
    expect(client).to_contain_text("refused by the firewall")
    expect(client).to_contain_text("5 served")
    expect(page.locator("#mesh-count")).to_have_text("(1 servers online, 1 peers using this API)")
    assert page.locator("#mesh b").count() == 0  # the name is text, not markup
