"""Issue 2 acceptance: greedy output through 2 static rpc workers equals local output, byte for byte."""

from __future__ import annotations

import pytest

from localp2p.testing.cluster import Server, stream_text

CHAT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
PROMPT = "The history of the printing press begins"
TOKENS = 64


def _chat(server: Server, stream: bool) -> str:
    body = {"messages": CHAT, "temperature": 0, "max_tokens": TOKENS}
    if stream:
        text, events = stream_text(server.stream_events("/v1/chat/completions", body))
        assert events[-1] == "[DONE]"
        return text
    reply = server.http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def _completion(server: Server, stream: bool) -> str:
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": TOKENS, "ignore_eos": True}
    if stream:
        text, events = stream_text(server.stream_events("/v1/completions", body))
        assert events[-1] == "[DONE]"
        return text
    reply = server.http.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == TOKENS
    return str(reply.json()["choices"][0]["text"])


def test_layers_are_on_both_workers(distributed_server: Server, local_server: Server) -> None:
    status = distributed_server.status()
    devices = status["devices"]
    assert [d["used"] for d in devices] == [True, True]
    assert all(d["layers"] > 0 for d in devices), devices
    assert sum(d["layers"] for d in devices) == status["layers"]["total"] == 30
    assert status["layers"]["local"] == 0
    local = local_server.status()
    assert local["devices"] == [] and local["layers"]["local"] == 30


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_output_identical_to_local(distributed_server: Server, local_server: Server, kind: str, stream: bool) -> None:
    ask = _chat if kind == "chat" else _completion
    local = ask(local_server, stream)
    distributed = ask(distributed_server, stream)
    assert len(local) > 100, local
    assert distributed.encode() == local.encode()


def test_stream_equals_plain(distributed_server: Server) -> None:
    assert _chat(distributed_server, True) == _chat(distributed_server, False)
    assert _completion(distributed_server, True) == _completion(distributed_server, False)
