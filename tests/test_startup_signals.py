"""Issue 13: SIGTERM or SIGINT at any point of start-up stops cleanly: a bounded exit with
code 0 (or the usual signal exit), no traceback, and no child left behind.

(Stopping once serving is tests/test_shutdown.py.)
"""

from __future__ import annotations

import pathlib
import signal
import time
from collections.abc import Callable

import pytest

from localp2p.testing.cluster import Proc, descendants, new_token, p2p_server, p2p_worker, start_server, wait_gone

#: Seconds a stop may take: the graceful limit (10 s grace + 20 s margin) with room to spare.
STOP_BOUND = 45.0
#: Seconds children may outlive their parent's exit (they poll for it every 0.5 s).
CHILDREN_BOUND = 5.0
#: Seconds to reach a start-up point on a busy 2-core machine.
REACH_TIMEOUT = 120.0


def _wait_until(condition: Callable[[], bool], proc: Proc, what: str) -> None:
    deadline = time.monotonic() + REACH_TIMEOUT
    while not condition():
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{proc.name} never reached {what} (exit {proc.popen.poll()}):\n{proc.stderr()[-3000:]}")
        time.sleep(0.05)


def _has_children(proc: Proc) -> bool:
    return bool(descendants(proc.pid))


# Each start-up point: start the process, return it once it is there.


def _run_launched(tmp_path: pathlib.Path) -> Proc:
    """`localp2p run` right after launch: its first log line, long before it listens."""
    proc = start_server(tmp_path, "--log-level", "debug", name="run-launched", wait=False).proc
    proc.wait_stderr("starting", REACH_TIMEOUT)
    return proc


def _run_loading(tmp_path: pathlib.Path) -> Proc:
    """`localp2p run` listening, its backend started and loading the model: not ready."""
    proc = start_server(tmp_path, name="run-loading", wait=False).proc
    proc.wait_stderr("listening", REACH_TIMEOUT)
    _wait_until(lambda: _has_children(proc), proc, "a backend child")
    assert "load_s=" not in proc.stderr(), "already ready: the signal would not come during start-up"
    return proc


def _run_waiting_for_workers(tmp_path: pathlib.Path) -> Proc:
    """`localp2p run --p2p --min-workers 2` waiting for workers that never come."""
    proc = p2p_server(tmp_path, new_token(), "--min-workers", "2", name="run-waiting", wait=False).proc
    proc.wait_stderr("waiting for workers", REACH_TIMEOUT)
    return proc


def _worker_launched(tmp_path: pathlib.Path) -> Proc:
    """`localp2p worker p2p-llama-cpp-rpc` right after launch."""
    proc = p2p_worker(tmp_path, new_token(), "worker-launched", "--log-level", "debug", wait=False)
    proc.wait_stderr("starting", REACH_TIMEOUT)
    return proc


def _worker_rpc_starting(tmp_path: pathlib.Path) -> Proc:
    """`localp2p worker p2p-llama-cpp-rpc` with its rpc-server child started."""
    proc = p2p_worker(tmp_path, new_token(), "worker-rpc-starting", wait=False)
    _wait_until(lambda: _has_children(proc), proc, "an rpc-server child")
    return proc


POINTS = {
    "run-launched": _run_launched,
    "run-loading": _run_loading,
    "run-waiting-for-workers": _run_waiting_for_workers,
    "worker-launched": _worker_launched,
    "worker-rpc-starting": _worker_rpc_starting,
}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("point", list(POINTS))
def test_signal_during_startup_stops_cleanly(tmp_path: pathlib.Path, point: str, sig: signal.Signals) -> None:
    proc = POINTS[point](tmp_path)
    try:
        family = descendants(proc.pid)
        started = time.monotonic()
        proc.popen.send_signal(sig)
        code = proc.popen.wait(STOP_BOUND)
        took = time.monotonic() - started
        left = wait_gone(family, CHILDREN_BOUND)
    finally:
        proc.stop()
    log = proc.stderr()
    assert code in (0, -sig, 128 + sig), f"exit {code}:\n{log[-3000:]}"
    assert "Traceback" not in log and "ExceptionGroup" not in log, log[-3000:]
    assert left == [], f"children left behind: {left}"
    print(f"\n{point}: {sig.name} -> exit {code} in {took:.1f} s, {len(family)} children stopped")
