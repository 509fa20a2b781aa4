"""The backend supervisor of `localp2p run`: the llama.cpp backend as a supervised child.

The backend is a child because llama.cpp aborts its whole process when an RPC peer
fails; a backend that dies is restarted, and the trio app around it stays up.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from localp2p import cpumode
from localp2p.llama import rpc
from localp2p._proto import backend_pb2 as pb
from localp2p.server.backend_client import BACKEND_FAILED, BackendClient, BackendError
from localp2p.config import RPC_SERVERS_ENV, ModelConfig
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

log = get_logger("supervisor")

#: Crashes in a row of a serving backend restarted at once, before the backoff starts: one
#: crash (a worker lost mid-request, a killed process) is no crash loop, and failing-over
#: requests wait for it. A backend that fails to start or load waits the backoff (a worker
#: whose rpc-server broke the load may be restarting it).
IMMEDIATE_BACKEND_RESTARTS = 1
#: Seconds a fresh backend process gets to answer Health.
BACKEND_START_TIMEOUT = 60.0
#: Default bound on how long a request waits for the backend to become ready.
REQUEST_READY_WAIT = 120.0
#: Longest a reload waits for in-flight requests before restarting the backend anyway.
DRAIN_TIMEOUT = 60.0
#: Default bound on requests admitted at once (waiting for the backend + running): llama.cpp
#: serves one generation at a time, so beyond this a client is better told to retry (429).
DEFAULT_MAX_QUEUE = 64
#: Seconds a client refused for a full queue is asked to wait before retrying (Retry-After).
QUEUE_FULL_RETRY_AFTER = 2
#: Seconds of quiet after a worker-set change before reloading: workers arriving together
#: cause one reload, not one each. Not waited when the set is settled (every known worker
#: online, nobody attaching): then nobody else is on the way.
RELOAD_DEBOUNCE = 1.5
#: Longest a stream of changes can hold a reload back.
RELOAD_DEBOUNCE_MAX = 5.0
#: Seconds after a load before a wanted rpc-server it skipped (unreachable at its start: a
#: worker whose rpc-server was restarting) is probed again; doubling up to the max while it
#: stays unreachable. One that answers brings a reload that takes it in.
SKIPPED_PROBE_MIN = 0.5
SKIPPED_PROBE_MAX = 30.0
#: Seconds one probe of a skipped rpc-server may take.
SKIPPED_PROBE_TIMEOUT = 1.0
#: Seconds between Status polls of the backend while it loads a model (progress).
LOAD_POLL = 0.5
#: Seconds between two "loading model" progress lines in the log.
LOAD_LOG_INTERVAL = 2.0
#: Seconds one probe of a backend's rpc-server may take when telling a CPU crash from a
#: lost worker (a live rpc-server answers HELLO in milliseconds).
CRASH_PROBE_TIMEOUT = 2.0
#: Seconds to wait for the exit code of a backend that broke mid-call (a gRPC error can
#: come a moment before the kernel reports the process dead).
CRASH_EXIT_WAIT = 1.0
#: A load that sent the workers less than this share of their weights was served by
#: their tensor caches (hash offers and graph set-up still cross; weights do not).
CACHED_LOAD_SHARE = 0.05


class QueueFull(BackendError):
    """Admission control refused a request: ``max_queue`` requests are already admitted."""

    retry_after: int = QUEUE_FULL_RETRY_AFTER


# --- server side: the gRPC backend ---------------------------------------------------------


@dataclass
class LoadProgress:
    """Progress of the current (or last) model load, from the backend's Status while it loads.

    ``bytes_total`` is the model file's size, standing for its weight data (the
    tensors llama.cpp loads, on the workers and locally), and ``bytes_sent`` the part
    loaded so far: llama.cpp reports progress over all tensors, not per device, so
    these count bytes loaded, of which the workers' share crosses the network.
    ``network_bytes`` counts what really crossed to the workers during this load, where
    the supervisor can see it (p2p: the tunnels' counters), and ``from_cache`` says, once
    the load is done, whether the workers' tensor caches spared nearly all of their
    share (None where the bytes cannot be seen: static mode, or no layer on a worker).
    llama.cpp itself does not report cache hits.
    """

    active: bool = False
    fraction: float = 0.0
    bytes_sent: int = 0
    bytes_total: int = 0
    started: float = 0.0  # time.monotonic()
    seconds: float = 0.0
    from_cache: bool | None = None
    network_bytes: int | None = None
    weights_since: float | None = None  # seconds after ``started`` when llama.cpp began loading weights

    @property
    def rate(self) -> float | None:
        """Bytes per second since the weights began to load (probing and parsing before that excluded)."""
        elapsed = self.seconds - (self.weights_since or 0.0)
        return self.bytes_sent / elapsed if elapsed > 0 and self.bytes_sent else None

    @property
    def eta(self) -> float | None:
        if not self.active:
            return 0.0 if self.fraction >= 1.0 else None
        rate = self.rate
        return max(0.0, (self.bytes_total - self.bytes_sent) / rate) if rate else None

    def as_dict(self) -> dict[str, object]:
        """``load_progress`` of ``/api/status`` (field names are read by the page and the CLI)."""
        rate, eta = self.rate, self.eta
        return {
            "active": self.active,
            "fraction": round(self.fraction, 4),
            "bytes_sent": self.bytes_sent,
            "bytes_total": self.bytes_total,
            "rate_bytes_per_s": round(rate) if rate else None,
            "eta_s": None if eta is None else round(eta, 1),
            "from_cache": self.from_cache,
            "network_bytes": self.network_bytes,
        }


@dataclass
class BackendStatus:
    """What the supervisor knows, for /api/status, /readyz and `localp2p status`."""

    state: str = "starting"  # starting | loading | ready | restarting | draining | failed
    model: str = ""
    pid: int | None = None
    restarts: int = 0
    last_error: str = ""
    rpc_servers: tuple[str, ...] = ()
    devices: list[dict[str, object]] = field(default_factory=list)
    layers_total: int = 0
    layers_local: int = 0
    load_seconds: float = 0.0
    load_progress: LoadProgress = field(default_factory=LoadProgress)
    cpu_mode: CpuMode = CpuMode.DEFAULT
    cpu_mode_reason: str = ""  # why the backend runs in safe mode, when it was switched there
    weight_buffers: dict[str, float] = field(default_factory=dict)  # llama.cpp buffer type -> MiB


def model_options(model: ModelConfig, rpc_servers: Sequence[str], threads: int) -> pb.ModelOptions:
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
    )


class WorkerSource(Protocol):
    """What the supervisor reads from the worker set (see localp2p.server.worker_set.WorkerSet)."""

    version: int

    async def wait_changed(self, seen_version: int) -> int: ...

    def settled(self) -> bool: ...

    def endpoints(self) -> tuple[str, ...]: ...


class BackendSupervisor:
    """Owns the backend process: start, load, restart on crash, drain and reload on demand.

    Requests go through :meth:`session`, which waits (bounded) for a ready backend with
    the wanted model and counts the request as in flight, so a reload can drain them.
    """

    def __init__(
        self,
        models: Mapping[str, ModelConfig],
        *,
        rpc_servers: Sequence[str] = (),
        threads: int = 0,
        ready_wait: float = REQUEST_READY_WAIT,
        env: Mapping[str, str] | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        network_bytes: Callable[[], int] | None = None,
        cpu_mode: CpuMode = CpuMode.DEFAULT,
    ) -> None:
        self.models = dict(models)
        self.max_queue = max_queue
        #: Bytes sent to workers so far (p2p: the tunnels), to tell a cached load apart.
        self._network_bytes = network_bytes
        self._admitted = 0
        self.status = BackendStatus(cpu_mode=cpu_mode)
        #: Whether the current process has produced a token (a native crash before that may be
        #: a CPU fast path that does not work here: see _fall_back_to_safe_mode).
        self._generated = False
        #: Exit code of the last backend process that exited by itself (None: stopped by us).
        self._exit_code: int | None = None
        self._rpc_servers = tuple(rpc_servers)
        self._target = next(iter(self.models))
        self._threads = threads
        self._ready_wait = ready_wait
        self._env = dict(env if env is not None else os.environ)
        self._client: BackendClient | None = None
        self._ready = False
        self._ready_changed = trio.Event()
        self._reload = trio.Event()
        #: Set when a reload is requested that adds an rpc-server the current process lacks.
        self._joined = trio.Event()
        #: The rpc-servers the current process was started with (and registered): what its
        #: loads must name. ``status.rpc_servers`` is what it runs on, which is less once
        #: servers it skipped as unreachable have left the worker set (see _watch_reload).
        self._bound: tuple[str, ...] = ()
        self._model_lock = trio.Lock()
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    # -- state -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    def _set_ready(self, ready: bool, state: str) -> None:
        self.status.state = state
        if ready != self._ready:
            self._ready = ready
            self._ready_changed.set()
            self._ready_changed = trio.Event()

    def note_generated(self) -> None:
        """A request got a token from the current backend process."""
        self._generated = True

    def servers_for(self, model: str) -> tuple[str, ...]:
        """The rpc-servers a model loads on: its YAML ``rpc_servers``, else the cluster's."""
        return self.models[model].rpc_servers or self._rpc_servers

    def request_reload(self, rpc_servers: Sequence[str]) -> None:
        """Restart the backend with another list of rpc-servers once in-flight requests end
        (at once when the process is still loading and the list gained a worker)."""
        self._rpc_servers = tuple(rpc_servers)
        wanted = self.servers_for(self._target)
        if wanted != self.status.rpc_servers:
            self._reload.set()
            if set(wanted) - set(self.status.rpc_servers):
                self._joined.set()

    # -- the process -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a backend process running with the current model loaded, forever.

        ``task_status.started()`` comes after the first successful model load; failing
        that first start raises StartupError (a bad model must stop `run` with one line).
        Later crashes are restarted with backoff (see IMMEDIATE_BACKEND_RESTARTS); a
        planned reload (drained for a new worker set or model) starts the next process at
        once, is not a restart, and ends a row of crashes (the backoff starts over: a
        worker lost now and then is no crash loop).
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
                        raise StartupError(message) from None
                    log.error("backend failed", error=message)
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
        in ``_exit_code``.
        """
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        self.status.rpc_servers = self._bound = self.servers_for(self._target)
        self._generated, self._exit_code = False, None
        env = cpumode.child_env(self.status.cpu_mode, self._env)
        env[RPC_SERVERS_ENV] = ",".join(self.status.rpc_servers)
        self._reload = trio.Event()
        self._joined = trio.Event()
        self._set_ready(False, "starting")
        process = await start_child(python_module_argv("backends.llama_cpp", "--addr", f"unix:{socket_path}"), env)
        self.status.pid = process.pid
        client = BackendClient(f"unix:{socket_path}")
        try:
            await self._wait_healthy(process, socket_path)
            self._set_ready(False, "loading")
            if task_status is not None:  # the first load: `run` reports ready (or fails) after it
                await self._load(client, self._target)
            elif not await self._load_unless_joined(client):
                log.info(
                    "a worker joined during the load; reloading at once", rpc_servers=list(self.servers_for(self._target))
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()  # its load is worth nothing now; SIGTERM would wait for it
                return True
            self._client = client
            self._set_ready(True, "ready")
            if task_status is not None:
                task_status.started()
                started[0] = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_reload, process, nursery.cancel_scope)
                nursery.start_soon(self._watch_skipped)
                code = await process.wait()
                nursery.cancel_scope.cancel()
            if self.status.state == "draining":
                return True
            self.status.last_error = f"backend process exited with code {code}"
            log.error("backend process died; restarting it", code=code, restarts=self.status.restarts + 1)
            self._set_ready(False, "restarting")
            return False
        except BackendError as exc:
            if exc.code == BACKEND_FAILED:  # the process broke mid-call: learn how it ended
                with trio.move_on_after(CRASH_EXIT_WAIT):
                    await process.wait()
            raise
        finally:
            self._client = None
            if self.status.state == "ready":
                self._set_ready(False, "restarting")
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
        lost = await self._unreachable(self._bound)
        if lost:
            log.warning("backend crashed after losing rpc-servers; restarting as usual", signal=cpumode.signal_name(code), lost=lost)
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

    @staticmethod
    async def _unreachable(endpoints: Sequence[str]) -> list[str]:
        """The rpc-servers among ``endpoints`` that do not answer HELLO now (probed together)."""
        lost: list[str] = []

        async def probe(endpoint: str) -> None:
            try:
                await trio.to_thread.run_sync(rpc.probe, endpoint, CRASH_PROBE_TIMEOUT)
            except rpc.RPCError:
                lost.append(endpoint)

        async with trio.open_nursery() as nursery:
            for endpoint in endpoints:
                nursery.start_soon(probe, endpoint)
        return lost

    def _serves_wanted(self) -> bool:
        """Whether the running backend already is what a reload would start: the target model
        on exactly the wanted rpc-servers. It is when the only ones it lacks are those it
        skipped as unreachable at its start and that have left the wanted list since (a
        backend restarted after a crash, before the dead worker was dropped from the set)."""
        if self.status.model != self._target:
            return False
        used = tuple(str(d["endpoint"]) for d in self.status.devices if d["used"])
        return used == self.servers_for(self._target)

    async def _watch_reload(self, process: trio.Process, scope: trio.CancelScope) -> None:
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
        log.info("reloading backend", rpc_servers=list(self.status.rpc_servers), in_flight=self._in_flight)
        self._set_ready(False, "draining")
        with trio.move_on_after(DRAIN_TIMEOUT) as drain:
            await self._idle.wait()
        if drain.cancelled_caught:
            log.warning("drain timed out; restarting with requests in flight", in_flight=self._in_flight)
        await stop_child(process)

    async def _watch_skipped(self) -> None:
        """Request a reload once a wanted rpc-server that this process skipped answers again.

        A backend started while a worker's rpc-server was down for a moment (restarted by
        its worker, e.g. after a crash or by the tensor-cache guard) runs without that
        worker although the worker set still lists it, and nothing else would change
        that. Probes (HELLO, in a thread) back off while the server stays unreachable;
        returns when none of the skipped ones is wanted any more (a dead worker dropped
        from the set) or after requesting the reload. Runs while the process serves.
        """
        skipped = [str(d["endpoint"]) for d in self.status.devices if not d["used"] and d["endpoint"] in self._bound]
        delay = SKIPPED_PROBE_MIN
        while True:
            wanted = [e for e in skipped if e in self.servers_for(self._target)]
            if not wanted:
                return
            await trio.sleep(delay)
            for endpoint in wanted:
                try:
                    await trio.to_thread.run_sync(rpc.probe, endpoint, SKIPPED_PROBE_TIMEOUT)
                except rpc.RPCError:
                    continue
                if endpoint in self.servers_for(self._target):
                    log.info("a skipped rpc-server answers again; reloading to use it", endpoint=endpoint)
                    self._reload.set()
                    return
            delay = min(delay * 2, SKIPPED_PROBE_MAX)

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
        model = self.models[name]
        started = time.monotonic()
        progress = self.status.load_progress = LoadProgress(active=True, started=started)
        network_start = self._network_bytes() if self._network_bytes is not None else None
        log.info("loading model", model=name, rpc_servers=list(self.status.rpc_servers) or None)
        failed: BackendError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_load, client, name, progress)
            try:
                result = await client.load_model(model_options(model, self._bound, self._threads))
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
            progress.network_bytes = self._network_bytes() - network_start
            progress.from_cache = self._cached_load(progress)
        self._log_progress(name, progress, "model loaded")

    async def _follow_load(self, client: BackendClient, name: str, progress: LoadProgress) -> None:
        """Poll the loading backend's Status into ``progress``; log a line every LOAD_LOG_INTERVAL s.

        Runs until cancelled (when LoadModel returns). A Status call that fails is
        skipped: the load itself reports the real error.
        """
        logged = time.monotonic()
        while True:
            await trio.sleep(LOAD_POLL)
            await self.refresh_status(client)
            progress.seconds = time.monotonic() - progress.started
            if time.monotonic() - logged >= LOAD_LOG_INTERVAL:
                logged = time.monotonic()
                self._log_progress(name, progress, "loading model")

    def _cached_load(self, progress: LoadProgress) -> bool | None:
        """Whether the workers' share of the weights came from their tensor caches."""
        on_workers = self.status.layers_total - self.status.layers_local
        if progress.network_bytes is None or on_workers <= 0 or not self.status.layers_total:
            return None
        share = progress.bytes_total * on_workers / self.status.layers_total
        return progress.network_bytes < CACHED_LOAD_SHARE * share

    def _log_progress(self, name: str, progress: LoadProgress, event: str) -> None:
        rate, eta = progress.rate, progress.eta
        log.info(
            event,
            model=name,
            percent=round(progress.fraction * 100, 1),
            mib=f"{progress.bytes_sent / 2**20:.1f}/{progress.bytes_total / 2**20:.1f}",
            mib_per_s=round(rate / 2**20, 1) if rate else None,
            eta_s=round(eta, 1) if eta is not None else None,
            seconds=round(progress.seconds, 2),
            **({} if progress.network_bytes is None else {"network_mib": round(progress.network_bytes / 2**20, 1)}),
            **({} if progress.from_cache is None else {"from_cache": progress.from_cache}),
        )

    async def refresh_status(self, client: BackendClient | None = None) -> BackendStatus:
        """Ask the backend for its devices and layers (best effort) and return the status."""
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
            self._note_load(reply)
        return self.status

    def _note_load(self, reply: pb.StatusResponse) -> None:
        """Take the backend's load progress (of the load running now, or of the last one)."""
        progress = self.status.load_progress
        if reply.load_bytes_total:
            progress.bytes_total = reply.load_bytes_total
        if progress.active and reply.loading:
            if progress.weights_since is None:
                progress.weights_since = time.monotonic() - progress.started
            progress.fraction = max(progress.fraction, min(1.0, reply.load_fraction))
        progress.bytes_sent = int(progress.fraction * progress.bytes_total)

    # -- requests ----------------------------------------------------------------------

    async def _wait_ready(self) -> None:
        while not self._ready:
            await self._ready_changed.wait()

    async def _switch_model(self, model: str) -> None:
        """Make ``model`` the loaded one: in place, or by a restart when its rpc-servers differ."""
        async with self._model_lock:
            if self.status.model == model:
                return
            self._target = model
            if self.servers_for(model) == self.status.rpc_servers and self._client is not None:
                self._set_ready(True, "loading")
                try:
                    await self._load(self._client, model)
                finally:
                    self._set_ready(True, "ready")
                return
            self._reload.set()
            while self._ready:
                await self._ready_changed.wait()

    @contextlib.asynccontextmanager
    async def session(self, model: str) -> AsyncIterator[BackendClient]:
        """A ready backend with ``model`` loaded, held for one request.

        Admission control first: when ``max_queue`` requests (waiting here or running)
        are already admitted, raises BackendError(429, code ``queue_full``) at once
        (``max_queue`` 0: no bound). Then waits up to ``ready_wait`` seconds for a
        (re)starting backend or a model switch, else raises BackendError(503). The
        request counts as in flight (a reload waits for it) from when it gets the
        backend until the block exits; its queue slot is freed when the block exits,
        also when the request is cancelled (a client that went away).
        """
        if model not in self.models:
            raise BackendError(404, f"model {model!r} not found", "invalid_request_error", "model_not_found")
        if self.max_queue and self._admitted >= self.max_queue:
            raise QueueFull(
                429,
                f"the server is busy: {self._admitted} requests are already queued or running "
                f"(limit {self.max_queue}, --max-queue); retry shortly",
                "server_error",
                "queue_full",
            )
        self._admitted += 1
        try:
            with trio.move_on_after(self._ready_wait):
                await self._wait_ready()
                while self.status.model != model:
                    await self._switch_model(model)
                    await self._wait_ready()
            if not self._ready or self._client is None or self.status.model != model:
                reason = f" ({self.status.last_error})" if self.status.last_error else ""
                raise BackendError(
                    503, f"the inference backend is not ready: {self.status.state}{reason}", code="backend_not_ready"
                )
            client = self._client
            self._in_flight += 1
            if self._in_flight == 1:
                self._idle = trio.Event()
            try:
                yield client
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()
        finally:
            self._admitted -= 1

    @property
    def admitted(self) -> int:
        """Requests admitted right now: waiting for the backend or running."""
        return self._admitted


async def follow_worker_set(
    supervisor: BackendSupervisor,
    workers: WorkerSource,
    static_servers: Sequence[str] = (),
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reload the backend whenever the set of live workers changes, debounced unless settled.

    The backend gets ``static_servers`` (LLAMACPP_GRPC_SERVERS) followed by the live
    workers' tunnel endpoints. Runs until cancelled.
    """
    seen = workers.version
    task_status.started()
    while True:
        seen = await workers.wait_changed(seen)
        deadline = trio.current_time() + RELOAD_DEBOUNCE_MAX
        while not workers.settled() and trio.current_time() < deadline:
            with trio.move_on_at(min(deadline, trio.current_time() + RELOAD_DEBOUNCE)) as quiet:
                seen = await workers.wait_changed(seen)
            if quiet.cancelled_caught:
                break
        supervisor.request_reload((*static_servers, *workers.endpoints()))
