"""The backend supervisor of `localp2p run`: the llama.cpp backend as a supervised child.

The backend is a child because llama.cpp aborts its whole process when an RPC peer
fails; a backend that dies is restarted, and the trio app around it stays up.

This module owns the process lifecycle (start, load, restart with backoff, safe CPU mode
after a native crash) and the reload state machine (drain, restart on another list of
rpc-servers or for another model). Its helpers live beside it: the admission gate
(admission.py), load progress (load_progress.py), the states (backend_state.py), probes
of rpc-servers (rpc_probes.py), and the worker-set follower that requests reloads
(follow_workers.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

import trio

from localp2p import cpumode
from localp2p._proto import backend_pb2 as pb
from localp2p.config import DEFAULT_PARALLEL, RPC_SERVERS_ENV, ModelConfig
from localp2p.cpumode import CpuMode
from localp2p.errors import StartupError
from localp2p.logs import get_logger
from localp2p.procutil import (
    HEALTHY_AFTER,
    READY_POLL,
    RESTART_BACKOFF_MAX,
    RESTART_BACKOFF_MIN,
    ChildExited,
    python_module_argv,
    start_child,
    stop_child,
)
from localp2p.server.admission import DEFAULT_MAX_QUEUE, AdmissionGate
from localp2p.server.backend_client import BACKEND_FAILED, BackendClient, BackendError
from localp2p.server.backend_state import BackendState, BackendStatus
from localp2p.server.load_progress import LoadProgress, cached_load, follow_load, log_progress
from localp2p.server.rpc_probes import unreachable, wait_skipped_back

log = get_logger("supervisor")

#: Crashes in a row of a serving backend restarted at once, before the backoff starts: one
#: crash (a worker lost mid-request, a killed process) is no crash loop, and failing-over
#: requests wait for it. A backend that fails to start or load waits the backoff (a worker
#: whose rpc-server broke the load may be restarting it).
IMMEDIATE_BACKEND_RESTARTS = 1
#: Failed starts in a row (a process that did not start or load) after which a backend that
#: served before counts as FAILED: one is a worker that restarted its rpc-server mid-load, and
#: the retry after the backoff serves; three (two backoffs, 0.6 s, plus three starts) mean it
#: will not come back soon, and requests failing over give up at once instead of waiting
#: out --failover-timeout.
FAILED_AFTER_FAILED_STARTS = 3
#: Seconds a fresh backend process gets to answer Health.
BACKEND_START_TIMEOUT = 60.0
#: Default bound on how long a request waits for the backend to become ready.
REQUEST_READY_WAIT = 120.0
#: Longest a reload waits for in-flight requests before restarting the backend anyway.
DRAIN_TIMEOUT = 60.0
#: Seconds to wait for the exit code of a backend that broke mid-call (a gRPC error can
#: come a moment before the kernel reports the process dead).
CRASH_EXIT_WAIT = 1.0
#: Seconds a finished load waits for the workers' last fill reports (their fills ended when
#: llama.cpp took their last tensor; this only lets the final byte counts arrive).
FILL_REPORT_GRACE = 2.0


def model_options(model: ModelConfig, rpc_servers: Sequence[str], threads: int, parallel: int = 0) -> pb.ModelOptions:
    """The LoadModel request for ``model`` on ``rpc_servers`` (those the process registered);
    ``threads`` and ``parallel`` are the server-wide defaults the model's YAML overrides."""
    return pb.ModelOptions(
        Model=model.name,
        ModelFile=str(model.model_file),
        ContextSize=model.context_size,
        Threads=model.threads or threads,
        F16Memory=model.f16,
        MMap=model.mmap,
        TensorSplit=list(model.tensor_split),
        RPCServers=list(rpc_servers),
        OffloadOutput=model.offload_output,
        Embeddings=model.embeddings,
        ChatTemplate=model.chat_format,
        Parallel=model.parallel or parallel or DEFAULT_PARALLEL,
    )


