"""The nodes web page at ``/``, rendered by headless Chromium against live clusters.

A p2p cluster (server + one worker on loopback) and a static one (server + one
rpc-server): the page must show what ``/api/p2p`` and ``/api/status`` say, with data
from other machines put into the DOM as text, never as markup.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest

from localp2p.testing.cluster import (
    Server,
    new_token,
    p2p_server,
    p2p_state,
    p2p_worker,
    start_server,
    start_worker,
    wait_for_workers,
    worker_peer_id,
)

#: The Chromium the install script puts on the machine (there is no `playwright install`).
CHROMIUM = pathlib.Path("/usr/bin/chromium")
#: Screenshots for people to look at (gitignored).
ARTIFACTS = pathlib.Path(__file__).resolve().parent.parent / "test-artifacts"
#: Milliseconds to wait for the page to show something: it refreshes every 2 s, the machines are slow.
RENDER_TIMEOUT_MS = 30_000
#: A worker name with markup in it: it must come out as text.
HOSTILE_NAME = "w1<img src=x onerror=alert(1)>"

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
if importlib.util.find_spec("playwright") is None:
    pytest.skip("the playwright package is missing (pip install playwright)", allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: errors.append(f"dialog opened: {dialog.message}"))
    yield page
    context.close()
    assert not errors, f"the page raised: {errors}"


def _chat(server: Server) -> dict[str, Any]:
    reply = server.chat("What is 2+2?", max_tokens=8)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def test_static_files_are_served(local_server: Server) -> None:
    index = local_server.http.get("/")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert 'src="/static/app.js"' in index.text
    script = local_server.http.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert local_server.http.get("/static/style.css").headers["content-type"].startswith("text/css")
    for missing in ("/static/nope.js", "/static/..%2fpage.py", "/static/index.html%00"):
        reply = local_server.http.get(missing)
        assert reply.status_code == 404, missing
        assert "error" in reply.json()


def test_p2p_page_shows_network_and_workers(tmp_path: pathlib.Path, page: Page) -> None:
    token = new_token()
    worker = p2p_worker(tmp_path, token, HOSTILE_NAME, "--p2p-no-dht")
    server = p2p_server(tmp_path, token, "--p2p-no-dht")
    try:
        peer_id = worker_peer_id(worker)
        state = wait_for_workers(server, [peer_id])
        _chat(server)

        page.goto(server.base_url + "/")
        card = page.locator(f'.worker[data-peer-id="{peer_id}"]')
        expect(card.locator(".dot.online")).to_be_visible(timeout=RENDER_TIMEOUT_MS)
        expect(card.locator(".peer-id")).to_have_text(peer_id)
        expect(page.locator("#network-id")).to_have_text(state["network_id"])
        assert state["network_id"]
        expect(page.locator("#node-peer-id")).to_have_text(state["node"]["peer_id"])
        expect(page.locator("#mode")).to_have_text("p2p")
        layers = int(card.locator(".layers").inner_text())
        assert layers > 0
        assert layers == p2p_state(server)["workers"][0]["layers"]
        # The worker's ggml devices (issue 20): this CPU build serves the CPU.
        assert card.locator(".devices").inner_text().startswith("CPU (CPU, ")
        assert card.get_attribute("data-state") == "online"
        # Bytes went through the tunnel (the weights), and the page says so in units.
        assert card.locator(".bytes-sent").inner_text().endswith(("KiB", "MiB", "GiB"))
        assert card.locator(".mem-text").inner_text() != "memory unknown"

        # The name came from another machine: shown verbatim as text, no element made from it.
        expect(card.locator(".name")).to_have_text(HOSTILE_NAME)
        assert page.locator("img").count() == 0

        # The backend runs on the worker's tunnel: its device row names the worker.
        device = page.locator("tr.device.used")
        expect(device).to_have_count(1)
        expect(device.locator(".worker-name")).to_have_text(HOSTILE_NAME)
        status = server.status()
        expect(page.locator("#backend-model")).to_have_text(status["model"])
        expect(page.locator("#layers-total")).to_have_text(str(status["layers"]["total"]))
        if "recent_requests" in status:  # being added alongside this page
            expect(page.locator("tr.request").first).to_be_visible(timeout=RENDER_TIMEOUT_MS)
            expect(page.locator("tr.request").first.locator(".endpoint")).to_contain_text("chat")

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)
    finally:
        server.close()
        worker.stop()


def test_static_page_shows_devices(tmp_path: pathlib.Path, page: Page) -> None:
    worker, endpoint = start_worker(tmp_path)
    server = start_server(tmp_path, rpc_servers=[endpoint])
    try:
        assert server.http.get("/api/p2p").status_code == 404
        status = server.status()
        on_worker = next(d["layers"] for d in status["devices"] if d["endpoint"] == endpoint)
        assert on_worker > 0

        page.goto(server.base_url + "/")
        row = page.locator(f'tr.device[data-endpoint="{endpoint}"]')
        expect(row).to_be_visible(timeout=RENDER_TIMEOUT_MS)
        expect(row.locator(".used")).to_have_text("yes")
        expect(row.locator(".layers")).to_have_text(str(on_worker))
        expect(page.locator("body")).to_have_attribute("data-mode", "static")
        expect(page.locator("#mode")).to_have_text("static")
        expect(page.locator("#workers-section")).to_be_hidden()
        expect(page.locator("#backend-state")).to_have_text(status["backend"]["state"])
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-page-static.png"), full_page=True)
    finally:
        server.close()
        worker.stop()


def test_page_asks_for_the_api_key(tmp_path: pathlib.Path, page: Page) -> None:
    key = "page-test-key"
    server = start_server(tmp_path, env={"API_KEY": key}, name="keyed-server")
    try:
        if server.http.get("/api/status").status_code != 401:
            pytest.skip("this server does not take API_KEY yet")
        assert server.http.get("/").status_code == 200  # the page itself loads without a key

        page.goto(server.base_url + "/")
        expect(page.locator("#auth")).to_be_visible(timeout=RENDER_TIMEOUT_MS)
        page.fill("#api-key", "wrong-key")
        page.click("#api-key-save")
        expect(page.locator("#auth-error")).to_contain_text("refused", timeout=RENDER_TIMEOUT_MS)

        page.fill("#api-key", key)
        page.click("#api-key-save")
        expect(page.locator("body")).to_have_attribute("data-loaded", "true", timeout=RENDER_TIMEOUT_MS)
        expect(page.locator("#auth")).to_be_hidden()
        model = server.http.get("/api/status", headers={"Authorization": f"Bearer {key}"}).json()["model"]
        expect(page.locator("#backend-model")).to_have_text(model)

        page.reload()  # the key was kept in localStorage
        expect(page.locator("body")).to_have_attribute("data-loaded", "true", timeout=RENDER_TIMEOUT_MS)
        expect(page.locator("#auth")).to_be_hidden()
    finally:
        server.close()
