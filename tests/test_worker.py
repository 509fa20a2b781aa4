"""`localp2p worker llama-cpp-rpc`: ready line, supervision of the rpc-server child, clean stop."""

from __future__ import annotations

import os
import pathlib
import signal
import time

from localp2p.llama import rpc
from localp2p.testing.cluster import Proc, descendants, free_port, start_worker


def _rpc_child(worker: Proc) -> int:
    children = descendants(worker.pid)
    assert len(children) == 1, children
    return children[0]


def test_ready_line_names_endpoint_and_protocol(tmp_path: pathlib.Path) -> None:
    port = free_port()
    worker, endpoint = start_worker(tmp_path, port)
    try:
        line = worker.stdout[0]
        assert f"endpoint=127.0.0.1:{port}" in line and "rpc-protocol=7.0.0" in line
        assert "WITHOUT authentication" not in worker.stderr()
        assert rpc.probe(endpoint).version == rpc.PROTOCOL_VERSION
    finally:
        assert worker.stop() == 0


def test_crashed_rpc_server_is_restarted(tmp_path: pathlib.Path) -> None:
    worker, endpoint = start_worker(tmp_path)
    try:
        first = _rpc_child(worker)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "rpc-server restarted" in worker.stderr():
                break
            time.sleep(0.1)
        else:
            raise AssertionError("rpc-server was not restarted:\n" + worker.stderr())
        assert descendants(worker.pid) != [first]
        assert rpc.probe(endpoint).version == rpc.PROTOCOL_VERSION
    finally:
        worker.stop()


def test_sigterm_and_sigint_stop_cleanly(tmp_path: pathlib.Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        worker, endpoint = start_worker(tmp_path)
        child = _rpc_child(worker)
        assert worker.stop(sig) == 0
        assert not pathlib.Path(f"/proc/{child}").exists() or "Z" in pathlib.Path(f"/proc/{child}/stat").read_text().split()[2]
        try:
            rpc.probe(endpoint, timeout=1)
        except rpc.RPCError:
            pass
        else:
            raise AssertionError("rpc-server still answers after the worker stopped")


def test_killed_worker_takes_its_rpc_server_along(tmp_path: pathlib.Path) -> None:
    worker, _endpoint = start_worker(tmp_path)
    child = _rpc_child(worker)
    os.kill(worker.pid, signal.SIGKILL)
    worker.popen.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and pathlib.Path(f"/proc/{child}").exists():
        time.sleep(0.1)
    assert not pathlib.Path(f"/proc/{child}").exists(), "orphaned rpc-server"


def test_non_loopback_address_warns(tmp_path: pathlib.Path) -> None:
    port = free_port()
    worker = Proc(["worker", "llama-cpp-rpc", "0.0.0.0", str(port), "--threads", "1"], tmp_path, "exposed")
    try:
        worker.wait_line("localp2p worker ready")
        warning = next(line for line in worker.stderr().splitlines() if "WITHOUT authentication" in line)
        assert "0.0.0.0" in warning
    finally:
        worker.stop()