class BackendSupervisor:
    """Owns the backend process: start, load, restart on crash, drain and reload on demand.

    The states (``status.state``, a BackendState) of one process, and between processes::

        STARTING --Health--> LOADING --loaded--> READY --reload wanted--> DRAINING --idle--> (next process)
                                                   |
                                                   +--process died--> RESTARTING --> (next process)

    A model switch whose rpc-servers are the current ones loads in place (READY ->
    LOADING -> READY, requests still admitted); any other switch, or a new list of
    rpc-servers (:meth:`request_reload`), is a reload. A start that fails is retried
    with backoff (:meth:`run`).

    Requests go through :meth:`session`, which waits (bounded) for a ready backend with
    the wanted model and counts the request as in flight, so a reload can drain them.
    """

    def __init__(
        self,
        models: Mapping[str, ModelConfig],
        *,
        rpc_servers: Sequence[str] = (),
        threads: int = 0,
        parallel: int = 0,
        ready_wait: float = REQUEST_READY_WAIT,
        env: Mapping[str, str] | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        network_bytes: Callable[[], int] | None = None,
        cpu_mode: CpuMode = CpuMode.DEFAULT,
        prepare_weights: Callable[..., Awaitable[None]] | None = None,
    ) -> None:
        self.models = dict(models)
        #: As each load starts: the workers' tensor caches filled (p2p: WeightPlanner.prepare, started
        #: with ``(model, endpoints, progress)``; it reports started(done event) once the load may begin).
        self._prepare_weights = prepare_weights
        #: Admitted (429 beyond ``max_queue``) and in-flight requests.
        self.admission = AdmissionGate(max_queue)
        #: Bytes sent to workers so far (p2p: the tunnels), to tell a cached load apart.
        self._network_bytes = network_bytes
        self.status = BackendStatus(cpu_mode=cpu_mode)
        #: Whether the current process has produced a token (a native crash before that may be
        #: a CPU fast path that does not work here: see _fall_back_to_safe_mode).
        self._generated = False
        #: Exit code of the last backend process that exited by itself (None: stopped by us).
        self._exit_code: int | None = None
        self._rpc_servers = tuple(rpc_servers)
        self._target = next(iter(self.models))
        self._threads = threads
        self._parallel = parallel
        self._ready_wait = ready_wait
        self._env = dict(env if env is not None else os.environ)
        self._client: BackendClient | None = None
        self._ready = False
        self._ready_changed = trio.Event()
        self._reload = trio.Event()
        #: Set when a reload is requested that adds an rpc-server the current process lacks.
        self._joined = trio.Event()
        #: Set by a reload request with ``rebind``: the next reload happens even when the
        #: running process already serves exactly the wanted rpc-servers.
        self._rebind = False
        #: The rpc-servers the current process was started with (and registered): what its
        #: loads must name. ``status.rpc_servers`` is what it runs on, which is less once
        #: servers it skipped as unreachable have left the worker set (see _watch_reload).
        self._bound: tuple[str, ...] = ()
        self._model_lock = trio.Lock()
        #: Starts in a row that failed (to start or to load) since a process last served.
        self._failed_starts = 0

    # -- state -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether requests may use the backend now (READY, or a model switched in place)."""
        return self._ready

    @property
    def max_queue(self) -> int:
        """Most requests admitted at once (0: no bound)."""
        return self.admission.max_queue

    @property
    def admitted(self) -> int:
        """Requests admitted right now: waiting for the backend or running."""
        return self.admission.admitted

    def _set_ready(self, ready: bool, state: BackendState) -> None:
        """Set the state; wake the requests waiting for a ready backend when readiness
        changes or the backend goes FAILED (they stop waiting then: see session)."""
        entering_failed = state is BackendState.FAILED and self.status.state is not BackendState.FAILED
        self.status.state = state
        if ready != self._ready or entering_failed:
            self._ready = ready
            self._ready_changed.set()
            self._ready_changed = trio.Event()

    def _set_starting(self, state: BackendState) -> None:
        """Enter STARTING or LOADING for a new process; FAILED stays until a start serves."""
        if self.status.state is not BackendState.FAILED:
            self._set_ready(False, state)

    def _note_failed_start(self) -> None:
        """Count a start that failed; the FAILED_AFTER_FAILED_STARTS-th in a row makes the state FAILED."""
        self._failed_starts += 1
        if self._failed_starts >= FAILED_AFTER_FAILED_STARTS and self.status.state is not BackendState.FAILED:
            log.error(
                "backend is down: its starts keep failing; retrying with backoff",
                failed_starts=self._failed_starts,
                error=self.status.last_error,
            )
            self._set_ready(False, BackendState.FAILED)

    def note_generated(self) -> None:
        """A request got a token from the current backend process."""
        self._generated = True

    def servers_for(self, model: str) -> tuple[str, ...]:
        """The rpc-servers a model loads on: its YAML ``rpc_servers``, else the cluster's."""
        return self.models[model].rpc_servers or self._rpc_servers

    def request_reload(self, rpc_servers: Sequence[str], *, rebind: bool = False) -> None:
        """Restart the backend with another list of rpc-servers once in-flight requests end
        (at once when the process is still loading and the list gained a worker).

        ``rebind``: restart even when the list is the same, because a tunnel has a better
        path now (a worker's link moved from a relay to a direct one): the connections the
        running process opened stay on the old path until it ends; the next one's open on
        the new path. A process still loading stops at once (its load crosses the relay).
        """
        self._rpc_servers = tuple(rpc_servers)
        wanted = self.servers_for(self._target)
        if rebind and set(wanted) & set(self.status.rpc_servers):
            self._rebind = True
            self._reload.set()
            self._joined.set()
        elif wanted != self.status.rpc_servers:
            self._reload.set()
            if set(wanted) - set(self.status.rpc_servers):
                self._joined.set()

    # -- the process -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a backend process running with the current model loaded, forever.

        ``task_status.started()`` comes after the first successful model load; failing
        that first start raises StartupError (a bad model must stop `run` with one line),
        unless rpc-servers it loaded on stopped answering (a worker lost mid-load: it is
        restarted like a later crash).
        Later crashes are restarted with backoff (see IMMEDIATE_BACKEND_RESTARTS); a
        planned reload (drained for a new worker set or model) starts the next process at
        once, is not a restart, and ends a row of crashes (the backoff starts over: a
        worker lost now and then is no crash loop). After FAILED_AFTER_FAILED_STARTS
        failed starts in a row the state is FAILED until a start serves again.
        Cancellation stops the process.
        """
        started = [False]  # task_status.started() was called (by _run_once)
        backoff = RESTART_BACKOFF_MIN
        crashes = 0  # in a row
        with tempfile.TemporaryDirectory(prefix="localp2p-backend-") as tmp:
            socket_path = pathlib.Path(tmp) / "backend.sock"
            while True:
                up_since = time.monotonic()
                served = False  # the process crashed after it was ready
                try:
                    if await self._run_once(socket_path, None if started[0] else task_status, started):
                        backoff, crashes = RESTART_BACKOFF_MIN, 0
                        continue
                    served = True
                    safe_restart = await self._fall_back_to_safe_mode()
                except (ChildExited, BackendError, trio.TooSlowError) as exc:
                    message = str(exc) or type(exc).__name__
                    self.status.last_error = message
                    safe_restart = await self._fall_back_to_safe_mode()
                    if not started[0] and not safe_restart:
                        lost = await unreachable(self._bound) if self._bound else []
                        if not lost:  # the model, the machine: say so and stop
                            raise StartupError(message) from None
                        # A worker went away during the first load (its fill now overlaps the
                        # load): a network fault, not a bad model; load again on the others.
                        log.warning("the first load lost rpc-servers; loading again", lost=lost)
                    log.error("backend failed", error=message)
                    self._note_failed_start()
                self.status.restarts += 1
                if safe_restart:
                    continue  # at once: the request that hit the crash waits for it
                crashes += 1
                if time.monotonic() - up_since > HEALTHY_AFTER:
                    backoff, crashes = RESTART_BACKOFF_MIN, 1
                if not served or crashes > IMMEDIATE_BACKEND_RESTARTS:
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, RESTART_BACKOFF_MAX)

    async def _run_once(
        self, socket_path: pathlib.Path, task_status: trio.TaskStatus[None] | None, started: list[bool]
    ) -> bool:
        """One backend process from start to exit; True when it was drained for a reload.

        Calls ``task_status.started()`` (when given) once the model is loaded and notes
        that in ``started[0]``; leaves the exit code of a process that died by itself
        in ``_exit_code``. Raises ChildExited, BackendError or TooSlowError when the
        process fails to start or to load (nothing once it served).
        """
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        self.status.rpc_servers = self._bound = self.servers_for(self._target)
        self._generated, self._exit_code = False, None
        env = cpumode.child_env(self.status.cpu_mode, self._env)
        env[RPC_SERVERS_ENV] = ",".join(self.status.rpc_servers)
        self._reload = trio.Event()
        self._joined = trio.Event()
        self._rebind = False  # this process opens its rpc connections afresh
        self._set_starting(BackendState.STARTING)
        process = await start_child(python_module_argv("backends.llama_cpp", "--addr", f"unix:{socket_path}"), env)
        self.status.pid = process.pid
        client = BackendClient(f"unix:{socket_path}")
        try:
            await self._wait_healthy(process, socket_path)
            self._set_starting(BackendState.LOADING)
            if task_status is not None:  # the first load: `run` reports ready (or fails) after it
                await self._load(client, self._target)
            elif not await self._load_unless_joined(client):
                log.info(
                    "a worker joined (or its link moved off a relay) during the load; reloading at once",
                    rpc_servers=list(self.servers_for(self._target)),
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()  # its load is worth nothing now; SIGTERM would wait for it
                return True
            self._client = client
            if self._failed_starts:
                log.info("backend serves again", failed_starts=self._failed_starts)
            self._failed_starts = 0
            self._set_ready(True, BackendState.READY)
            if task_status is not None:
                task_status.started()
                started[0] = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_reload, process)
                nursery.start_soon(self._watch_skipped)
                code = await process.wait()
                nursery.cancel_scope.cancel()
            if self.status.state is BackendState.DRAINING:
                return True
            self.status.last_error = f"backend process exited with code {code}"
            log.error("backend process died; restarting it", code=code, restarts=self.status.restarts + 1)
            self._set_ready(False, BackendState.RESTARTING)
            return False
        except BackendError as exc:
            if exc.code == BACKEND_FAILED:  # the process broke mid-call: learn how it ended
                with trio.move_on_after(CRASH_EXIT_WAIT):
                    await process.wait()
            raise
        finally:
            self._client = None
            if self.status.state is BackendState.READY:
                self._set_ready(False, BackendState.RESTARTING)
            client.close()
            self._exit_code = process.returncode  # None while it runs: stopped below, by us
            await stop_child(process)
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()

    async def _fall_back_to_safe_mode(self) -> bool:
        """After a backend process ended without being asked to: switch to safe CPU mode?

        Yes (and switched, logged, shown in ``/api/status``) when it died of a native crash
        (SIGSEGV, SIGILL, SIGBUS) before producing its first token, outside safe mode, and
        every rpc-server it ran on still answers: then the likely cause is a CPU fast path
        of llama.cpp that does not work on this machine (llama.cpp #20824: AMX). A lost
        worker explains a crash by itself and keeps the ordinary restart.
        """
        code = self._exit_code
        if self.status.cpu_mode is CpuMode.SAFE or self._generated or code is None or not cpumode.is_native_crash(code):
            return False
        lost = await unreachable(self._bound)
        if lost:
            log.warning(
                "backend crashed after losing rpc-servers; restarting as usual", signal=cpumode.signal_name(code), lost=lost
            )
            return False
        reason = (
            f"the backend died of {cpumode.signal_name(code)} before its first token "
            f"in CPU mode {self.status.cpu_mode.value} on {cpumode.cpu_name()}"
        )
        self.status.cpu_mode, self.status.cpu_mode_reason = CpuMode.SAFE, reason
        log.error(
            "SAFE MODE: llama.cpp crashed in its CPU code; restarting the backend in safe CPU mode (slower)",
            reason=reason,
            mode=CpuMode.SAFE.describe(),
            hint="`localp2p doctor` checks this CPU; --cpu-mode safe starts in safe mode",
        )
        return True

    async def _wait_healthy(self, process: trio.Process, socket_path: pathlib.Path) -> None:
        """Return once the fresh backend answers Health; ChildExited or TooSlowError otherwise.

        Each try uses its own channel, made once the socket exists: a gRPC channel whose
        first connection failed waits out a reconnect backoff (about 1 s) before the next,
        which would delay every backend start by that much.
        """
        with trio.fail_after(BACKEND_START_TIMEOUT):
            while True:
                if process.returncode is not None:
                    raise ChildExited(f"backend process exited with code {process.returncode} during start-up")
                if socket_path.exists():
                    probe = BackendClient(f"unix:{socket_path}")
                    try:
                        if await probe.health():
                            return
                    finally:
                        probe.close()
                await trio.sleep(READY_POLL)

    # -- loading -----------------------------------------------------------------------

    async def _load_unless_joined(self, client: BackendClient) -> bool:
        """Load the target model, unless a worker joins meanwhile: then stop and return False.

        A load that leaves out a worker that has just joined would be thrown away by the
        reload that follows it; the reload starting at once saves the rest of the load.
        Raises what :meth:`_load` raises.
        """
        failed: Exception | None = None
        with trio.CancelScope() as load_scope:
            async with trio.open_nursery() as nursery:

                async def preempt() -> None:
                    await self._joined.wait()
                    load_scope.cancel()

                nursery.start_soon(preempt)
                try:
                    await self._load(client, self._target)
                except Exception as exc:  # raised outside the nursery, not wrapped in an ExceptionGroup (see _load)
                    failed = exc
                nursery.cancel_scope.cancel()
        if failed is not None:
            raise failed
        return not load_scope.cancelled_caught

    async def _load(self, client: BackendClient, name: str) -> None:
        """Load model ``name`` in the backend behind ``client``, following its progress.

        Raises BackendError when the load fails (the backend's message) or the process broke.
        """
        model = self.models[name]
        started = time.monotonic()
        progress = self.status.load_progress = LoadProgress(active=True, started=started)
        network_start = self._network_bytes() if self._network_bytes is not None else None
        log.info("loading model", model=name, rpc_servers=list(self.status.rpc_servers) or None)
        failed: BackendError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_load, name, progress, functools.partial(self.refresh_status, client))
            try:
                fills: trio.Event | None = None
                if self._prepare_weights is not None:  # returns once the workers have their plans
                    fills = await nursery.start(self._prepare_weights, model, self._bound, progress)
                result = await client.load_model(model_options(model, self._bound, self._threads, self._parallel))
                if fills is not None:  # the workers' last fill reports (llama.cpp has every tensor by now)
                    with trio.move_on_after(FILL_REPORT_GRACE):
                        await fills.wait()
            except BackendError as exc:
                # Raised outside the nursery: from inside it would come out wrapped in an
                # ExceptionGroup, past run()'s restart (a worker lost mid-load ended the server).
                failed = exc
            finally:
                nursery.cancel_scope.cancel()
                progress.active = False
                progress.seconds = time.monotonic() - started
        if failed is not None:
            raise failed
        if not result.success:
            raise BackendError(500, result.message)
        progress.fraction = 1.0
        self.status.model = name
        self.status.load_seconds = round(time.monotonic() - started, 3)
        await self.refresh_status(client)
        if network_start is not None and self._network_bytes is not None:
            progress.network_bytes = self._network_bytes() - network_start + progress.fetched_bytes()
            progress.from_cache = cached_load(progress, self.status.layers_total, self.status.layers_local)
        log_progress(name, progress, "model loaded")

    async def refresh_status(self, client: BackendClient | None = None) -> BackendStatus:
        """Ask the backend for its devices, layers and load progress (best effort) and return the status."""
        client = client or self._client
        if client is not None:
            try:
                reply = await client.status()
            except BackendError:
                return self.status
            self.status.devices = [
                {
                    "endpoint": d.endpoint,
                    "memory_free": d.memory_free,
                    "memory_total": d.memory_total,
                    "layers": d.layers,
                    "used": d.used,
                    "skipped_reason": d.skipped_reason,
                }
                for d in reply.devices
            ]
            self.status.layers_total = reply.layers_total
            self.status.layers_local = reply.layers_local
            if reply.weight_buffers:
                self.status.weight_buffers = {k: round(v, 2) for k, v in sorted(reply.weight_buffers.items())}
            self.status.load_progress.note_status(reply)
        return self.status

    # -- reloads -----------------------------------------------------------------------

    def _serves_wanted(self) -> bool:
        """Whether the running backend already is what a reload would start: the target model
        on exactly the wanted rpc-servers. It is when the only ones it lacks are those it
        skipped as unreachable at its start and that have left the wanted list since (a
        backend restarted after a crash, before the dead worker was dropped from the set)."""
        if self.status.model != self._target or self._rebind:
            return False
        used = tuple(str(d["endpoint"]) for d in self.status.devices if d["used"])
        return used == self.servers_for(self._target)

    async def _watch_reload(self, process: trio.Process) -> None:
        """While ``process`` serves: on a reload request that changes something, drain and stop it.

        Waits up to DRAIN_TIMEOUT s for the requests in flight, then stops the process
        anyway; ``_run_once`` sees DRAINING and starts the next one at once.
        """
        while True:
            await self._reload.wait()
            if not self._serves_wanted():
                break
            self.status.rpc_servers = self.servers_for(self._target)
            log.info(
                "worker set changed; the backend already runs on exactly these workers",
                rpc_servers=list(self.servers_for(self._target)),
            )
            self._reload = trio.Event()
        log.info(
            "reloading backend",
            rpc_servers=list(self.status.rpc_servers),
            in_flight=self.admission.in_flight,
            reason="a link moved off a relay" if self._rebind else "worker set or model changed",
        )
        self._set_ready(False, BackendState.DRAINING)
        with trio.move_on_after(DRAIN_TIMEOUT) as drain:
            await self.admission.wait_idle()
        if drain.cancelled_caught:
            log.warning("drain timed out; restarting with requests in flight", in_flight=self.admission.in_flight)
        await stop_child(process)

    async def _watch_skipped(self) -> None:
        """Request a reload once a wanted rpc-server that this process skipped answers again.

        A backend started while a worker's rpc-server was down for a moment (restarted by
        its worker, e.g. after a crash or by the tensor-cache guard) runs without that
        worker although the worker set still lists it, and nothing else would change
        that. Returns when none of the skipped ones is wanted any more (a dead worker
        dropped from the set) or after requesting the reload. Runs while the process serves.
        """
        skipped = [str(d["endpoint"]) for d in self.status.devices if not d["used"] and d["endpoint"] in self._bound]
        endpoint = await wait_skipped_back(skipped, lambda: self.servers_for(self._target))
        if endpoint is not None:
            log.info("a skipped rpc-server answers again; reloading to use it", endpoint=endpoint)
            self._reload.set()

    async def _switch_model(self, model: str) -> None:
        """Make ``model`` the loaded one: in place, or by a restart when its rpc-servers differ."""
        async with self._model_lock:
            if self.status.model == model:
                return
            self._target = model
            if self.servers_for(model) == self.status.rpc_servers and self._client is not None:
                self._set_ready(True, BackendState.LOADING)
                try:
                    await self._load(self._client, model)
                finally:
                    self._set_ready(True, BackendState.READY)
                return
            self._reload.set()
            while self._ready:
                await self._ready_changed.wait()

    # -- requests ----------------------------------------------------------------------

    async def _wait_ready(self) -> None:
        """Return once the backend is ready, or FAILED (nothing to wait for then)."""
        while not self._ready and self.status.state is not BackendState.FAILED:
            await self._ready_changed.wait()

    @contextlib.asynccontextmanager
    async def session(self, model: str) -> AsyncIterator[BackendClient]:
        """A ready backend with ``model`` loaded, held for one request.

        Admission control first: when ``max_queue`` requests (waiting here or running)
        are already admitted, raises QueueFull (BackendError 429, code ``queue_full``) at
        once (``max_queue`` 0: no bound). Then waits up to ``ready_wait`` seconds for a
        (re)starting backend or a model switch, else raises BackendError(503) — at once
        while the backend is FAILED, with its last error. The
        request counts as in flight (a reload waits for it) from when it gets the
        backend until the block exits; its queue slot is freed when the block exits,
        also when the request is cancelled (a client that went away).
        """
        if model not in self.models:
            raise BackendError(404, f"model {model!r} not found", "invalid_request_error", "model_not_found")
        with self.admission.admit():
            with trio.move_on_after(self._ready_wait):
                await self._wait_ready()
                while self.status.model != model and self.status.state is not BackendState.FAILED:
                    await self._switch_model(model)
                    await self._wait_ready()
            if not self._ready or self._client is None or self.status.model != model:
                reason = f" ({self.status.last_error})" if self.status.last_error else ""
                raise BackendError(
                    503,
                    f"the inference backend is not ready: {self.status.state.value}{reason}",
                    code="backend_not_ready",
                )
            client = self._client
            with self.admission.running():
                yield client
