"""Issue 16: the web page shows, per worker, where its weights came from while a load runs.

A load is caught in the act by answering the page's ``/api/status`` with the server's
real status whose ``load_progress`` says a load is under way: the page must list each
worker's bytes from its own copy, from peers and from the server, as text.
"""

from __future__ import annotations

import json

from test_web_page import RENDER_TIMEOUT_MS, Page, browser, expect, page  # noqa: F401 - the fixtures

from localp2p.testing.cluster import Server

#: A worker name with markup in it: it must come out as text.
HOSTILE = "w<b>1</b>"


def test_page_shows_weights_per_worker(local_server: Server, page: Page) -> None:
    status = local_server.status()
    mib = 1 << 20
    status["load_progress"] = {
        **status["load_progress"],
        "active": True,
        "fraction": 0.0,
        "weights": {
            HOSTILE: {"total": 200 * mib, "local": 200 * mib, "peers": 0, "server": 0, "cached": 0, "missing": 0, "done": True},
            "w2": {"total": 100 * mib, "local": 0, "peers": 60 * mib, "server": 10 * mib, "cached": 0, "corrupt": 1, "bad_peers": ["w3"], "done": False},
        },
    }
    page.route("**/api/status", lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(status)))
    page.goto(local_server.base_url + "/")
    rows = page.locator("li.load-weights-worker")
    expect(rows).to_have_count(2, timeout=RENDER_TIMEOUT_MS)
    expect(rows.filter(has_text=HOSTILE)).to_have_text(f"{HOSTILE}: 200.0 MiB own copy of 200.0 MiB")
    second = page.locator('li.load-weights-worker[data-worker="w2"]')
    expect(second).to_contain_text("w2: 60.0 MiB peers, 10.0 MiB server of 100.0 MiB")
    expect(second).to_contain_text("1 bad tensors from w3, fetched again")
    assert page.locator("#load-weights b").count() == 0  # the name is text, not markup
