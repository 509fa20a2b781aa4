"""`localp2p run`: the HTTP API and the backend supervisor in one trio app."""

from __future__ import annotations

import functools
import pathlib
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from localp2p.api import create_app
from localp2p.config import ModelConfig
from localp2p.cpumode import CpuMode
from localp2p.errors import StartupError
from localp2p.llama.rpc import parse_endpoint
from localp2p.logs import get_logger
from localp2p.netutil import check_port_free
from localp2p.p2p.discovery import Candidate
from localp2p.p2p.federation import ServerDirectory, tee_candidates
from localp2p.p2p.network import CANDIDATE_BUFFER, Network, P2PSettings, run_network
from localp2p.server.admission import DEFAULT_MAX_QUEUE
from localp2p.server.failover import DEFAULT_FAILOVER_TIMEOUT
from localp2p.server.follow_workers import follow_worker_set
from localp2p.server.forwarding import Delegation, MeshService, PeerFirewall
from localp2p.server.supervisor import REQUEST_READY_WAIT, BackendSupervisor
from localp2p.server.weight_plan import WeightPlanner
from localp2p.server.worker_set import WorkerAttacher, WorkerSet

log = get_logger("server")

#: Seconds in-flight HTTP requests get to finish after SIGTERM/SIGINT (default of --shutdown-grace).
SHUTDOWN_GRACE = 10.0
#: After the grace: time to stop the backend (procutil.STOP_GRACE) and the p2p node, with a
#: margin; a graceful stop that takes longer than grace + this is forced.
SHUTDOWN_STOP_MARGIN = 20.0


@dataclass
class ServerSettings:
    address: str = "127.0.0.1:8080"
    models: dict[str, ModelConfig] = field(default_factory=dict)
    rpc_servers: tuple[str, ...] = ()
    threads: int = 0
    parallel: int = 0  # sequences the backend decodes together; 0: DEFAULT_PARALLEL
    ready_wait: float = REQUEST_READY_WAIT
    models_path: pathlib.Path | None = None
    p2p: P2PSettings | None = None
    min_workers: int = 0
    max_queue: int = DEFAULT_MAX_QUEUE
    shutdown_grace: float = SHUTDOWN_GRACE
    api_keys: tuple[str, ...] = ()  # any set: /v1/* and /api/* need one (localp2p.api.api_keys)
    protect_metrics: bool = False  # /metrics needs a key too
    cors_origins: tuple[str, ...] = ()  # origins browsers may call the API from ("*": any); empty: CORS off
    failover_timeout: float = DEFAULT_FAILOVER_TIMEOUT  # seconds to continue a generation after a backend failure; 0: off
    cpu_mode: CpuMode = CpuMode.DEFAULT  # llama.cpp's CPU fast paths (localp2p.cpumode); safe after a native crash
    firewall: PeerFirewall = field(default_factory=PeerFirewall)  # p2p: peers that may use the API over the network
    delegation: Delegation | None = None  # p2p: --delegate-to, every inference request goes to that provider

    @property
    def shutdown_limit(self) -> float:
        """Longest a graceful stop may take before it is forced."""
        return self.shutdown_grace + SHUTDOWN_STOP_MARGIN


def _hypercorn_config(address: str, grace: float = SHUTDOWN_GRACE) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [address]
    config.accesslog = None
    config.errorlog = None
    # _serve_http drains by itself and then cancels hypercorn; hypercorn's own drain
    # deadline must not cut requests first.
    config.graceful_timeout = grace + 1.0
    config.keep_alive_timeout = 30
    return config


