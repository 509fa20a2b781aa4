"""Shared fixtures. The helpers in cluster.py start real processes; nothing is mocked.

Interrupting the run leaves no process behind: the first SIGINT or SIGTERM becomes a
KeyboardInterrupt (so tests' ``finally`` blocks and fixture teardowns stop what they
started); any further signal SIGKILLs every process the run started at once; whatever
is still registered when pytest ends is stopped (cluster.end_all); and a pytest
killed outright takes its children with it (cluster's PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import pathlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from localp2p.testing.cluster import Proc, Server, end_all, kill_all, start_server, start_worker

#: The signals that stop a test run (Ctrl-C; `kill`, CI cancelling a job).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Handlers replaced by :func:`pytest_configure`, put back by :func:`pytest_unconfigure`.
_previous_handlers: dict[int, Any] = {}
#: Stop signals received so far.
_signals_received = 0


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    """First stop signal: KeyboardInterrupt, so pytest unwinds and tears down. Later ones:
    SIGKILL every registered process at once (the teardown still running then finds them
    dead and ends quickly)."""
    global _signals_received  # noqa: PLW0603 - a signal handler's state
    _signals_received += 1
    if _signals_received == 1:
        raise KeyboardInterrupt
    kill_all()


def pytest_configure(config: pytest.Config) -> None:
    # Replaces SIGINT's default handler too, so trio.run (in-process tests) leaves KI to us.
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            _previous_handlers[signum] = signal.signal(signum, _on_stop_signal)


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """A KeyboardInterrupt swallowed by code under test still ends the run after this test."""
    if _signals_received:
        item.session.shouldstop = "stopped by a signal"


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """After every teardown: end what is left (a test that did not stop its processes, or a
    teardown cut short), then give the signals back, unless the run was stopped by one:
    then this process is on its way out, and a late second signal must not kill it there."""
    end_all()
    if not _signals_received:
        for signum, handler in _previous_handlers.items():
            signal.signal(signum, handler)
        _previous_handlers.clear()


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> pathlib.Path:
    """Per-module directory for process logs (kept by pytest for a failed run)."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="session")
def shared_log_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("shared")


# The shared cluster below is used read-only by many modules. An rpc-server serves one
# client at a time, so a test that needs its own server must start its own workers.


@pytest.fixture(scope="session")
def two_workers(shared_log_dir: pathlib.Path) -> Iterator[list[tuple[Proc, str]]]:
    workers = [start_worker(shared_log_dir, name=f"worker{i}") for i in (1, 2)]
    yield workers
    for proc, _ in workers:
        proc.stop()


@pytest.fixture(scope="session")
def local_server(shared_log_dir: pathlib.Path) -> Iterator[Server]:
    server = start_server(shared_log_dir, name="local-server")
    yield server
    server.close()


@pytest.fixture(scope="session")
def distributed_server(shared_log_dir: pathlib.Path, two_workers: list[tuple[Proc, str]]) -> Iterator[Server]:
    server = start_server(shared_log_dir, rpc_servers=[endpoint for _, endpoint in two_workers], name="dist-server")
    yield server
    server.close()
