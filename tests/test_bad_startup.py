"""Issue 2 acceptance: a bad start-up gives one clear line and a non-zero exit, never a traceback;
an unreachable or version-mismatched rpc-server is skipped with a warning that names it."""

from __future__ import annotations

import contextlib
import pathlib
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator

import pytest

from localp2p.llama import rpc
from localp2p.testing.cluster import LOCALP2P, free_port, start_server, start_worker


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [*LOCALP2P, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def _assert_one_line_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("localp2p: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_model_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "m.yaml").write_text("name: m\nparameters:\n  model: nowhere.gguf\n")
    _assert_one_line_failure(_run(["run", "--models-path", str(tmp_path)]), "model file not found", "nowhere.gguf")


def test_file_that_is_not_gguf(tmp_path: pathlib.Path) -> None:
    (tmp_path / "fake.gguf").write_text("this is not a model\n")
    _assert_one_line_failure(_run(["run", "--models-path", str(tmp_path)]), "not a GGUF", "fake.gguf")


def test_malformed_yaml(tmp_path: pathlib.Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: [unclosed\nparameters: {model: x.gguf\n")
    _assert_one_line_failure(_run(["run", "--models-path", str(tmp_path)]), "malformed YAML", "bad.yaml")


def test_yaml_without_model(tmp_path: pathlib.Path) -> None:
    (tmp_path / "m.yaml").write_text("name: m\ncontext_size: 512\n")
    _assert_one_line_failure(_run(["run", "--models-path", str(tmp_path)]), "parameters.model")


def test_models_path_missing(tmp_path: pathlib.Path) -> None:
    _assert_one_line_failure(_run(["run", "--models-path", str(tmp_path / "nope")]), "not a directory")


def test_bad_rpc_server_list() -> None:
    _assert_one_line_failure(_run(["run"], env={"LLAMACPP_GRPC_SERVERS": "host-without-port"}), "LLAMACPP_GRPC_SERVERS")


def test_http_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run(["run", "--address", f"127.0.0.1:{port}"])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr.strip().splitlines()[-1]


def test_worker_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _assert_one_line_failure(_run(["worker", "llama-cpp-rpc", "127.0.0.1", str(port)]), f"127.0.0.1:{port}")


def test_bad_cli_values() -> None:
    result = _run(["worker", "llama-cpp-rpc", "127.0.0.1", "99999"])
    assert result.returncode == 2 and "Traceback" not in result.stderr and "not a TCP port" in result.stderr


@contextlib.contextmanager
def _old_rpc_server() -> Iterator[str]:
    """A TCP server that answers HELLO like an rpc-server of protocol 6.0.0 (a real peer on a real socket)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                with contextlib.suppress(OSError):
                    conn.recv(1 + 8 + rpc.CONN_CAPS_SIZE)
                    conn.sendall(struct.pack("<Q", 4 + rpc.CONN_CAPS_SIZE) + bytes([6, 0, 0, 0]) + bytes(rpc.CONN_CAPS_SIZE))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_probe_rejects_old_protocol() -> None:
    with _old_rpc_server() as endpoint:
        with pytest.raises(rpc.RPCError, match=r"protocol 6\.0\.0"):
            rpc.probe(endpoint)


def test_unreachable_and_mismatched_servers_are_skipped(tmp_path: pathlib.Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    worker, good = start_worker(tmp_path, name="good-worker")
    try:
        with _old_rpc_server() as old:
            server = start_server(tmp_path, rpc_servers=[dead, old, good], name="skip-server")
            try:
                log = server.proc.stderr()
                for endpoint, reason in ((dead, "refused"), (old, "protocol 6.0.0")):
                    line = next(line for line in log.splitlines() if "skipping rpc-server" in line and endpoint in line)
                    assert reason in line, line
                devices = {d["endpoint"]: d for d in server.status()["devices"]}
                assert devices[dead]["used"] is False and devices[old]["used"] is False
                assert devices[good]["used"] is True and devices[good]["layers"] == 30
                assert server.chat("What is 2+2?", max_tokens=8).status_code == 200
            finally:
                server.close()
    finally:
        worker.stop()


def test_all_servers_unreachable_loads_locally(tmp_path: pathlib.Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    server = start_server(tmp_path, rpc_servers=[dead], name="local-fallback")
    try:
        status = server.status()
        assert status["layers"]["local"] == 30 and status["devices"][0]["used"] is False
        assert server.chat("What is 2+2?", max_tokens=8).status_code == 200
    finally:
        server.close()


# --- issue 6: bad configuration in p2p mode (`run --p2p`, `worker p2p-llama-cpp-rpc`) ----------

_NO_TOKEN_ENV = {"TOKEN": "", "P2P_TOKEN": "", "LLAMACPP_GRPC_SERVERS": ""}


def _token() -> str:
    return _run(["token", "new"]).stdout.strip()


def _p2p_run(tmp_path: pathlib.Path, *extra: str) -> list[str]:
    return ["run", "--p2p", "--p2ptoken", _token(), "--address", f"127.0.0.1:{free_port()}", "--p2p-no-mdns",
            "--state-dir", str(tmp_path / "state"), *extra]


def _p2p_worker(tmp_path: pathlib.Path, *extra: str, token: str | None = None) -> list[str]:
    return ["worker", "p2p-llama-cpp-rpc", "--token", token or _token(), "--threads", "1", "--p2p-no-mdns",
            "--p2p-listen", "/ip4/127.0.0.1/tcp/0", *(["--state-dir", str(tmp_path / "state")] if "--state-dir" not in extra else []),
            *extra]


def test_p2p_run_missing_model(tmp_path: pathlib.Path) -> None:
    (tmp_path / "m.yaml").write_text("name: m\nparameters:\n  model: nowhere.gguf\n")
    result = _run(_p2p_run(tmp_path, "--models-path", str(tmp_path)), env=_NO_TOKEN_ENV)
    _assert_one_line_failure(result, "model file not found", "nowhere.gguf")


def _assert_fails_with_last_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A failure found after start-up began: logs may precede it, the last line is the one error."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("localp2p: error: "), result.stderr[-2000:]
    assert result.stderr.count("localp2p: error: ") == 1
    for needle in needles:
        assert needle in last, last


def test_p2p_run_corrupt_model_and_malformed_yaml(tmp_path: pathlib.Path) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    # GGUF magic, then garbage: passes the cheap check, fails when llama.cpp reads it.
    (corrupt / "fake.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 61)
    result = _run(_p2p_run(tmp_path, "--models-path", str(corrupt)), env=_NO_TOKEN_ENV)
    _assert_fails_with_last_line(result, "fake.gguf")
    malformed = tmp_path / "malformed"
    malformed.mkdir()
    (malformed / "bad.yaml").write_text("name: [unclosed\n")
    _assert_one_line_failure(_run(_p2p_run(tmp_path, "--models-path", str(malformed)), env=_NO_TOKEN_ENV), "malformed YAML")


def test_p2p_run_http_port_in_use(tmp_path: pathlib.Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = _p2p_run(tmp_path)
        args[args.index("--address") + 1] = f"127.0.0.1:{port}"
        _assert_one_line_failure(_run(args, env=_NO_TOKEN_ENV), f"cannot listen on 127.0.0.1:{port}")


def test_p2p_state_dir_not_writable(tmp_path: pathlib.Path) -> None:
    """A state dir below a regular file cannot be created (even root cannot: ENOTDIR)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    state = str(blocker / "state")
    _assert_fails_with_last_line(_run([*_p2p_run(tmp_path), "--state-dir", state], env=_NO_TOKEN_ENV), state)
    worker = _run(_p2p_worker(tmp_path, "--state-dir", state), env=_NO_TOKEN_ENV)
    _assert_fails_with_last_line(worker, state)


def test_p2p_corrupt_identity(tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "worker-identity.key").write_bytes(b"\x00garbage")
    (state / "server-identity.key").write_bytes(b"\x00garbage")
    _assert_fails_with_last_line(_run(_p2p_worker(tmp_path), env=_NO_TOKEN_ENV), "identity", "corrupt")
    _assert_fails_with_last_line(_run(_p2p_run(tmp_path), env=_NO_TOKEN_ENV), "identity", "corrupt")


def test_p2p_worker_bad_or_missing_token(tmp_path: pathlib.Path) -> None:
    _assert_one_line_failure(_run(_p2p_worker(tmp_path, token="lp2p1.AAAA"), env=_NO_TOKEN_ENV), "network token")
    _assert_one_line_failure(_run(_p2p_worker(tmp_path, token="not-a-token"), env=_NO_TOKEN_ENV), "network token")
    no_token = [a for a in _p2p_worker(tmp_path) if a != "--token"]
    no_token.remove(next(a for a in no_token if a.startswith("lp2p1.")))
    _assert_one_line_failure(_run(no_token, env=_NO_TOKEN_ENV), "no network token")


def test_p2p_worker_listen_port_in_use(tmp_path: pathlib.Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = _p2p_worker(tmp_path)
        args[args.index("--p2p-listen") + 1] = f"/ip4/127.0.0.1/tcp/{port}"
        _assert_fails_with_last_line(_run(args, env=_NO_TOKEN_ENV), "cannot listen for p2p")
