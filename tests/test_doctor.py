"""`localp2p doctor`: a real subprocess against a real worker, real model files, real ports."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
from collections.abc import Iterator

import pytest

from localp2p import cpumode
from localp2p.config import embedded_model_path
from localp2p.llama import devices
from localp2p.testing.cluster import LOCALP2P, Proc, free_port, new_token, start_worker

#: Variables a developer's shell may set that would change what doctor checks.
_DOCTOR_ENV = (
    "ADDRESS",
    "MODELS_PATH",
    "P2P_TOKEN",
    "TOKEN",
    "P2P",
    "LLAMACPP_GRPC_SERVERS",
    cpumode.MODE_ENV,
    cpumode.CRASH_FAILPOINT_ENV,
    devices.DEV_ROOT_ENV,
)


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in _DOCTOR_ENV}
    full_env.update(env or {})
    return subprocess.run([*LOCALP2P, "doctor", *args], capture_output=True, text=True, env=full_env, timeout=120)


def lines_of(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in out.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def worker(log_dir: pathlib.Path) -> Iterator[tuple[Proc, str]]:
    proc, endpoint = start_worker(log_dir, name="doctor-worker")
    yield proc, endpoint
    proc.stop()


def test_healthy_setup_is_all_ok(worker: tuple[Proc, str], tmp_path: pathlib.Path) -> None:
    _, endpoint = worker
    env = {"LLAMACPP_GRPC_SERVERS": endpoint, devices.DEV_ROOT_ENV: str(tmp_path)}  # no GPU device nodes
    out = doctor("--address", f"127.0.0.1:{free_port()}", env=env)
    lines = lines_of(out)
    assert out.returncode == 0, out.stdout + out.stderr
    assert lines and all(line.startswith("[OK] ") for line in lines), lines
    text = out.stdout
    assert "built with RPC" in text
    assert "RPC protocol 7." in text
    assert str(embedded_model_path()) in text and "tensors" in text
    assert f"worker {endpoint}: protocol 7." in text
    assert "llama.cpp decodes on this CPU in CPU mode default" in text and cpumode.cpu_name() in text
    assert "llama.cpp devices: " in text and "a worker serves " in text
    assert "Traceback" not in out.stderr


def test_a_visible_gpu_without_a_backend_warns(tmp_path: pathlib.Path) -> None:
    if devices.GPU_BACKENDS.intersection(devices.backends()):
        pytest.skip("this llama.cpp build has a GPU backend")
    (tmp_path / "dri").mkdir()
    (tmp_path / "dri" / "renderD128").touch()
    (tmp_path / "kfd").touch()
    out = doctor("--address", f"127.0.0.1:{free_port()}", env={devices.DEV_ROOT_ENV: str(tmp_path)})
    warns = [line for line in lines_of(out) if line.startswith("[WARN] ")]
    assert out.returncode == 0, out.stdout
    assert len(warns) == 1, out.stdout
    assert "a GPU is visible" in warns[0] and "kfd" in warns[0] and "render node" in warns[0], warns[0]
    assert "built without a GPU backend" in warns[0] and "LOCALP2P_GPU=" in warns[0], warns[0]
    assert any(line.startswith("[OK] llama.cpp devices: CPU (") for line in lines_of(out)), out.stdout


def _cpu_line(out: subprocess.CompletedProcess[str]) -> str:
    return next(line for line in lines_of(out) if "decoding one token" in line or "decodes on this CPU" in line)


def test_a_crash_in_a_cpu_fast_path_fails_naming_cause_and_fix() -> None:
    out = doctor("--address", f"127.0.0.1:{free_port()}", env={cpumode.CRASH_FAILPOINT_ENV: "1"})
    line = _cpu_line(out)
    assert out.returncode == 1
    assert line.startswith("[FAIL] ") and "SIGSEGV" in line, line
    assert "works in safe mode" in line and "--cpu-mode safe" in line, line
    assert "Traceback" not in out.stderr


def test_a_crash_in_safe_mode_too_says_to_rebuild_portable() -> None:
    out = doctor("--address", f"127.0.0.1:{free_port()}", env={cpumode.CRASH_FAILPOINT_ENV: "always"})
    line = _cpu_line(out)
    assert out.returncode == 1
    assert line.startswith("[FAIL] ") and "in safe mode too" in line and "GGML_NATIVE=OFF" in line, line


def test_missing_model_file_fails_naming_it(tmp_path: pathlib.Path) -> None:
    (tmp_path / "broken.yaml").write_text("name: broken\nparameters:\n  model: no-such-weights.gguf\n")
    out = doctor("--models-path", str(tmp_path), "--address", f"127.0.0.1:{free_port()}")
    fails = [line for line in lines_of(out) if line.startswith("[FAIL] ")]
    assert out.returncode != 0
    assert len(fails) == 1 and "no-such-weights.gguf" in fails[0], out.stdout
    # The other checks still ran.
    assert any(line.startswith("[OK] ") and "RPC protocol" in line for line in lines_of(out))
    assert "Traceback" not in out.stderr


def test_malformed_yaml_and_a_fake_gguf_fail(tmp_path: pathlib.Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    out = doctor("--models-path", str(tmp_path), "--address", f"127.0.0.1:{free_port()}")
    assert out.returncode != 0
    assert any(line.startswith("[FAIL] ") and "bad.yaml" in line for line in lines_of(out)), out.stdout

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "fake.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 8)  # right magic, broken header
    out = doctor("--models-path", str(fake), "--address", f"127.0.0.1:{free_port()}")
    assert out.returncode != 0
    assert any(line.startswith("[FAIL] ") and "fake.gguf" in line for line in lines_of(out)), out.stdout


def test_models_path_with_valid_yaml_is_ok(tmp_path: pathlib.Path) -> None:
    (tmp_path / "chat.yaml").write_text(f"name: chat\nparameters:\n  model: {embedded_model_path()}\n")
    out = doctor("--models-path", str(tmp_path), "--address", f"127.0.0.1:{free_port()}")
    assert out.returncode == 0, out.stdout
    assert any(line.startswith("[OK] model chat: ") for line in lines_of(out)), out.stdout


def test_unreachable_worker_fails_naming_it() -> None:
    dead = f"127.0.0.1:{free_port()}"
    out = doctor("--address", f"127.0.0.1:{free_port()}", env={"LLAMACPP_GRPC_SERVERS": dead})
    fails = [line for line in lines_of(out) if line.startswith("[FAIL] ")]
    assert out.returncode != 0
    assert len(fails) == 1 and dead in fails[0], out.stdout


def test_port_in_use_is_a_warning_not_a_failure() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        out = doctor("--address", address)
    warns = [line for line in lines_of(out) if line.startswith("[WARN] ")]
    assert out.returncode == 0, out.stdout
    assert len(warns) == 1 and address in warns[0] and "localp2p status" in warns[0], out.stdout


def test_token_is_checked_and_mdns_reported() -> None:
    good = doctor("--address", f"127.0.0.1:{free_port()}", env={"TOKEN": new_token()})
    assert good.returncode == 0, good.stdout
    assert any(line.startswith("[OK] network token is well-formed") for line in lines_of(good)), good.stdout
    # mDNS is usable or not depending on the machine; either way it is reported, never a FAIL.
    assert any(line.startswith(("[OK] mDNS", "[WARN] mDNS")) for line in lines_of(good)), good.stdout

    bad = doctor("--address", f"127.0.0.1:{free_port()}", "--p2ptoken", "lp2p1.not-a-token")
    fails = [line for line in lines_of(bad) if line.startswith("[FAIL] ")]
    assert bad.returncode != 0
    assert len(fails) == 1 and "network token" in fails[0] and "not-a-token" not in fails[0], bad.stdout
