"""Issue 19: CORS with LocalAI's names: ``--cors`` / ``CORS`` and ``--cors-allow-origins`` /
``CORS_ALLOW_ORIGINS``; off by default; a preflight is answered before the API-key check."""

from __future__ import annotations

import os
import pathlib
import subprocess
from collections.abc import Iterator

import pytest

from localp2p.testing.cluster import LOCALP2P, Server, start_server

KEY = "cors-key"
ALLOWED = "http://chat.example"
OTHER_ALLOWED = "http://other.example"
CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}


def _preflight(server: Server, origin: str, path: str = "/v1/chat/completions") -> object:
    return server.http.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        },
    )


@pytest.fixture(scope="module")
def cors_server(log_dir: pathlib.Path) -> Iterator[Server]:
    """Flags: two allowed origins, and an API key."""
    server = start_server(log_dir, "--cors", "--cors-allow-origins", f"{ALLOWED},{OTHER_ALLOWED}", "--api-key", KEY, name="cors")
    yield server
    server.close()


@pytest.fixture(scope="module")
def cors_env_server(log_dir: pathlib.Path) -> Iterator[Server]:
    """Environment: CORS=true and no origin list: any origin."""
    server = start_server(log_dir, env={"CORS": "true"}, name="cors-env")
    yield server
    server.close()


def test_preflight_needs_no_key(cors_server: Server) -> None:
    response = _preflight(cors_server, ALLOWED)
    assert response.status_code == 200, response.text  # type: ignore[attr-defined]
    headers = response.headers  # type: ignore[attr-defined]
    assert headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in headers["access-control-allow-methods"]
    allowed_headers = headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers and "x-stainless-os" in allowed_headers
    assert int(headers["access-control-max-age"]) > 0
    assert _preflight(cors_server, OTHER_ALLOWED).headers["access-control-allow-origin"] == OTHER_ALLOWED  # type: ignore[attr-defined]


def test_preflight_from_another_origin_is_refused(cors_server: Server) -> None:
    response = _preflight(cors_server, "http://evil.example")
    assert response.status_code == 400  # type: ignore[attr-defined]
    assert "access-control-allow-origin" not in response.headers  # type: ignore[attr-defined]


def test_answers_carry_the_headers(cors_server: Server) -> None:
    headers = {"Origin": ALLOWED, "Authorization": f"Bearer {KEY}"}
    models = cors_server.http.get("/v1/models", headers=headers)
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == ALLOWED
    assert "x-request-id" in models.headers["access-control-expose-headers"].lower()
    chat = cors_server.http.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers)
    assert chat.status_code == 200 and chat.headers["access-control-allow-origin"] == ALLOWED
    assert "data: [DONE]" in chat.text
    # A refusal must be readable by the page too.
    refused = cors_server.http.get("/v1/models", headers={"Origin": ALLOWED})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ALLOWED
    stranger = cors_server.http.get("/v1/models", headers={"Origin": "http://evil.example", "Authorization": f"Bearer {KEY}"})
    assert "access-control-allow-origin" not in stranger.headers


def test_env_names_and_any_origin(cors_env_server: Server) -> None:
    response = _preflight(cors_env_server, "http://anywhere.example")
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "*"  # type: ignore[attr-defined]
    chat = cors_env_server.http.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://anywhere.example"})
    assert chat.status_code == 200 and chat.headers["access-control-allow-origin"] == "*"


def test_off_by_default(local_server: Server) -> None:
    response = _preflight(local_server, ALLOWED)
    assert response.status_code == 405  # type: ignore[attr-defined]
    assert "access-control-allow-origin" not in response.headers  # type: ignore[attr-defined]
    models = local_server.http.get("/v1/models", headers={"Origin": ALLOWED})
    assert models.status_code == 200 and "access-control-allow-origin" not in models.headers


def test_origins_without_cors_is_a_start_error() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CORS", "CORS_ALLOW_ORIGINS")}
    result = subprocess.run([*LOCALP2P, "run", "--cors-allow-origins", ALLOWED], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["localp2p: error: --cors-allow-origins needs --cors (or CORS=true)"]
