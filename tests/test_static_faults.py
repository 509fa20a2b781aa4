"""Issue 2 acceptance: a worker killed during a streamed request does not take the server down."""

from __future__ import annotations

import pathlib
import time

from cluster import Server, start_server, start_worker

STREAM_BODY = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


def _stream_and_kill(server: Server, kill: object) -> list[object]:
    """Stream a long completion and call ``kill()`` after a few chunks; return every event."""
    events: list[object] = []
    for event in server.stream_events("/v1/completions", STREAM_BODY):
        events.append(event)
        if len(events) == 5:
            kill()  # type: ignore[operator]
    return events


def test_killing_a_worker_mid_stream(tmp_path: pathlib.Path) -> None:
    w1, e1 = start_worker(tmp_path, name="w1")
    w2, e2 = start_worker(tmp_path, name="w2")
    server = start_server(tmp_path, rpc_servers=[e1, e2], name="server")
    try:
        assert [d["layers"] > 0 for d in server.status()["devices"]] == [True, True]

        events = _stream_and_kill(server, w2.kill)
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert len(errors) == 1, events[-3:]
        assert "backend" in errors[0]["error"]["message"]
        assert events[-1] == "[DONE]"
        assert server.proc.popen.poll() is None

        # The next request waits for the restarted backend, which skips the dead worker.
        reply = server.chat("What is 2+2?", max_tokens=8)
        assert reply.status_code == 200, reply.text
        status = server.status()
        devices = {d["endpoint"]: d for d in status["devices"]}
        assert devices[e1]["used"] and devices[e1]["layers"] == 30
        assert not devices[e2]["used"] and devices[e2]["skipped_reason"]
        assert status["backend"]["restarts"] >= 1

        # Lose the last worker too: the request after that runs locally.
        events = _stream_and_kill(server, w1.kill)
        assert any(isinstance(e, dict) and "error" in e for e in events) and events[-1] == "[DONE]"
        reply = server.chat("What is 2+2?", max_tokens=8)
        assert reply.status_code == 200, reply.text
        assert server.status()["layers"]["local"] == 30
        assert "Traceback" not in server.proc.stderr()
    finally:
        server.close()
        for worker in (w1, w2):
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
