"""Issue 5: API keys (`--api-key`, `API_KEY`) guard /v1/* and /api/*; `--protect-metrics` guards /metrics."""

from __future__ import annotations

import os
import pathlib
import subprocess
from collections.abc import Iterator

import pytest

from localp2p.testing.cluster import LOCALP2P, Server, start_server

KEYS = ("first-key", "second-key")
CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def keyed(log_dir: pathlib.Path) -> Iterator[Server]:
    server = start_server(log_dir, "--api-key", KEYS[0], "--api-key", KEYS[1], name="keyed")
    yield server
    server.close()


def assert_refused(response: object) -> None:
    assert response.status_code == 401, response.text  # type: ignore[attr-defined]
    assert response.headers["www-authenticate"] == "Bearer"  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key" and error["param"] is None
    assert error["message"]


def test_chat_needs_a_right_key(keyed: Server) -> None:
    assert_refused(keyed.http.post("/v1/chat/completions", json=CHAT))
    assert_refused(keyed.http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer wrong-key"}))
    assert_refused(keyed.http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Basic {KEYS[0]}"}))
    assert_refused(keyed.http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEYS[0]}x"}))
    for key in KEYS:
        reply = keyed.http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200, reply.text
    reply = keyed.http.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": KEYS[1]})
    assert reply.status_code == 200, reply.text


def test_every_api_path_is_guarded(keyed: Server) -> None:
    for path in ("/v1/models", "/api/status", "/v1/nonexistent"):
        assert_refused(keyed.http.get(path))
    assert keyed.http.get("/api/status", headers={"Authorization": f"Bearer {KEYS[0]}"}).status_code == 200
    assert keyed.http.get("/v1/models", headers={"x-api-key": KEYS[0]}).json()["data"]


def test_probes_page_and_metrics_stay_open(keyed: Server) -> None:
    assert keyed.http.get("/healthz").status_code == 200
    assert keyed.http.get("/readyz").status_code == 200
    assert keyed.http.get("/").status_code == 200
    assert keyed.http.get("/static/app.js").status_code == 200
    metrics = keyed.http.get("/metrics")
    assert metrics.status_code == 200
    # The refusals above were counted under their route.
    assert 'localp2p_requests_total{endpoint="/v1/chat/completions",status="401"}' in metrics.text


def test_protect_metrics_with_key_from_env(log_dir: pathlib.Path) -> None:
    server = start_server(log_dir, "--protect-metrics", env={"API_KEY": "env-key-1, env-key-2"}, name="protected")
    try:
        assert_refused(server.http.get("/metrics"))
        assert_refused(server.http.get("/metrics", headers={"Authorization": "Bearer first-key"}))
        response = server.http.get("/metrics", headers={"Authorization": "Bearer env-key-2"})
        assert response.status_code == 200 and "localp2p_backend_ready 1.0" in response.text
        assert server.http.get("/api/status", headers={"x-api-key": "env-key-1"}).status_code == 200
        assert_refused(server.http.get("/api/status"))
        assert server.http.get("/healthz").status_code == 200
    finally:
        server.close()


def test_protect_metrics_without_a_key_is_a_usage_error() -> None:
    result = subprocess.run(
        [*LOCALP2P, "run", "--protect-metrics", "--address", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k not in ("API_KEY", "PROTECT_METRICS")},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["localp2p: error: --protect-metrics needs an API key (--api-key or API_KEY)"]
