"""Processes for the benchmarks: started through localp2p/testing/cluster.py, all tracked, all stopped.

Every process the bench starts is registered in one :class:`Procs` and stopped (SIGTERM,
then SIGKILL for it and every descendant it left) when the run ends, fails or is
interrupted. As a last resort each child runs under ``setpriv --pdeathsig KILL``: if the
bench itself is killed, its children die with it (and localp2p's own children follow
their parent, see ``localp2p.procutil.die_with_parent``).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from localp2p.testing import cluster
from localp2p.testing.cluster import CountingProxy, Proc, Server, free_port, p2p_state, wait_for_workers, worker_peer_id

ROOT = pathlib.Path(__file__).resolve().parents[1]

__all__ = [
    "PDEATHSIG",
    "Command",
    "CountingProxy",
    "Proc",
    "Procs",
    "Server",
    "free_port",
    "new_token",
    "p2p_state",
    "wait_for_workers",
    "worker_peer_id",
]

#: Children die when the bench dies, even by SIGKILL.
PDEATHSIG: list[str] = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
new_token = cluster.new_token


class Command(Proc):
    """Like :class:`cluster.Proc` (line matching, stop, kill) for any command, not only localp2p."""

    def __init__(
        self, argv: Sequence[str], log_dir: pathlib.Path, name: str, env: dict[str, str] | None = None, stdin: bool = False
    ) -> None:
        self.name = name
        self.stderr_path = log_dir / f"{name}.stderr.log"
        self._stderr = self.stderr_path.open("wb")
        self.popen = subprocess.Popen(
            [*PDEATHSIG, *argv],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=ROOT,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()


class Procs:
    """Every process of one bench run; :meth:`stop_all` ends them all."""

    def __init__(self, log_dir: pathlib.Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self._procs: list[Proc] = []
        self._names: dict[str, int] = {}
        self._groups: list[list[Proc]] = []

    def _unique(self, name: str) -> str:
        n = self._names.get(name, 0)
        self._names[name] = n + 1
        return name if n == 0 else f"{name}.{n}"

    def track(self, proc: Proc) -> Proc:
        self._procs.append(proc)
        for group in self._groups:
            group.append(proc)
        return proc

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """Stop every process started inside the block when it ends (newest first)."""
        mine: list[Proc] = []
        self._groups.append(mine)
        try:
            yield
        finally:
            self._groups.remove(mine)
            for proc in reversed(mine):
                self.stop(proc)

    def command(self, argv: Sequence[str], name: str, env: dict[str, str] | None = None, stdin: bool = False) -> Command:
        proc = Command(argv, self.log_dir, self._unique(name), env, stdin)
        self.track(proc)
        return proc

    def localp2p(self, args: Sequence[str], name: str, env: dict[str, str] | None = None) -> Proc:
        """``localp2p ARGS`` (a :class:`cluster.Proc`), registered before anything can fail."""
        proc = Proc(args, self.log_dir, self._unique(name), env, prefix=PDEATHSIG)
        self.track(proc)
        return proc

    # -- the processes the benchmarks use -------------------------------------------------

    def static_worker(self, threads: int, *extra: str, name: str = "worker") -> tuple[Proc, str]:
        """``localp2p worker llama-cpp-rpc 127.0.0.1 PORT`` (as cluster.start_worker, with our threads)."""
        port = free_port()
        proc = self.localp2p(["worker", "llama-cpp-rpc", "127.0.0.1", str(port), "--threads", str(threads), *extra], name)
        proc.wait_line("localp2p worker ready")
        return proc, f"127.0.0.1:{port}"

    def server(
        self,
        threads: int,
        *args: str,
        rpc_servers: Sequence[str] = (),
        env: dict[str, str] | None = None,
        name: str = "server",
        wait: bool = True,
        timeout: float = cluster.START_TIMEOUT,
    ) -> Server:
        """``localp2p run`` on a free port (as cluster.start_server, with our threads)."""
        port = free_port()
        full_env = {"LLAMACPP_GRPC_SERVERS": ",".join(rpc_servers), **(env or {})}
        proc = self.localp2p(["run", "--address", f"127.0.0.1:{port}", "--threads", str(threads), *args], name, full_env)
        server = Server(proc, f"http://127.0.0.1:{port}")
        if wait:
            server.wait_ready(timeout)
        return server

    def p2p_server(self, token: str, threads: int, *flags: str, name: str = "p2p-server", wait: bool = True) -> Server:
        state = self.log_dir / f"state-{self._unique(name)}"
        return self.server(
            threads,
            "--p2p",
            "--state-dir",
            str(state),
            *flags,
            env={"P2P_TOKEN": token},
            name=name,
            wait=wait,
        )

    def p2p_worker(
        self, token: str, threads: int, name: str, *flags: str, wait: bool = True, prefix: Sequence[str] = ()
    ) -> Proc:
        """As cluster.p2p_worker (own state dir, so its own peer id), registered and with our threads;
        ``prefix``: e.g. a network namespace's ``ip netns exec``."""
        name = self._unique(name)
        proc = cluster.p2p_worker(
            self.log_dir, token, name, "--threads", str(threads), *flags, prefix=[*PDEATHSIG, *prefix], wait=False
        )
        self.track(proc)
        if wait:
            proc.wait_line("localp2p worker ready")
        return proc

    # -- cleanup ------------------------------------------------------------------------------

    def stop(self, proc: Proc | Server, timeout: float = 15.0) -> None:
        """Stop ``proc`` (SIGTERM, then SIGKILL) and kill anything it left behind."""
        if isinstance(proc, Server):
            with contextlib.suppress(Exception):
                proc.http.close()
            proc = proc.proc
        family = cluster.descendants(proc.pid) if proc.popen.poll() is None else []
        with contextlib.suppress(Exception):
            proc.stop(timeout=timeout)
        if proc.popen.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()
        for pid in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def stop_all(self) -> None:
        # newest first: servers before the workers they use
        for proc in reversed(list(self._procs)):
            self.stop(proc, timeout=10.0)

    @contextlib.contextmanager
    def session(self) -> Iterator[Procs]:
        """Stop everything on exit, on any exception, and on SIGINT/SIGTERM."""

        def interrupted(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig in previous:  # a second Ctrl-C must not skip the cleanup
                signal.signal(sig, signal.SIG_IGN)
            try:
                self.stop_all()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
