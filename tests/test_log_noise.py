"""Issue 13 (B): py-libp2p's per-message log lines are rate-limited, its connection manager sized for a pool.

The filter is tested in-process (a fake clock, a list handler) and through
``configure_logging`` in a real child process; the end-to-end test runs a real server
and two workers that share one identity (the case that filled the DHT log with
``Received an invalid-signed-record``) and reads their stderr.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from collections import Counter

from localp2p.logs import LIBRARY_REPEAT_INTERVAL, RepeatLimitFilter
from localp2p.testing.cluster import Proc, new_token, p2p_server, p2p_state, p2p_worker, worker_peer_id

INVALID_RECORD = "Received an invalid-signed-record, ignoring the response"
#: Seconds the end-to-end test lets the nodes run once the worker is attached.
RUN_SECONDS = 10.0
#: Copies of one noisy py-libp2p line a process may write in RUN_SECONDS: one per
#: LIBRARY_REPEAT_INTERVAL, which is longer than the test (unfiltered: one per message).
MAX_REPEATS = 1
#: py-libp2p's lines a peer with a stale or twin signed peer record triggers per message.
NOISY = ("invalid-signed-record", "Certified-Addr-Book")
#: "initiating N new dials" with N this large means go-libp2p's public-network targets.
BIG_DIAL_TARGET = 50


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _logger_with_filter(name: str, limiter: RepeatLimitFilter) -> tuple[logging.Logger, list[str]]:
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    collect = _Collect()
    collect.addFilter(limiter)
    logger.handlers[:] = [collect]
    return logger, collect.lines


def test_repeated_library_lines_pass_once_per_interval() -> None:
    now = [1000.0]
    limiter = RepeatLimitFilter(interval=60.0, clock=lambda: now[0])
    dht, dht_lines = _logger_with_filter("libp2p.kad_dht.test_noise", limiter)
    ours, our_lines = _logger_with_filter("localp2p.test_noise", limiter)

    for i in range(100):
        dht.error(INVALID_RECORD)
        # a per-peer f-string line: differs only in the peer id and a count
        dht.warning(f"Failed to open stream to peer 12D3KooW{i}x{i * 7}: attempt {i}")
        ours.error("our own line")
    assert dht_lines.count(INVALID_RECORD) == 1
    assert sum(line.startswith("Failed to open stream") for line in dht_lines) == 1
    assert len(our_lines) == 100  # only the libp2p loggers are limited

    dht.info("a different line")
    dht.debug(INVALID_RECORD)  # debug lines are never limited
    assert dht_lines[-2:] == ["a different line", INVALID_RECORD]

    now[0] += 61.0
    dht.error(INVALID_RECORD)
    assert dht_lines[-1] == f"{INVALID_RECORD} [99 more like this suppressed]"
    passed = len(dht_lines)
    dht.error(INVALID_RECORD)  # the interval starts again
    assert len(dht_lines) == passed


def test_the_filter_forgets_the_least_recent_lines() -> None:
    limiter = RepeatLimitFilter(interval=60.0, track_max=3)
    logger, lines = _logger_with_filter("libp2p.test_noise_lru", limiter)
    for word in ("alpha", "beta", "gamma", "delta"):
        logger.error(word)
    logger.error("alpha")  # forgotten (4 distinct > 3): passes again
    logger.error("delta")  # remembered: dropped
    assert lines == ["alpha", "beta", "gamma", "delta", "alpha"]


def test_configure_logging_limits_libp2p_lines_in_a_real_process() -> None:
    script = (
        "import logging\n"
        "from localp2p.logs import configure_logging\n"
        "configure_logging('console', 'info')\n"
        "logging.getLogger('libp2p').setLevel(logging.ERROR)\n"
        f"for _ in range(200): logging.getLogger('libp2p.kad_dht.peer_routing').error({INVALID_RECORD!r})\n"
        "for i in range(3): logging.getLogger('hypercorn.error').warning('other library %d', i)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stderr.count(INVALID_RECORD) == 1, out.stderr
    assert out.stderr.count("other library") == 3


def test_libp2p_loggers_inherit_the_quiet_level() -> None:
    """py-libp2p sets its auto-connector's logger to INFO itself; ours wins after import."""
    script = (
        "import logging\n"
        "import localp2p.p2p.network\n"
        "print(logging.getLogger('libp2p.network.auto_connector').getEffectiveLevel())\n"
    )
    env = {**os.environ, "LOCALP2P_LOG_LEVEL": "info"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True, env=env)
    assert int(out.stdout.strip()) == logging.ERROR


def _noise(proc: Proc) -> tuple[Counter[str], list[int]]:
    """Copies of each noisy library line in ``proc``'s stderr, and every "initiating N new dials" N."""
    text = proc.stderr()
    noisy = Counter(line for line in text.splitlines() if any(word in line for word in NOISY))
    dials = [int(n) for n in re.findall(r"initiating (\d+) new dials", text)]
    return noisy, dials


def test_a_running_network_does_not_repeat_library_noise(tmp_path: pathlib.Path) -> None:
    """A server and two workers on one identity (copied key: the issue's twin workers) for ~10 s."""
    token = new_token()
    first = p2p_worker(tmp_path, token, "twin1")
    state = tmp_path / "state-twin2"
    state.mkdir()
    shutil.copy(tmp_path / "state-twin1" / "worker-identity.key", state / "worker-identity.key")
    second = p2p_worker(tmp_path, token, "twin2")
    server = None
    try:
        peer_id = worker_peer_id(first)
        assert worker_peer_id(second) == peer_id  # the twin case this test is about
        server = p2p_server(tmp_path, token)
        deadline = time.monotonic() + 90
        while not any(w["peer_id"] == peer_id and w["online"] for w in p2p_state(server)["workers"]):
            assert time.monotonic() < deadline, server.proc.stderr()[-3000:]
            time.sleep(0.5)
        time.sleep(RUN_SECONDS)
        assert RUN_SECONDS < LIBRARY_REPEAT_INTERVAL
        for proc in (server.proc, first, second):
            noisy, dials = _noise(proc)
            assert all(n <= MAX_REPEATS for n in noisy.values()), f"{proc.name}: {noisy}"
            assert all(n < BIG_DIAL_TARGET for n in dials), f"{proc.name}: {dials}"
            assert "AUTO_CONNECTOR_STATE" not in proc.stderr()
    finally:
        if server is not None:
            server.close()
        for proc in (first, second):
            proc.stop()
