"""`localp2p run`: the HTTP API and the backend supervisor in one trio app."""

from __future__ import annotations

import functools
import pathlib
from dataclasses import dataclass, field

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from localp2p.api import create_app
from localp2p.config import ModelConfig
from localp2p.errors import StartupError
from localp2p.logs import get_logger
from localp2p.netutil import check_port_free
from localp2p.rpc import parse_endpoint
from localp2p.p2p.network import Network, P2PSettings, run_network
from localp2p.supervisor import REQUEST_READY_WAIT, BackendSupervisor, follow_worker_set
from localp2p.workers import WorkerAttacher, WorkerSet

log = get_logger("server")

#: Seconds in-flight HTTP requests get to finish after SIGTERM/SIGINT.
SHUTDOWN_GRACE = 10.0


@dataclass
class ServerSettings:
    address: str = "127.0.0.1:8080"
    models: dict[str, ModelConfig] = field(default_factory=dict)
    rpc_servers: tuple[str, ...] = ()
    threads: int = 0
    ready_wait: float = REQUEST_READY_WAIT
    models_path: pathlib.Path | None = None
    p2p: P2PSettings | None = None
    min_workers: int = 0


def _hypercorn_config(address: str) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [address]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = SHUTDOWN_GRACE
    config.keep_alive_timeout = 30
    return config


async def serve(settings: ServerSettings, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the server until cancelled. ``task_status.started`` gets the bound URLs.

    The HTTP listener comes up first (``/healthz`` answers, ``/readyz`` says 503)
    while the backend starts and loads the default model. A failure of that first
    load raises StartupError; later backend failures are restarted by the supervisor.
    """
    supervisor = BackendSupervisor(
        settings.models, rpc_servers=settings.rpc_servers, threads=settings.threads, ready_wait=settings.ready_wait
    )
    workers = WorkerSet() if settings.p2p is not None else None
    app = create_app(supervisor, {"workers": workers, "network": None})
    try:
        host, port = parse_endpoint(settings.address)
    except ValueError as exc:
        raise StartupError(f"--address: {exc}") from None
    check_port_free(host, port)
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(hypercorn_serve, app, _hypercorn_config(settings.address))
        log.info(
            "listening",
            urls=urls,
            models=list(settings.models),
            rpc_servers=list(settings.rpc_servers) or None,
        )
        if settings.p2p is not None and workers is not None:
            app.state.network = await _start_p2p(nursery, settings, supervisor, workers)
        await nursery.start(supervisor.run)
        log.info("ready", model=supervisor.status.model, load_s=supervisor.status.load_seconds)
        task_status.started(urls)


async def _start_p2p(
    nursery: trio.Nursery, settings: ServerSettings, supervisor: BackendSupervisor, workers: WorkerSet
) -> Network:
    """Join the network, attach workers as they are found, and keep the backend on them."""
    assert settings.p2p is not None
    network: Network = await nursery.start(
        functools.partial(run_network, settings.p2p, role="server", hello={"name": settings.p2p.name}, advertise=False)
    )
    attacher = WorkerAttacher(network.node, network.gate, workers)
    await nursery.start(attacher.run, network.candidates)
    if settings.min_workers:
        log.info("waiting for workers before loading the model", min_workers=settings.min_workers)
        await workers.wait_for(settings.min_workers)
    supervisor.request_reload((*settings.rpc_servers, *workers.endpoints()))
    await nursery.start(follow_worker_set, supervisor, workers, settings.rpc_servers)
    return network
