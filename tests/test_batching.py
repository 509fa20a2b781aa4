"""Issue 14 acceptance: continuous batching through two p2p workers, and failover mid-batch.

Eight streamed chats run at once on ``--parallel 8`` over two p2p workers: all complete
with their whole answers. Then the same eight again, and one worker is killed while every
stream is producing: each stream fails over (the backend restarts on the worker left)
and continues to its full answer, equal to the uninterrupted run's.
"""

from __future__ import annotations

import json
import pathlib
import threading
from typing import Any

from test_static_faults import CONTINUED, FAILING_OVER, _errors, _failover_lines

from localp2p.testing.cluster import Server, new_token, p2p_server, p2p_worker, stream_text, wait_for_workers, worker_peer_id

STREAMS = 8
TOKENS = 96
TOPICS = ["a lighthouse", "the moon", "a river", "bread", "a violin", "winter", "a library", "the sea"]
TOOL_CALL = {
    "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    "temperature": 0,
    "max_tokens": 64,
    "logprobs": True,
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ],
    "tool_choice": "required",
    "parallel_tool_calls": False,
}
#: Chunks every stream has received before the worker is killed: all of them are mid-answer.
KILL_AFTER_CHUNKS = 6


def _body(topic: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"Write a short poem about {topic}."}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


def _run_streams(server: Server, on_all_started: Any = None) -> list[tuple[str, list[Any]]]:
    """Stream the eight chats at once; call ``on_all_started()`` once every stream has
    KILL_AFTER_CHUNKS chunks. Returns each stream's text and events."""
    results: list[tuple[str, list[Any]]] = [("", [])] * STREAMS
    started = threading.Barrier(STREAMS + 1)
    errors: list[BaseException] = []

    def stream(index: int) -> None:
        events: list[Any] = []
        waited = False
        try:
            for event in server.stream_events("/v1/chat/completions", _body(TOPICS[index])):
                events.append(event)
                if not waited and len(events) == KILL_AFTER_CHUNKS:
                    waited = True
                    started.wait(timeout=300)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)
        finally:
            if not waited:
                started.abort()
        results[index] = (stream_text(iter(events))[0], events)

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    started.wait(timeout=300)
    if on_all_started is not None:
        on_all_started()
    for thread in threads:
        thread.join(timeout=600)
    assert not errors, errors
    return results


def _usage(events: list[Any]) -> dict[str, Any]:
    return next(e["usage"] for e in reversed(events) if isinstance(e, dict) and e.get("usage"))


def test_eight_streams_through_two_p2p_workers_survive_a_worker_kill(tmp_path: pathlib.Path) -> None:
    token = new_token()
    first = p2p_worker(tmp_path, token, "w1")
    second = p2p_worker(tmp_path, token, "w2")
    server = p2p_server(tmp_path, token, "--parallel", str(STREAMS))
    try:
        state = wait_for_workers(server, [worker_peer_id(first), worker_peer_id(second)])
        assert all(w["layers"] > 0 for w in state["workers"])

        references = _run_streams(server)
        for text, events in references:
            assert not _errors(events), _errors(events)
            assert events[-1] == "[DONE]"
            assert _usage(events)["completion_tokens"] == TOKENS
            assert len(text) > 100
        assert len({text for text, _ in references}) == STREAMS  # eight different answers

        results = _run_streams(server, on_all_started=second.kill)
        for (text, events), (reference, _) in zip(results, references, strict=True):
            assert not _errors(events), _errors(events)
            assert events[-1] == "[DONE]"
            assert _usage(events)["completion_tokens"] == TOKENS
            assert text == reference
        assert len(_failover_lines(server, FAILING_OVER)) == STREAMS
        assert len(_failover_lines(server, CONTINUED)) == STREAMS
        assert server.proc.popen.poll() is None

        # The OpenAI fields behave the same with the layers on a p2p worker (issue 19, item 8).
        reply = server.http.post("/v1/chat/completions", json=TOOL_CALL)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
        assert len(choice["logprobs"]["content"]) == reply.json()["usage"]["completion_tokens"]
    finally:
        server.close()
        first.stop()
        second.stop()
