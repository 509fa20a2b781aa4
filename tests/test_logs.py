"""Issue 5: request ids reach the backend's log lines; `--log-format json` makes every stderr line JSON."""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from localp2p.testing.cluster import Server, start_server, stream_text

REQUEST_ID = "test-abc123"
STREAM_ID = "test-stream-456"


@pytest.fixture(scope="module")
def json_server(log_dir: pathlib.Path) -> Iterator[Server]:
    server = start_server(log_dir, env={"LOCALP2P_LOG_FORMAT": "json"}, name="json-server")
    yield server
    server.close()


def json_lines(server: Server) -> list[dict[str, Any]]:
    """Every stderr line of the server and its backend, each parsed as JSON (a failure names the line)."""
    parsed = []
    for line in server.proc.stderr().splitlines():
        if not line.strip():
            continue
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"stderr line is not JSON: {line!r}")
    return parsed


def wait_for(server: Server, predicate: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Log lines once one satisfies ``predicate`` (the backend's lines come a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = json_lines(server)
        if any(predicate(line) for line in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def test_request_id_reaches_the_backend(json_server: Server) -> None:
    reply = json_server.http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 6, "temperature": 0},
        headers={"X-Request-ID": REQUEST_ID},
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-request-id"] == REQUEST_ID

    lines = wait_for(json_server, lambda line: line.get("request_id") == REQUEST_ID and line.get("event") == "http request")
    backend = [line for line in lines if line.get("proc") == "backend" and line.get("request_id") == REQUEST_ID]
    events = [line["event"] for line in backend]
    assert "predict start" in events and "generation done" in events, backend
    done = next(line for line in backend if line["event"] == "generation done")
    assert done["tokens"] == reply.json()["usage"]["completion_tokens"]

    # The server's own line for the HTTP request: method, path, status, duration, the same id.
    http = [line for line in lines if line.get("event") == "http request" and line.get("request_id") == REQUEST_ID]
    assert len(http) == 1, http
    assert "proc" not in http[0]
    assert http[0]["method"] == "POST" and http[0]["path"] == "/v1/chat/completions" and http[0]["status"] == 200
    assert http[0]["duration_ms"] > 0


def test_streamed_request_id_and_a_generated_one(json_server: Server) -> None:
    text, _ = stream_text(
        json_server.stream_events("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0})
    )
    assert text
    with json_server.http.stream(
        "POST",
        "/v1/completions",
        json={"prompt": "Hello", "max_tokens": 5, "temperature": 0, "stream": True},
        headers={"X-Request-ID": STREAM_ID},
    ) as response:
        assert response.headers["x-request-id"] == STREAM_ID
        response.read()

    lines = wait_for(json_server, lambda line: line.get("request_id") == STREAM_ID and line.get("event") == "http request")
    streamed = [line for line in lines if line.get("request_id") == STREAM_ID]
    assert {(line.get("proc"), line["event"]) for line in streamed} >= {
        ("backend", "predict start"),
        ("backend", "generation done"),
        (None, "http request"),
    }
    assert next(line for line in streamed if line["event"] == "predict start")["stream"] is True
    # A request without X-Request-ID gets a fresh id, carried to the backend as well.
    http_ids = {line["request_id"] for line in lines if line.get("event") == "http request" and line.get("path") == "/v1/completions"}
    backend_ids = {line.get("request_id") for line in lines if line.get("proc") == "backend" and line["event"] == "generation done"}
    generated = http_ids - {STREAM_ID}
    assert generated and generated <= backend_ids
    # A client-sent id that does not look like an id is replaced, never logged.
    reply = json_server.http.get("/v1/models", headers={"X-Request-ID": "bad id {with} spaces"})
    assert reply.headers["x-request-id"] != "bad id {with} spaces"


def test_every_stderr_line_is_json(json_server: Server) -> None:
    json_server.http.get("/readyz")
    lines = json_lines(json_server)
    assert any(line.get("proc") == "backend" for line in lines)
    assert any(line.get("event") == "listening" for line in lines)
    assert all("event" in line and "level" in line and "timestamp" in line for line in lines)
