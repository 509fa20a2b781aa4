"""Issue 2 acceptance: bad requests get a 4xx OpenAI-style error and the server keeps serving."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from localp2p.testing.cluster import Server


def _assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "server_error")
    assert "param" in error and "code" in error
    return error  # type: ignore[no-any-return]


CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "content", "status", "param"),
    [
        (CHAT, b"{not json", 400, None),
        (CHAT, b"", 400, None),
        (CHAT, b"[1, 2]", 400, None),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
        ("/v1/embeddings", b'{"input": 42}', 400, "input"),
    ],
    ids=["broken-json", "empty-body", "not-an-object", "wrong-type", "bad-embedding-input"],
)
def test_malformed_bodies(local_server: Server, path: str, content: bytes, status: int, param: str | None) -> None:
    response = local_server.http.post(path, content=content, headers={"content-type": "application/json"})
    error = _assert_openai_error(response, status)
    if param:
        assert error["param"] == param


def test_missing_messages(local_server: Server) -> None:
    error = _assert_openai_error(local_server.http.post(CHAT, json={"temperature": 0}), 400)
    assert error["param"] == "messages" and "messages" in error["message"]
    _assert_openai_error(local_server.http.post(CHAT, json={"messages": []}), 400)


def test_unknown_model(local_server: Server) -> None:
    error = _assert_openai_error(local_server.http.post(CHAT, json={"model": "gpt-17", "messages": MSG}), 404)
    assert error["code"] == "model_not_found" and "gpt-17" in error["message"]
    stream = local_server.http.post(CHAT, json={"model": "gpt-17", "messages": MSG, "stream": True})
    _assert_openai_error(stream, 404)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_negative_max_tokens(local_server: Server, field: str) -> None:
    error = _assert_openai_error(local_server.http.post(CHAT, json={"messages": MSG, field: -5}), 400)
    assert error["param"] == field


def test_out_of_range_values(local_server: Server) -> None:
    for extra, param in [({"temperature": 7}, "temperature"), ({"n": 3}, "n"), ({"top_p": -1}, "top_p")]:
        error = _assert_openai_error(local_server.http.post(CHAT, json={"messages": MSG, **extra}), 400)
        assert error["param"] == param
    error = _assert_openai_error(local_server.http.post(CHAT, json={"messages": MSG, "max_tokens": 100000}), 400)
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_prompt_beyond_context(local_server: Server, stream: bool) -> None:
    huge = "lorem ipsum dolor sit amet " * 40000  # ~1 MB
    assert len(huge) > 1_000_000
    chat = local_server.http.post(CHAT, json={"messages": [{"role": "user", "content": huge}], "stream": stream})
    error = _assert_openai_error(chat, 400)
    assert "context" in error["message"]
    completion = local_server.http.post("/v1/completions", json={"prompt": huge, "stream": stream})
    _assert_openai_error(completion, 400)


def test_oversized_body(local_server: Server) -> None:
    body = b'{"prompt": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    _assert_openai_error(local_server.http.post("/v1/completions", content=body), 413)


def test_unknown_fields_are_refused(local_server: Server) -> None:
    """Issue 19: nothing is silently ignored; an empty logit_bias is a valid no-op."""
    error = _assert_openai_error(local_server.http.post(CHAT, json={"messages": MSG, "max_tokens": 4, "whatever": [1]}), 400)
    assert error["param"] == "whatever" and "unrecognized" in error["message"]
    response = local_server.http.post(CHAT, json={"messages": MSG, "max_tokens": 4, "logit_bias": {}})
    assert response.status_code == 200, response.text


def test_server_still_serves_after_bad_input(local_server: Server) -> None:
    assert local_server.http.get("/healthz").json() == {"status": "ok"}
    response = local_server.chat("What is 2+2?", max_tokens=8)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    assert local_server.proc.popen.poll() is None
    assert "Traceback" not in local_server.proc.stderr()
