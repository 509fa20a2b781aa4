"""Issue 13: --log-format and --log-level work before and after the subcommand (nested ones too),
with LOCALP2P_LOG_FORMAT / LOCALP2P_LOG_LEVEL as defaults."""

from __future__ import annotations

import os
import pathlib
import subprocess
from typing import Any

import pytest

from localp2p.testing.cluster import LOCALP2P, json_log_lines, start_server

#: Seconds a command that only parses, logs one line and exits may take on a busy 2-core machine.
QUICK_TIMEOUT = 60
#: Both log variables cleared, so only what a test passes counts.
NO_LOG_ENV = {"LOCALP2P_LOG_FORMAT": "", "LOCALP2P_LOG_LEVEL": ""}


def _localp2p(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOCALP2P, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=QUICK_TIMEOUT,
        env={**os.environ, **NO_LOG_ENV, **(env or {})},
    )


def _starting(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The debug "starting" line every command logs first, without what varies per run; every
    stderr line but a final one-line error must be JSON."""
    lines = json_log_lines("\n".join(line for line in result.stderr.splitlines() if not line.startswith("localp2p: error:")))
    starting = [line for line in lines if line.get("event") == "starting"]
    assert len(starting) == 1, result.stderr
    return {k: v for k, v in starting[0].items() if k not in ("timestamp", "pid")}


# Each command: the log flags before the subcommand, after it, and (nested) between its words.
PLACEMENTS = {
    "token new": (
        ["--log-format", "json", "--log-level", "debug", "token", "new"],
        ["token", "new", "--log-format", "json", "--log-level", "debug"],
        ["token", "--log-format", "json", "new", "--log-level", "debug"],
    ),
    "worker p2p-llama-cpp-rpc": (  # no token: it logs "starting", then fails with one line
        ["--log-format", "json", "--log-level", "debug", "worker", "p2p-llama-cpp-rpc"],
        ["worker", "p2p-llama-cpp-rpc", "--log-format", "json", "--log-level", "debug"],
        ["worker", "--log-level", "debug", "p2p-llama-cpp-rpc", "--log-format", "json"],
    ),
}


@pytest.mark.parametrize("command", list(PLACEMENTS))
def test_every_placement_gives_the_same_json_debug_log(command: str) -> None:
    results = [_localp2p(args, {"TOKEN": "", "P2P_TOKEN": ""}) for args in PLACEMENTS[command]]
    for result in results:
        assert "Traceback" not in result.stderr and "unrecognized arguments" not in result.stderr, result.stderr
    codes = {result.returncode for result in results}
    assert len(codes) == 1, [(r.returncode, r.stderr) for r in results]
    starting = [_starting(result) for result in results]
    assert starting[0] == {"event": "starting", "level": "debug", "command": command.split(maxsplit=1)[0], "version": starting[0]["version"]}
    assert all(line == starting[0] for line in starting)


def test_env_defaults_still_apply_and_a_flag_after_the_subcommand_overrides_them() -> None:
    from_env = _localp2p(["token", "new"], {"LOCALP2P_LOG_FORMAT": "json", "LOCALP2P_LOG_LEVEL": "debug"})
    assert from_env.returncode == 0
    assert _starting(from_env)["level"] == "debug"

    overridden = _localp2p(["token", "new", "--log-level", "info"], {"LOCALP2P_LOG_FORMAT": "json", "LOCALP2P_LOG_LEVEL": "debug"})
    assert overridden.returncode == 0 and "starting" not in overridden.stderr

    console = _localp2p(["token", "new", "--log-format", "console", "--log-level", "debug"], {"LOCALP2P_LOG_FORMAT": "json"})
    assert console.returncode == 0 and "starting" in console.stderr
    with pytest.raises(AssertionError, match="not JSON"):
        json_log_lines(console.stderr)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["run", "--log-format", "bogus"], "--log-format"),
        (["worker", "p2p-llama-cpp-rpc", "--log-level", "loud"], "--log-level"),
    ],
)
def test_a_bad_value_after_the_subcommand_is_a_one_line_error(args: list[str], flag: str) -> None:
    result = _localp2p(args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"error: argument {flag}: invalid choice" in lines[0], lines[0]


def test_run_logs_json_when_the_flag_comes_after_run(tmp_path: pathlib.Path) -> None:
    """A real server: every stderr line, its backend's included, is JSON (cluster.Proc sets
    LOCALP2P_LOG_FORMAT=console, so the flag overrides the environment)."""
    server = start_server(tmp_path, "--log-format", "json", "--log-level", "debug", name="json-after-run")
    try:
        assert server.http.get("/healthz").status_code == 200
    finally:
        server.close()
    lines = json_log_lines(server.proc.stderr())
    events = {line.get("event") for line in lines}
    assert {"starting", "listening", "ready"} <= events, events
    assert any(line.get("proc") == "backend" for line in lines), "the backend logs JSON too"
