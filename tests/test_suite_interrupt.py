"""Issue 13: interrupting the test suite leaves no server running.

An inner pytest runs a small test that holds two real servers (one from a fixture, one
started in the test); this test interrupts that pytest the way a person or a CI job
does, and checks that every process the inner run started is gone.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import time
import uuid

import pytest

from localp2p.testing.cluster import START_TIMEOUT, Proc, alive, processes_with_env, sigkill, wait_gone

TESTS_DIR = pathlib.Path(__file__).resolve().parent
#: Marks every process of one inner run (environment variables are inherited by all descendants).
MARKER_ENV = "LOCALP2P_TEST_INNER_RUN"
#: Seconds between the first signal and the second (a person pressing Ctrl-C, then `kill`).
SECOND_SIGNAL_AFTER = 1.0
#: Seconds every process of the inner run gets to be gone after the last signal.
GONE_WITHIN = 30.0
#: Seconds after the second server's launch at which its start-up is interrupted (well
#: before it can be ready: Python's imports alone take longer on these machines).
DURING_START = 1.0
#: Processes the inner test reports once both servers are ready: each server and its backend.
HELD_PROCESSES = 4

INNER_TEST = '''
import contextlib
import threading
import time

import pytest

from localp2p.testing.cluster import Server, descendants, start_server

#: Longer than the outer test waits: only a signal ends this test.
HOLD_S = 600
#: A generation that outlasts the interruption: stopping its server waits for it (10 s grace).
LONG_STREAM = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 2000, "ignore_eos": True}


def report(server):
    print("PIDS", server.proc.pid, *descendants(server.proc.pid), flush=True)


def stream_in_background(server):
    """Keep a long generation in flight, as a test interrupted mid-request does; on a client
    of its own (server.close() closes the server's client, which would end the request)."""
    streaming = threading.Event()
    client = Server(server.proc, server.base_url)

    def read():
        with contextlib.suppress(Exception):
            for _ in client.stream_events("/v1/chat/completions", LONG_STREAM):
                streaming.set()

    threading.Thread(target=read, daemon=True).start()
    assert streaming.wait(60)


@pytest.fixture
def first(tmp_path):
    server = start_server(tmp_path, name="first")
    yield server
    server.close()


def test_hold(first, tmp_path):
    report(first)
    stream_in_background(first)
    print("STARTING", flush=True)
    second = start_server(tmp_path, name="second")
    try:
        report(second)
        stream_in_background(second)
        print("HOLDING", flush=True)
        time.sleep(HOLD_S)
    finally:
        second.close()
'''


def _start_inner(tmp_path: pathlib.Path, marker: str) -> Proc:
    """The inner pytest, with tests/conftest.py as a plugin and cluster.py importable."""
    (tmp_path / "test_inner.py").write_text(INNER_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    args = ["-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-s", "-q"]
    args += ["-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path), "--basetemp", str(tmp_path / "inner")]
    args.append(str(tmp_path / "test_inner.py"))
    path = [str(TESTS_DIR), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {MARKER_ENV: marker, "PYTHONPATH": os.pathsep.join(path)}
    return Proc(args, tmp_path, "inner-pytest", env, program=[sys.executable])


def _pids(inner: Proc) -> list[int]:
    return [int(pid) for line in inner.stdout if line.startswith("PIDS ") for pid in line.split()[1:]]


@pytest.mark.parametrize("when", ["serving", "starting"])
def test_sigint_then_sigterm_leaves_nothing(tmp_path: pathlib.Path, when: str) -> None:
    """Ctrl-C, then SIGTERM a second later, while the teardown waits for a server to stop
    (one that is still finishing a request, or one that is starting)."""
    _interrupt_and_check(tmp_path, when, [signal.SIGINT, signal.SIGTERM], pytest.ExitCode.INTERRUPTED)


def test_sigkill_leaves_nothing(tmp_path: pathlib.Path) -> None:
    """A pytest killed outright gets no say: its children must go by themselves."""
    _interrupt_and_check(tmp_path, "serving", [signal.SIGKILL], -signal.SIGKILL)


def _interrupt_and_check(tmp_path: pathlib.Path, when: str, signals: list[int], inner_exit: int) -> None:
    """Send ``signals`` to the inner pytest once its test is at ``when``; every process of
    the inner run must be gone soon, and the inner pytest must end with ``inner_exit``
    (INTERRUPTED: it unwound and tore down by itself rather than being killed)."""
    marker = uuid.uuid4().hex
    inner = _start_inner(tmp_path, marker)
    try:
        if when == "serving":
            inner.wait_line("HOLDING", 2 * START_TIMEOUT)
            pids = _pids(inner)
            assert len(pids) >= HELD_PROCESSES, f"two servers and their backends: {inner.stdout}"
        else:
            inner.wait_line("STARTING", START_TIMEOUT)
            time.sleep(DURING_START)
            pids = _pids(inner)
            assert "HOLDING" not in inner.stdout, "the second server was ready too soon"
        running = processes_with_env(MARKER_ENV, value=marker)
        assert alive(pids) == pids and set(pids) < set(running), (pids, running)
        if when == "starting":
            assert set(running) - set(pids) - {inner.pid}, "the second server has not started"
        for i, sig in enumerate(signals):
            if i:
                time.sleep(SECOND_SIGNAL_AFTER)
            inner.popen.send_signal(sig)
        left = wait_gone(running, GONE_WITHIN)
        assert left == [], f"left running: {left}; inner pytest:\n{inner.stderr()[-2000:]}\n" + "\n".join(inner.stdout[-20:])
        assert processes_with_env(MARKER_ENV, value=marker) == []
        assert inner.popen.wait(GONE_WITHIN) == inner_exit, inner.stdout[-20:]
    finally:
        sigkill(processes_with_env(MARKER_ENV, value=marker))
        inner.stop()
