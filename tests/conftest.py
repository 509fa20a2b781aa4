"""Shared fixtures. The helpers in cluster.py start real processes; nothing is mocked."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from cluster import Proc, Server, start_server, start_worker


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
