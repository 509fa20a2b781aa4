"""CPU modes (localp2p.cpumode): no AMX unless opted in, safe mode after a native crash.

Everything runs for real: the seccomp filter in a child interpreter, llama.cpp loads
in the backend's self-test child, a server whose backend dies of SIGSEGV at its first
decode (the tests-only failpoint), a worker whose rpc-server gets SIGSEGV.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from localp2p import cpumode
from localp2p.genmodel import Shape, write_model
from localp2p.llama import rpc
from localp2p.testing.cluster import Proc, Server, rpc_server_child, start_server, start_worker, stream_text

PROMPT = "Name three colours of the rainbow."
MAX_TOKENS = 24
#: A model in Q4_0, the weight type llama.cpp repacks on AVX2 CPUs (its CPU_REPACK buffer).
REPACKABLE = Shape(layers=2, embd=256, ff=512, heads=4, kv_heads=4, tensor_type="q4_0")


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout


def test_amx_filter_denies_exactly_the_amx_permission_request() -> None:
    """After deny_amx(), asking for AMX tile data fails with EPERM; other arch_prctl calls work."""
    out = _python(
        "import ctypes, json\n"
        "from localp2p import cpumode\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "supported = ctypes.c_uint64()\n"
        "before = cpumode.request_amx_errno()\n"
        "problem = cpumode.deny_amx()\n"
        "after = cpumode.request_amx_errno()\n"
        "get_supp = libc.syscall(158, 0x1021, ctypes.byref(supported))  # ARCH_GET_XCOMP_SUPP\n"
        "print(json.dumps([before, problem, after, get_supp]))\n"
    )
    before, problem, after, get_supp = json.loads(out)
    assert problem is None
    assert after == 1, "EPERM expected once AMX is denied"
    assert before != 1, "without the filter the kernel answers for itself (0 on AMX CPUs, an error elsewhere)"
    assert get_supp == 0, "the filter must not block other arch_prctl calls"


@pytest.fixture(scope="module")
def repackable_model(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny-q4_0.gguf", REPACKABLE)


def selftest(model: pathlib.Path, mode: str, **env: str) -> dict[str, object]:
    """One decode in backends.llama_cpp.selftest in ``mode``; its JSON line."""
    full_env = {**os.environ, cpumode.MODE_ENV: mode, **env}
    argv = [sys.executable, "-m", "backends.llama_cpp.selftest", str(model), "--threads", "1"]
    out = subprocess.run(argv, capture_output=True, text=True, env=full_env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_default_mode_keeps_weight_repacks_but_never_amx(repackable_model: pathlib.Path) -> None:
    result = selftest(repackable_model, "default")
    buffers = dict(result["weight_buffers"])  # type: ignore[call-overload]
    assert buffers, "llama.cpp's load log named no weight buffer"
    assert "AMX" not in buffers
    assert result["extra_buffer_types"] is True
    if "avx2" in cpumode.cpu_flags():  # llama.cpp repacks Q4_0 on AVX2
        assert "CPU_REPACK" in buffers, buffers


def test_safe_mode_keeps_weights_in_plain_cpu_buffers(repackable_model: pathlib.Path) -> None:
    result = selftest(repackable_model, "safe")
    buffers = dict(result["weight_buffers"])  # type: ignore[call-overload]
    assert buffers and all(name in ("CPU", "CPU_Mapped") for name in buffers), buffers
    assert result["extra_buffer_types"] is False
    assert result["cpu_mode"] == "safe"


@pytest.fixture(scope="module")
def expected_answer(local_server: Server) -> str:
    """The greedy answer of a server that never crashed."""
    reply = local_server.chat(PROMPT, max_tokens=MAX_TOKENS)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


@pytest.fixture()
def failpoint_server(log_dir: pathlib.Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    server = start_server(log_dir, env={cpumode.CRASH_FAILPOINT_ENV: request.param}, name=f"failpoint-{request.param}")
    try:
        yield server
    finally:
        server.close()


@pytest.mark.parametrize("failpoint_server", ["1"], indirect=True)
def test_crash_at_first_decode_continues_in_safe_mode(failpoint_server: Server, expected_answer: str) -> None:
    server = failpoint_server
    assert server.status()["backend"]["cpu_mode"] == "default"
    body = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": MAX_TOKENS}
    text, _ = stream_text(server.stream_events("/v1/chat/completions", body))
    assert text == expected_answer
    backend = server.status()["backend"]
    assert backend["cpu_mode"] == "safe"
    assert "SIGSEGV" in backend["cpu_mode_reason"]
    assert "CPU_REPACK" not in backend["weight_buffers_mib"] and "AMX" not in backend["weight_buffers_mib"]
    log = server.proc.stderr()
    assert log.count("SAFE MODE") == 1, log[-3000:]
    # Later requests are served in safe mode with no further crash.
    again = server.chat(PROMPT, max_tokens=MAX_TOKENS)
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == expected_answer
    assert server.status()["backend"]["restarts"] == 1


@pytest.mark.parametrize("failpoint_server", ["always"], indirect=True)
def test_crash_in_safe_mode_too_ends_the_request_with_the_usual_error(failpoint_server: Server) -> None:
    server = failpoint_server
    reply = server.chat(PROMPT, max_tokens=MAX_TOKENS)
    assert reply.status_code == 502, reply.text
    assert reply.json()["error"]["code"] == "backend_failed"
    assert server.proc.stderr().count("SAFE MODE") == 1
    assert server.http.get("/healthz").status_code == 200


def test_cpu_mode_flag_starts_in_safe_mode(log_dir: pathlib.Path) -> None:
    server = start_server(log_dir, "--cpu-mode", "safe", name="safe-from-start")
    try:
        backend = server.status()["backend"]
        assert backend["cpu_mode"] == "safe" and backend["cpu_mode_reason"] is None
        assert "mode=safe" in server.proc.stderr() or "safe (no AMX" in server.proc.stderr()
    finally:
        server.close()


def _environ(pid: int) -> dict[str, str]:
    raw = pathlib.Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def _wait_serving(worker: Proc, endpoint: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            rpc.probe(endpoint, 1.0)
            return
        except rpc.RPCError:
            assert time.monotonic() < deadline, worker.stderr()[-2000:]
            time.sleep(0.2)


def _next_rpc_server(worker: Proc, endpoint: str, old_pid: int, timeout: float = 30.0) -> int:
    """Pid of the rpc-server child that replaced ``old_pid``, once it serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = rpc_server_child(worker)
        except AssertionError:
            pid = old_pid
        if pid != old_pid:
            _wait_serving(worker, endpoint, deadline - time.monotonic())
            return pid
        time.sleep(0.1)
    raise TimeoutError(f"no new rpc-server child:\n{worker.stderr()[-2000:]}")


def test_worker_restarts_its_rpc_server_in_safe_mode_after_a_native_crash(log_dir: pathlib.Path) -> None:
    worker, endpoint = start_worker(log_dir, name="segv-worker")
    try:
        assert "cpu-mode=default" in worker.ready_line
        pid, _ = rpc_server_child(worker)
        assert _environ(pid)[cpumode.MODE_ENV] == "default"
        # An ordinary death (SIGKILL) restarts it as it was.
        os.kill(pid, signal.SIGKILL)
        pid = _next_rpc_server(worker, endpoint, pid)
        assert _environ(pid)[cpumode.MODE_ENV] == "default"
        assert "SAFE MODE" not in worker.stderr()
        # A native crash restarts it in safe mode.
        os.kill(pid, signal.SIGSEGV)
        pid = _next_rpc_server(worker, endpoint, pid)
        env = _environ(pid)
        assert env[cpumode.MODE_ENV] == "safe"
        assert env["GGML_CPU_TILED_MM"] == "0" and env["GGML_CPU_DISABLE_FUSION"] == "1"
        assert worker.stderr().count("SAFE MODE") == 1
    finally:
        worker.stop()
