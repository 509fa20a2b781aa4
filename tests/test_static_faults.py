"""Issue 2 and issue 6 acceptance: a worker killed during a request does not take the server
down, and the request goes on: the generation continues on the workers left (or locally)
and, at temperature 0, its text equals an uninterrupted run's."""

from __future__ import annotations

import pathlib
import re
import threading
import time
from typing import Any

from localp2p.testing.cluster import Proc, Server, start_server, start_worker, stream_text

TOKENS = 200
STREAM_BODY = {
    "prompt": "Once upon a time",
    "max_tokens": TOKENS,
    "temperature": 0,
    "ignore_eos": True,
    "stream_options": {"include_usage": True},
}
CHAT_BODY = {
    "messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}],
    "max_tokens": TOKENS,
    "temperature": 0,
    "ignore_eos": True,
}
#: Events of a stream before the worker is killed: some text has reached the client.
KILL_AFTER_EVENTS = 5
#: The server's log line for each failover, and the one when the generation went on.
FAILING_OVER = "backend failed mid-generation; failing over"
CONTINUED = "generation continued after failover"


def _stream_and_kill(server: Server, kill: Any, body: dict[str, Any] = STREAM_BODY) -> tuple[str, list[Any]]:
    """Stream a long completion and call ``kill()`` after a few chunks; return its text and every event."""
    events: list[Any] = []
    for event in server.stream_events("/v1/completions", body):
        events.append(event)
        if len(events) == KILL_AFTER_EVENTS:
            kill()
    return stream_text(iter(events))[0], events


def _errors(events: list[Any]) -> list[dict[str, Any]]:
    return [e for e in events if isinstance(e, dict) and "error" in e]


def _chat(server: Server) -> dict[str, Any]:
    reply = server.http.post("/v1/chat/completions", json=CHAT_BODY)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def _kill_when_generating(server: Server, worker: Proc, delay: float = 1.0) -> threading.Thread:
    """Kill ``worker`` ``delay`` s after the backend starts the next generation (a timer thread).

    The default leaves the prompt's evaluation (a few tenths of a second, more on a loaded
    2-core box) behind and falls well inside the ~200 tokens' generation (seconds).
    """
    started = server.proc.stderr().count("predict start")

    def run() -> None:
        deadline = time.monotonic() + 60
        while server.proc.stderr().count("predict start") == started and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        worker.kill()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _failover_lines(server: Server, event: str) -> list[str]:
    return [line for line in server.proc.stderr().splitlines() if event in line]


def _field(line: str, name: str) -> float:
    match = re.search(rf"{name}=([0-9.]+)", line)
    assert match, line
    return float(match.group(1))


def test_generation_continues_when_workers_die(tmp_path: pathlib.Path) -> None:
    w1, e1 = start_worker(tmp_path, name="w1")
    w2, e2 = start_worker(tmp_path, name="w2")
    server = start_server(tmp_path, rpc_servers=[e1, e2], name="server")
    try:
        assert [d["layers"] > 0 for d in server.status()["devices"]] == [True, True]
        # The uninterrupted runs, on both workers.
        reference, events = stream_text(server.stream_events("/v1/completions", STREAM_BODY))
        reference_usage = events[-2]["usage"]
        assert reference_usage["completion_tokens"] == TOKENS and len(reference) > 200
        chat_reference = _chat(server)

        # A worker dies mid-stream: the stream pauses, then goes on, with the same text.
        text, events = _stream_and_kill(server, w2.kill)
        assert not _errors(events), _errors(events)
        assert events[-1] == "[DONE]"
        assert text == reference
        assert events[-2]["usage"] == reference_usage  # the whole generation counted, the prompt once
        assert [c["finish_reason"] for c in events[-3]["choices"]] == ["length"]
        (failed,) = _failover_lines(server, FAILING_OVER)
        assert _field(failed, "tokens_so_far") > 0
        assert len(_failover_lines(server, CONTINUED)) == 1
        assert server.proc.popen.poll() is None

        # The restarted backend skipped the dead worker.
        status = server.status()
        devices = {d["endpoint"]: d for d in status["devices"]}
        assert devices[e1]["used"] and devices[e1]["layers"] == 30
        assert not devices[e2]["used"] and devices[e2]["skipped_reason"]
        assert status["backend"]["restarts"] >= 1

        # The last worker dies during a request answered whole: it goes on locally.
        killer = _kill_when_generating(server, w1)
        chat = _chat(server)
        killer.join()
        assert chat["choices"][0]["message"]["content"] == chat_reference["choices"][0]["message"]["content"]
        assert chat["usage"] == chat_reference["usage"]
        failed = _failover_lines(server, FAILING_OVER)
        assert len(failed) == 2 and _field(failed[-1], "tokens_so_far") > 0
        assert len(_failover_lines(server, CONTINUED)) == 2
        assert server.status()["layers"]["local"] == 30
        assert "Traceback" not in server.proc.stderr()
    finally:
        server.close()
        for worker in (w1, w2):
            worker.stop()


def _wait_restarted(server: Server) -> None:
    """Wait until the supervisor has noticed the crash and restarted the backend."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        backend = server.status()["backend"]
        if backend["restarts"] >= 1 and backend["state"] == "ready":
            return
        time.sleep(0.2)
    raise TimeoutError(server.status())


def test_failover_off_or_out_of_time_ends_with_a_clear_error(tmp_path: pathlib.Path) -> None:
    """``--failover-timeout 0``: the old behaviour, one error event; a timeout shorter than a
    restart: the request gives up and says why. Either way the next request works."""
    for timeout, expected in (("0", "it is being restarted"), ("0.3", "could not be continued")):
        worker, endpoint = start_worker(tmp_path, name=f"w-{timeout}")
        server = start_server(tmp_path, "--failover-timeout", timeout, rpc_servers=[endpoint], name=f"server-{timeout}")
        try:
            _, events = _stream_and_kill(server, worker.kill)
            (error,) = _errors(events)
            assert error["error"]["code"] == "backend_failed"
            assert expected in error["error"]["message"], error
            assert events[-1] == "[DONE]"
            _wait_restarted(server)
            reply = server.chat("What is 2+2?", max_tokens=8)
            assert reply.status_code == 200, reply.text
            assert server.status()["layers"]["local"] == 30
        finally:
            server.close()
            worker.stop()


def test_killed_backend_is_restarted(tmp_path: pathlib.Path) -> None:
    import os
    import signal

    server = start_server(tmp_path, name="server")
    try:
        pid = server.status()["backend"]["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.status()["backend"]["pid"] == pid:
            time.sleep(0.2)
        reply = server.chat("What is 2+2?", max_tokens=8)
        assert reply.status_code == 200, reply.text
        assert server.status()["backend"]["pid"] != pid
    finally:
        server.close()
