"""The worker's llama.cpp rpc-server, run as a supervised child (restarted when it dies).

The rpc-server is a child because llama.cpp's C accept loop never returns to Python
and a crash in it must not take the worker's p2p node down.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import trio

from localp2p import cpumode
from localp2p.cpumode import CpuMode
from localp2p.errors import StartupError
from localp2p.llama import rpc
from localp2p.llama.devices import Device
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
from localp2p.worker.tensor_cache import CacheGuard, cache_min_free

log = get_logger("supervisor")

#: Seconds a fresh rpc-server gets to answer HELLO.
RPC_SERVER_START_TIMEOUT = 30.0


@dataclass(frozen=True)
class RpcServerSpec:
    """How to run one rpc-server child."""

    host: str
    port: int
    threads: int = 0
    cache_dir: str | None = None
    cpu_mode: CpuMode = CpuMode.DEFAULT
    #: ggml device names to serve (``--device``); empty: every GPU, else the CPU.
    devices: tuple[str, ...] = ()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def argv(self, *, cache: bool = True) -> list[str]:
        """The child's command line; ``cache=False`` leaves the tensor cache off (see tensor_cache)."""
        args = [self.endpoint, "--threads", str(self.threads or os.cpu_count() or 1)]
        if self.cache_dir and cache:
            args += ["--cache-dir", self.cache_dir]
        for name in self.devices:
            args += ["--device", name]
        return python_module_argv("localp2p.worker.rpc_child", *args)


async def probe_devices(spec: RpcServerSpec) -> list[Device]:
    """The ggml devices ``spec``'s rpc-server will serve, with their memory.

    Read by a short-lived child (``python -m localp2p.llama.devices``), as the rpc-server
    child will choose them, so a GPU driver that crashes takes the child down, not the
    worker. Logs the warning for a GPU that this build cannot use. Raises StartupError
    for an unknown ``--device`` (naming the devices there are) or a child that fails.
    """
    argv = python_module_argv("localp2p.llama.devices", *[arg for name in spec.devices for arg in ("--device", name)])
    with trio.fail_after(RPC_SERVER_START_TIMEOUT):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    try:
        answer = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = done.stderr.decode(errors="replace").strip()[-300:]
        raise StartupError(f"could not list llama.cpp's devices (exit code {done.returncode}): {tail}") from None
    if answer.get("error"):
        raise StartupError(f"--device: {answer['error']}")
    if answer.get("warning"):
        log.warning(answer["warning"])
    return [d for d in map(Device.from_dict, answer.get("devices") or []) if d is not None]


def devices_text(devices: list[Device]) -> str:
    """``Vulkan0(GPU,8192MiB),CPU(CPU,32000MiB)``: the ready line's ``devices=`` value (total memory)."""
    return ",".join(f"{d.name}({d.kind},{d.memory_total >> 20}MiB)" for d in devices) or "none"


async def _wait_rpc_ready(process: trio.Process, endpoint: str) -> rpc.ServerInfo:
    with trio.fail_after(RPC_SERVER_START_TIMEOUT):
        while True:
            if process.returncode is not None:
                raise ChildExited(f"rpc-server exited with code {process.returncode} before it was ready")
            try:
                return await trio.to_thread.run_sync(rpc.probe, endpoint, 1.0)
            except rpc.RPCError:
                await trio.sleep(READY_POLL)


async def supervise_rpc_server(
    spec: RpcServerSpec,
    *,
    guard: CacheGuard | None = None,
    task_status: trio.TaskStatus[rpc.ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run llama.cpp's rpc-server as a child for as long as this task lives.

    ``task_status.started`` gets the HELLO answer of the first healthy start. A child
    that dies later is restarted with backoff. Raises StartupError when the very first
    start fails (e.g. the port is taken). Cancellation stops the child.

    With a cache dir, each start uses it only while its disk has room, and a child
    whose cache disk runs low is stopped and restarted without it (localp2p.worker.tensor_cache).
    A child that dies of a native crash (SIGSEGV, SIGILL, SIGBUS) is restarted in safe
    CPU mode, and stays there (localp2p.cpumode). ``guard``: the cache's guard, when the
    caller shares it (the weight fetcher reads whether it tripped); made here otherwise.
    """
    first = True
    backoff = RESTART_BACKOFF_MIN
    if guard is None and spec.cache_dir:
        guard = CacheGuard(spec.cache_dir, cache_min_free())
    mode = spec.cpu_mode
    while True:
        cached = guard is not None and await guard.usable()
        process = await start_child(spec.argv(cache=cached), cpumode.child_env(mode))
        code: int | None = None  # exit code of a child that ended by itself
        try:
            try:
                info = await _wait_rpc_ready(process, spec.endpoint)
            except (ChildExited, trio.TooSlowError) as exc:
                code = process.returncode
                to_safe_mode = cpumode.is_native_crash(code) and mode is not CpuMode.SAFE
                if first and not to_safe_mode:
                    raise StartupError(f"rpc-server on {spec.endpoint} did not start: {exc}") from None
                log.warning("rpc-server failed to start", endpoint=spec.endpoint, error=str(exc))
            else:
                if first:
                    first = False
                    task_status.started(dataclasses.replace(info, cache_dir=spec.cache_dir if cached else None))
                else:
                    log.info("rpc-server restarted", endpoint=spec.endpoint, pid=process.pid)
                up_since = time.monotonic()
                code = await guard.serve(process) if guard is not None and cached else await process.wait()
                if code is None or time.monotonic() - up_since > HEALTHY_AFTER:  # None: stopped by the guard
                    backoff = RESTART_BACKOFF_MIN
                if code is not None:
                    log.warning("rpc-server exited; restarting", endpoint=spec.endpoint, code=code, in_s=backoff)
        finally:
            await stop_child(process)
        if cpumode.is_native_crash(code) and mode is not CpuMode.SAFE:
            assert code is not None
            mode, backoff = CpuMode.SAFE, RESTART_BACKOFF_MIN
            log.error(
                "SAFE MODE: the rpc-server crashed in llama.cpp's CPU code; restarting it in safe CPU mode (slower)",
                endpoint=spec.endpoint,
                signal=cpumode.signal_name(code),
                mode=mode.describe(),
            )
        await trio.sleep(backoff)
        backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
