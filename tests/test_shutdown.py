"""Issue 6: clean shutdown. SIGTERM/SIGINT stop accepting, let in-flight requests finish
(bounded by --shutdown-grace), stop every child, free every port and socket, and exit 0.

(The static worker's clean stop is tests/test_worker.py::test_sigterm_and_sigint_stop_cleanly.)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import socket
import time
from typing import Any

import httpx
import pytest

from localp2p.testing.cluster import (
    Proc,
    Server,
    descendants,
    new_token,
    p2p_server,
    p2p_worker,
    start_server,
    wait_for_workers,
    worker_peer_id,
)

CHAT = "/v1/chat/completions"
#: Long enough that a 200-token stream finishes inside it even on a busy 2-core machine.
LONG_GRACE = 90
#: Tokens of the stream that is in flight when the signal arrives.
STREAM_TOKENS = 200


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                alive.append(pid)
    return alive


def _backend_socket_dir(server: Server) -> pathlib.Path:
    """The temp dir of the backend's unix socket, from the backend's command line."""
    for pid in descendants(server.proc.pid):
        argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"backends.llama_cpp" in argv:
            address = argv[argv.index(b"--addr") + 1].decode()
            return pathlib.Path(address.removeprefix("unix:")).parent
    raise AssertionError("no backend child found")


def _port_free(base_url: str) -> bool:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def _stream_then_signal(server: Server, sig: int, max_tokens: int = STREAM_TOKENS) -> tuple[list[Any], bool]:
    """Stream a long generation; send ``sig`` after a few chunks. Returns the events, and
    whether a new connection was refused while the stream was still running."""
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    events: list[Any] = []
    refused = False
    with httpx.Client(base_url=server.base_url, timeout=120) as client, client.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
            if len(events) == 3:
                os.kill(server.proc.pid, sig)
            elif len(events) > 3 and not refused:
                with contextlib.suppress(httpx.TimeoutException):
                    try:
                        httpx.get(f"{server.base_url}/healthz", timeout=0.5)
                    except httpx.ConnectError:
                        refused = True
    return events, refused


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_server_finishes_in_flight_stream_then_exits_clean(tmp_path: pathlib.Path, sig: int) -> None:
    server = start_server(tmp_path, "--shutdown-grace", str(LONG_GRACE), name=f"server-{sig.name}")
    try:
        children = descendants(server.proc.pid)
        assert children, "the backend runs as a child"
        socket_dir = _backend_socket_dir(server)
        assert socket_dir.is_dir()
        events, refused = _stream_then_signal(server, sig)
        code = server.proc.popen.wait(LONG_GRACE + 30)
    finally:
        server.close()
    # The stream was not cut: it ran to max_tokens and ended with [DONE].
    assert events[-1] == "[DONE]", events[-3:]
    finishes = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finishes == ["length"], events[-3:]
    assert not any("error" in e for e in events[:-1] if isinstance(e, dict))
    assert refused, "the server still accepted connections after the signal"
    assert code == 0, server.proc.stderr()[-2000:]
    assert _alive(children) == [], "orphaned children"
    assert not socket_dir.exists(), "stale backend socket dir"
    assert _port_free(server.base_url)
    log = server.proc.stderr()
    assert "Traceback" not in log and "shutdown grace is over" not in log


def test_grace_bounds_the_wait(tmp_path: pathlib.Path) -> None:
    """A generation longer than the grace is cut when the grace ends; the exit is still clean."""
    server = start_server(tmp_path, "--shutdown-grace", "1", name="short-grace")
    try:
        children = descendants(server.proc.pid)
        started = time.monotonic()
        with pytest.raises(httpx.RemoteProtocolError):  # the response is cut off, visibly
            _stream_then_signal(server, signal.SIGTERM, max_tokens=2000)
        code = server.proc.popen.wait(60)
        took = time.monotonic() - started
    finally:
        server.close()
    assert code == 0
    assert _alive(children) == []
    assert "shutdown grace is over" in server.proc.stderr()
    print(f"\n2000-token stream cut by a 1 s grace; stopped {took:.1f} s after the request began")


def test_p2p_server_and_worker_stop_clean(tmp_path: pathlib.Path) -> None:
    token = new_token()
    worker = p2p_worker(tmp_path, token, "shutdown-worker")
    server: Server | None = None
    try:
        server = p2p_server(tmp_path, token, "--shutdown-grace", str(LONG_GRACE), name="shutdown-p2p-server")
        wait_for_workers(server, [worker_peer_id(worker)], timeout=90)
        server_children = descendants(server.proc.pid)
        worker_children = descendants(worker.pid)
        assert server_children and worker_children
        events, _ = _stream_then_signal(server, signal.SIGTERM, max_tokens=64)
        assert events[-1] == "[DONE]"
        assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]] == ["length"]
        assert server.proc.popen.wait(LONG_GRACE + 30) == 0, server.proc.stderr()[-2000:]
        assert _alive(server_children) == []
        assert _port_free(server.base_url)
        # The worker outlives its server, then stops cleanly itself.
        assert worker.popen.poll() is None
        assert _stop(worker, signal.SIGTERM) == 0, worker.stderr()[-2000:]
        assert _alive(worker_children) == []
        assert "Traceback" not in worker.stderr()
    finally:
        if server is not None:
            server.close()
        worker.stop()


def test_p2p_worker_sigint(tmp_path: pathlib.Path) -> None:
    worker = p2p_worker(tmp_path, new_token(), "sigint-worker")
    children = descendants(worker.pid)
    assert children
    assert _stop(worker, signal.SIGINT) == 0
    assert _alive(children) == []


def _stop(proc: Proc, sig: int) -> int:
    proc.popen.send_signal(sig)
    return proc.popen.wait(60)


def test_second_signal_forces_the_stop(tmp_path: pathlib.Path) -> None:
    """Ctrl-C twice: the second signal does not wait for the grace."""
    server = start_server(tmp_path, "--shutdown-grace", str(LONG_GRACE), name="forced")
    try:
        children = descendants(server.proc.pid)
        body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.base_url, timeout=120) as client, client.stream("POST", CHAT, json=body) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            os.kill(server.proc.pid, signal.SIGTERM)
            time.sleep(0.5)
            os.kill(server.proc.pid, signal.SIGTERM)
            code = server.proc.popen.wait(60)
    except httpx.HTTPError:  # the cut-off response, on leaving the block
        code = server.proc.popen.wait(60)
    finally:
        server.close()
    assert code == 0
    assert _alive(children) == []
    log = server.proc.stderr()
    assert "stopping gracefully" in log and "shutdown grace is over" not in log
    assert "Traceback" not in log
