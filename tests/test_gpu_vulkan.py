"""A worker on llama.cpp's Vulkan backend, on Mesa's software driver (lavapipe): `make test-gpu`.

Skipped in the normal suite: scripts/test-gpu.sh builds the Vulkan llama-cpp-python into
its own environment and points LOCALP2P_VULKAN_SITE at it; the worker here runs with that
build first on its path, the server and the CPU worker with the main (CPU) build.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator

import pytest

from localp2p.testing.cluster import Proc, Server, free_port, start_server, start_worker, stopped_on_error

SITE = os.environ.get("LOCALP2P_VULKAN_SITE")
#: lavapipe runs the layers on the CPU through LLVM: the answers test takes ~3 min on 2 busy cores.
pytestmark = [pytest.mark.skipif(not SITE, reason="needs the Vulkan build: `make test-gpu`"), pytest.mark.timeout(900)]

PROMPTS = [
    "Write a short story about a lighthouse keeper and a storm.",
    "List three facts about the Moon.",
]


def _vulkan_worker(log_dir: pathlib.Path) -> tuple[Proc, str]:
    port = free_port()
    env = {"PYTHONPATH": str(SITE)}
    proc = Proc(["worker", "llama-cpp-rpc", "127.0.0.1", str(port), "--threads", "2"], log_dir, "vulkan-worker", env)
    with stopped_on_error(proc):
        proc.ready_line = proc.wait_line("localp2p worker ready", timeout=180)
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def vulkan_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, str]]:
    proc, endpoint = _vulkan_worker(tmp_path_factory.mktemp("vulkan"))
    yield proc, endpoint
    proc.stop()


def _answer(server: Server, prompt: str) -> str:
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 48}
    reply = server.http.post("/v1/chat/completions", json=body, timeout=600)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def test_worker_serves_the_vulkan_device(vulkan_worker: tuple[Proc, str]) -> None:
    proc, _ = vulkan_worker
    assert " devices=Vulkan0(" in proc.ready_line, proc.ready_line
    assert "devices=CPU(" not in proc.ready_line


def test_temperature_zero_answer_through_vulkan_matches_cpu(vulkan_worker: tuple[Proc, str], tmp_path: pathlib.Path) -> None:
    _, vulkan_endpoint = vulkan_worker
    cpu_worker, cpu_endpoint = start_worker(tmp_path, name="cpu-worker")
    servers: list[Server] = []
    try:
        servers.append(start_server(tmp_path, rpc_servers=[cpu_endpoint], name="over-cpu-worker"))
        servers.append(start_server(tmp_path, rpc_servers=[vulkan_endpoint], name="over-vulkan-worker"))
        over_cpu, over_vulkan = servers
        report = []
        for prompt in PROMPTS:
            cpu, vulkan = _answer(over_cpu, prompt), _answer(over_vulkan, prompt)
            same = next((i for i, (a, b) in enumerate(zip(cpu, vulkan, strict=False)) if a != b), min(len(cpu), len(vulkan)))
            report.append({"prompt": prompt, "cpu": cpu, "vulkan": vulkan, "equal": cpu == vulkan, "common_prefix_chars": same})
        print(json.dumps(report, indent=2))
        assert all(r["equal"] for r in report), json.dumps(report, indent=2)
    finally:
        for server in servers:
            server.close()
        cpu_worker.stop()
