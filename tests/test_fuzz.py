"""Issue 6: hostile input. The HTTP API fuzzed from its own OpenAPI schema, plus hand-made nasties.

A real server (real llama.cpp) is fuzzed with schemathesis: schema-valid and schema-
violating requests for every operation, derandomized and bounded. Nothing may get a
5xx, the server must stay up, and every 4xx must be an OpenAI-shaped error.
The model is served with a tiny context so that fuzzed generations stay cheap:
max_tokens beyond it is refused (400) by the per-model context check.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from localp2p.config import embedded_model_path
from localp2p.testing.cluster import Server, start_server

#: Context of the fuzzed model: bounds every generation the fuzzer can ask for.
FUZZ_CONTEXT = 64
#: Tokens generated when a fuzzed request does not say (else it runs to the end of the context).
FUZZ_DEFAULT_MAX_TOKENS = 8
#: Examples per operation and generation mode (whole test: a few minutes on 2 cores).
MAX_EXAMPLES = 40
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def assert_openai_error(response: Any, *statuses: int) -> dict[str, Any]:
    """The body is ``{"error": {"message", "type", "param", "code"}}`` and the status one of ``statuses``."""
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "server_error", "authentication_error")
    return error  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def server(log_dir: pathlib.Path) -> Iterator[Server]:
    models = log_dir / "models"
    models.mkdir()
    (models / "tiny.yaml").write_text(
        f"name: tiny\ncontext_size: {FUZZ_CONTEXT}\n"
        f"parameters:\n  model: {embedded_model_path()}\n  max_tokens: {FUZZ_DEFAULT_MAX_TOKENS}\n"
    )
    server = start_server(log_dir, "--models-path", str(models), name="fuzz-server")
    yield server
    server.close()


def test_openapi_schema_is_served(server: Server) -> None:
    schema = server.http.get("/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in (CHAT, "/v1/completions", "/v1/embeddings", "/v1/models"):
        assert path in paths, sorted(paths)
    # The document says what the server answers: 400 in OpenAI's error shape, not FastAPI's 422.
    for path in (CHAT, "/v1/completions", "/v1/embeddings"):
        responses = paths[path]["post"]["responses"]
        assert "422" not in responses, responses
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    error = schema.json()["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["message", "type"]


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_fuzz_from_openapi(server: Server, mode: schemathesis.GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 4
    seen: dict[str, int] = {}
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"

        @settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:  # called within this iteration: ``label`` is current
            response = case.call(base_url=server.base_url, timeout=120)
            assert response.status_code < 500, (label, case.body, response.status_code, response.text[:500])  # noqa: B023
            if response.status_code >= 400:
                assert_openai_error(response, response.status_code)
            seen[label] = seen.get(label, 0) + 1  # noqa: B023

        try:
            check()
        except Unsatisfiable:
            # Nothing in a GET without parameters can violate the schema.
            assert mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() == "GET", label
    print(f"\nfuzzed ({mode.value}): {seen}")
    for path in (CHAT, "/v1/completions", "/v1/embeddings"):
        assert seen.get(f"POST {path}", 0) >= MAX_EXAMPLES // 2, seen
    assert server.proc.popen.poll() is None, "the server died under fuzzing"
    assert server.http.get("/healthz").status_code == 200
    assert server.chat("Say hi.", max_tokens=4).status_code == 200
    assert "Traceback" not in server.proc.stderr()


# -- explicit hostile bodies (tests/test_bad_input.py has the everyday malformed ones) -----


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"[" * 100_000, 400),
        (b'{"messages": ' + b"[" * 100_000, 400),
        (b'{"messages": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}", 400),
        (b'{"messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}', 400),
        (b"\xef\xbb\xbf\x00\x00\x00", 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 100000000000000000000}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e308}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000000000000000000000}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', 400),
        (b'{"prompt": "' + b"\\ud800" + b'"}', 400),
        (b'{"prompt": ""}', 400),
    ],
    ids=["nested-100k-arrays", "unclosed-nesting", "nested-50k-objects", "invalid-utf8", "nul-bytes", "huge-n",
         "float-max-tokens", "huge-max-tokens", "nan", "infinity", "lone-surrogate", "empty-prompt"],
)
def test_hostile_bodies(server: Server, content: bytes, status: int) -> None:
    path = "/v1/completions" if content.startswith(b'{"prompt"') else CHAT
    response = server.http.post(path, content=content, headers={"content-type": "application/json"})
    assert_openai_error(response, status)
    assert server.proc.popen.poll() is None


def test_oversized_body_without_content_length(server: Server) -> None:
    """A chunked upload has no Content-Length to refuse up front; the cap still applies (413)."""

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    response = server.http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(response, 413)


def test_max_tokens_beyond_context_and_unknown_fields(server: Server) -> None:
    error = assert_openai_error(server.http.post(CHAT, json={"model": "tiny", "messages": MSG, "max_tokens": FUZZ_CONTEXT + 1}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    # Issue 19: an unknown field is refused, never dropped; an empty tools list is a valid no-op.
    unknown = server.http.post(CHAT, json={"messages": MSG, "max_tokens": 2, "frobnicate": {"deep": [1, 2, {"x": None}]}})
    assert assert_openai_error(unknown, 400)["param"] == "frobnicate"
    ok = server.http.post(CHAT, json={"messages": MSG, "max_tokens": 2, "tools": []})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("body", [{"input": ""}, {"input": [""]}, {"input": " "}, {"input": ["\n", "\t"]}, {"input": ["a"] * 64}, {"input": "x" * 10_000}])
def test_embedding_edge_inputs(server: Server, body: dict[str, Any]) -> None:
    response = server.http.post("/v1/embeddings", json=body)
    if response.status_code == 200:
        expected = len(body["input"]) if isinstance(body["input"], list) else 1
        assert len(response.json()["data"]) == expected
    else:
        assert_openai_error(response, 400)
    assert server.proc.popen.poll() is None


def test_server_survived(server: Server) -> None:
    assert server.proc.popen.poll() is None
    assert server.chat("What is 2+2?", max_tokens=4).status_code == 200
    assert "Traceback" not in server.proc.stderr()
    assert httpx.get(f"{server.base_url}/healthz").json() == {"status": "ok"}