async def serve(
    settings: ServerSettings,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until cancelled, or until a graceful stop after ``shutdown`` is set.

    ``task_status.started`` gets the bound URLs. The HTTP listener comes up first
    (``/healthz`` answers, ``/readyz`` says 503) while the backend starts and loads the
    default model. A failure of that first load raises StartupError; later backend
    failures are restarted by the supervisor. Once ``shutdown`` is set the listener
    closes, in-flight requests get up to ``settings.shutdown_grace`` seconds to finish, then the
    backend and the p2p node are stopped and this returns. Cancellation stops at once.
    A graceful stop may come before ready (the backend loading, ``min_workers`` not
    there yet): then this returns without ``task_status.started``, so callers that
    can be stopped that early await it rather than ``nursery.start`` it (localp2p.cli).
    """
    workers = WorkerSet() if settings.p2p is not None else None
    # p2p: before each load, the workers fill their tensor caches (own files, peers, this server).
    planner = (
        WeightPlanner(workers, settings.p2p.state_dir, lambda: app.state.network)
        if settings.p2p is not None and workers is not None
        else None
    )
    supervisor = BackendSupervisor(
        settings.models,
        rpc_servers=settings.rpc_servers,
        threads=settings.threads,
        parallel=settings.parallel,
        ready_wait=settings.ready_wait,
        max_queue=settings.max_queue,
        network_bytes=workers.bytes_sent if workers is not None else None,
        cpu_mode=settings.cpu_mode,
        prepare_weights=planner.prepare if planner is not None else None,
    )
    mesh = (
        MeshService(supervisor, firewall=settings.firewall, delegation=settings.delegation) if settings.p2p is not None else None
    )
    app = create_app(
        supervisor,
        {"workers": workers, "network": None, "failover_timeout": settings.failover_timeout},
        api_keys=settings.api_keys,
        protect_metrics=settings.protect_metrics,
        cors_origins=settings.cors_origins,
        mesh=mesh,
    )
    try:
        host, port = parse_endpoint(settings.address)
    except ValueError as exc:
        raise StartupError(f"--address: {exc}") from None
    check_port_free(host, port)
    async with trio.open_nursery() as nursery:
        grace = settings.shutdown_grace
        http = functools.partial(
            _serve_http, app, _hypercorn_config(settings.address, grace), shutdown, grace, nursery.cancel_scope
        )
        urls = await nursery.start(http)
        log.info(
            "listening",
            urls=urls,
            models=list(settings.models),
            rpc_servers=list(settings.rpc_servers) or None,
        )
        if settings.p2p is not None and workers is not None and mesh is not None:
            app.state.network = await _start_p2p(nursery, settings, supervisor, workers, mesh)
        await nursery.start(supervisor.run)
        log.info("ready", model=supervisor.status.model, load_s=supervisor.status.load_seconds)
        task_status.started(urls)


class RequestTracker:
    """ASGI wrapper that counts HTTP requests being served, so a graceful stop knows when
    the last one has handed its final bytes to the server (hypercorn alone waits for
    keep-alive connections that outlive a response finished during its drain)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.active = 0
        self._idle = trio.Event()
        self._idle.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.active += 1
        if self.active == 1:
            self._idle = trio.Event()
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


async def _serve_http(
    app: Any,
    config: HypercornConfig,
    shutdown: trio.Event | None,
    grace: float,
    server_scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP until cancelled, or until ``shutdown``: then stop accepting, give in-flight
    requests up to ``grace`` seconds, close every connection, and cancel
    ``server_scope`` (the whole server: the backend and the p2p node outlive every
    in-flight request, and no longer).
    """
    tracker = RequestTracker(app)
    trigger = shutdown.wait if shutdown is not None else None
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(functools.partial(hypercorn_serve, tracker, config, shutdown_trigger=trigger))
        task_status.started(urls)
        if shutdown is None:
            return
        await shutdown.wait()
        log.info("stopping: no new connections; finishing in-flight requests", in_flight=tracker.active, grace_s=grace)
        with trio.move_on_after(grace) as drain:
            await tracker.wait_idle()
        if drain.cancelled_caught:
            log.warning("shutdown grace is over; cutting requests still in flight", in_flight=tracker.active)
        nursery.cancel_scope.cancel()
    log.info("http server stopped; stopping the backend")
    server_scope.cancel()


async def _start_p2p(
    nursery: trio.Nursery, settings: ServerSettings, supervisor: BackendSupervisor, workers: WorkerSet, mesh: MeshService
) -> Network:
    """Join the network, attach workers as they are found, and keep the backend on them; serve
    the API to peers and keep the directory of the other servers (localp2p.server.forwarding).

    The server both provides the rendezvous keys (clients and other servers find it by them)
    and looks them up (workers, other servers)."""
    assert settings.p2p is not None
    network: Network = await nursery.start(
        functools.partial(
            run_network,
            settings.p2p,
            role="server",
            hello={"name": settings.p2p.name},
            advertise=True,
            search=True,
            install_handlers=mesh.install,
        )
    )
    mesh.directory = ServerDirectory(network.node, network.gate, network.links)
    to_workers, for_workers = trio.open_memory_channel[Candidate](CANDIDATE_BUFFER)
    to_servers, for_servers = trio.open_memory_channel[Candidate](CANDIDATE_BUFFER)
    nursery.start_soon(tee_candidates, network.candidates, to_workers, to_servers)
    await nursery.start(mesh.directory.run, for_servers)
    attacher = WorkerAttacher(network.node, network.gate, workers, network.links)
    await nursery.start(attacher.run, for_workers)
    if settings.min_workers:
        log.info("waiting for workers before loading the model", min_workers=settings.min_workers)
        await workers.wait_for(settings.min_workers)
    supervisor.request_reload((*settings.rpc_servers, *workers.endpoints()))
    await nursery.start(follow_worker_set, supervisor, workers, settings.rpc_servers)
    return network
