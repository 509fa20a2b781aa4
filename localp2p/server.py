"""`localp2p run`: the HTTP API and the backend supervisor in one trio app."""

from __future__ import annotations

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
from localp2p.supervisor import REQUEST_READY_WAIT, BackendSupervisor

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
    app = create_app(supervisor)
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
        await nursery.start(supervisor.run)
        log.info("ready", model=supervisor.status.model, load_s=supervisor.status.load_seconds)
        task_status.started(urls)
