"""Shared fixtures. The helpers in cluster.py start real processes; nothing is mocked."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from cluster import Proc, Server, start_server, start_worker


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> pathlib.Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def two_workers(log_dir: pathlib.Path) -> Iterator[list[tuple[Proc, str]]]:
    workers = [start_worker(log_dir, name=f"worker{i}") for i in (1, 2)]
    yield workers
    for proc, _ in workers:
        proc.stop()


@pytest.fixture(scope="module")
def local_server(log_dir: pathlib.Path) -> Iterator[Server]:
    server = start_server(log_dir, name="local-server")
    yield server
    server.close()


@pytest.fixture(scope="module")
def distributed_server(log_dir: pathlib.Path, two_workers: list[tuple[Proc, str]]) -> Iterator[Server]:
    server = start_server(log_dir, rpc_servers=[endpoint for _, endpoint in two_workers], name="dist-server")
    yield server
    server.close()
