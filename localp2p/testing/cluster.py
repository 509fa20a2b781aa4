"""Test helpers that run the real thing: `localp2p` subprocesses, real ports, real HTTP."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import pathlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx

LOCALP2P = [sys.executable, "-m", "localp2p.cli"]
#: Generous bounds: these machines have 2 cores and are shared with the build.
START_TIMEOUT = 120.0
#: Seconds :func:`end_all` gives processes left at the end between SIGTERM and SIGKILL
#: (a server's graceful stop with nothing in flight takes about a second).
END_GRACE = 10.0
#: prctl option: the signal a child gets when the thread that started it exits.
_PR_SET_PDEATHSIG = 1
#: libc's prctl, resolved now: a child between fork and exec must not load or look up anything.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pids: Sequence[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie counts as gone)."""
    running = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.append(pid)
    return running


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` seconds for ``pids`` to end; returns those still running."""
    deadline = time.monotonic() + timeout
    while (left := alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes of this user whose environment has ``name=value`` (inherited by every
    descendant, so it finds a process tree even after its parents died)."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return alive(found)


def sigkill(pids: Sequence[int]) -> None:
    """SIGKILL each of ``pids`` that still exists (and may be signalled)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def json_log_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line of a stderr log, parsed as JSON; AssertionError names a line that is not."""
    parsed = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"log line is not JSON: {line!r}") from None
    return parsed


def _die_with_this_process() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child SIGTERMed when this process dies, even by SIGKILL.

    ``PR_SET_PDEATHSIG`` fires when the parent *thread* exits, so it is only set for
    children started from the main thread (None elsewhere: those rely on the registry,
    see :func:`end_all`). SIGTERM: a `localp2p` stops its own children on the way out.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def preexec() -> None:  # in the child, between fork and exec
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os._exit(1)

    return preexec


#: Every :class:`Proc` started and not yet known to be reaped, by pid, so that an
#: interrupted run still ends them (:func:`kill_all`, :func:`end_all`).
_LIVE: dict[int, Proc] = {}


def _snapshot(procs: Sequence[Proc]) -> list[int]:
    """Pids of ``procs`` still running and of all their descendants, taken before any is
    signalled (a child whose parent died is re-parented and no longer found)."""
    pids: list[int] = []
    for proc in procs:
        if proc.popen.poll() is None:
            pids += [proc.pid, *descendants(proc.pid)]
    return pids


def kill_all() -> None:
    """SIGKILL every registered process and every descendant of one, all at once.

    Safe in a signal handler: it only sends signals (reaping is left to whoever
    waits, or to :func:`end_all`). Never raises.
    """
    sigkill(_snapshot(list(_LIVE.values())))


def end_all(grace: float = END_GRACE) -> None:
    """End every process still registered: SIGTERM, up to ``grace`` seconds, then SIGKILL
    for them and their descendants; reap them and close their logs.

    For the end of a run (pytest_unconfigure, atexit): a test or fixture that stopped
    what it started leaves nothing here. Never raises.
    """
    procs = list(_LIVE.values())
    family = _snapshot(procs)
    for proc in procs:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(max(0.0, deadline - time.monotonic()))
    sigkill([*family, *_snapshot(procs)])
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(grace)
        proc.forget()


atexit.register(end_all)


class Proc:
    """A localp2p subprocess (or ``program``): stdout lines queued for matching, stderr kept in a file.

    Registered until reaped (see :func:`end_all`), and SIGTERMed by the kernel if this
    process dies first (see :func:`_die_with_this_process`).
    """

    def __init__(
        self,
        args: Sequence[str],
        log_dir: pathlib.Path,
        name: str,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
        program: Sequence[str] = LOCALP2P,
    ) -> None:
        self.name = name
        #: the ready line, for helpers that wait for one (start_worker)
        self.ready_line = ""
        self.stderr_path = log_dir / f"{name}.stderr.log"
        self._stderr = self.stderr_path.open("wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("LOCALP2P_LOG_FORMAT", "console")
        self.popen = subprocess.Popen(
            [*prefix, *program, *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
            preexec_fn=_die_with_this_process(),  # noqa: PLW1509 - only prctl; see the function
        )
        _LIVE[self.popen.pid] = self
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stdout.append(line)
            self.lines.put(line)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_line(self, needle: str, timeout: float = START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no line containing {needle!r}; stderr:\n{self.stderr()[-3000:]}")
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; stderr:\n{self.stderr()[-3000:]}") from None
                continue
            if needle in line:
                return line

    def wait_stderr(self, needle: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until ``needle`` appears in the stderr log (log lines, not stdout).

        Raises TimeoutError, or RuntimeError when the process exits first.
        """
        deadline = time.monotonic() + timeout
        while needle not in self.stderr():
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; stderr:\n{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no log line containing {needle!r}; stderr:\n{self.stderr()[-3000:]}")
            time.sleep(0.05)

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.forget()
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group (the process and every child it started)."""
        sigkill([self.pid, *descendants(self.pid)])
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(10)
        _LIVE.pop(self.pid, None)

    def forget(self) -> None:
        """Close the log; unregister once reaped (a live process stays for :func:`end_all`)."""
        self._stderr.close()
        if self.popen.returncode is not None:
            _LIVE.pop(self.pid, None)


@contextlib.contextmanager
def stopped_on_error(proc: Proc) -> Iterator[Proc]:
    """Stop ``proc`` when the block raises anything, Ctrl-C included: a start-up that fails
    or is interrupted before the caller holds the process leaks nothing."""
    try:
        yield proc
    except BaseException:
        proc.stop()
        raise


def start_worker(log_dir: pathlib.Path, port: int | None = None, *extra: str, name: str | None = None) -> tuple[Proc, str]:
    port = port or free_port()
    proc = Proc(["worker", "llama-cpp-rpc", "127.0.0.1", str(port), "--threads", "1", *extra], log_dir, name or f"worker-{port}")
    with stopped_on_error(proc):
        proc.ready_line = proc.wait_line("localp2p worker ready")
    return proc, f"127.0.0.1:{port}"


class Server:
    """A running `localp2p run` and an HTTP client for it."""

    def __init__(self, proc: Proc, base_url: str) -> None:
        self.proc = proc
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=120.0)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.popen.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.popen.returncode}:\n{self.proc.stderr()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if self.http.get("/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready:\n{self.proc.stderr()[-3000:]}")

    def status(self) -> dict[str, Any]:
        return self.http.get("/api/status").json()

    def chat(self, content: str, **params: Any) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": content}], "temperature": 0, **params}
        return self.http.post("/v1/chat/completions", json=body)

    def stream_events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any] | str]:
        """SSE ``data:`` payloads of a streamed request, decoded; ``"[DONE]"`` as a string."""
        with self.http.stream("POST", path, json={**body, "stream": True}) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                yield data if data == "[DONE]" else json.loads(data)

    def close(self) -> None:
        self.http.close()
        self.proc.stop()


def start_server(
    log_dir: pathlib.Path,
    *args: str,
    rpc_servers: Sequence[str] = (),
    env: dict[str, str] | None = None,
    name: str = "server",
    wait: bool = True,
) -> Server:
    port = free_port()
    full_env = {"LLAMACPP_GRPC_SERVERS": ",".join(rpc_servers), **(env or {})}
    proc = Proc(["run", "--address", f"127.0.0.1:{port}", "--threads", "2", *args], log_dir, name, full_env)
    server = Server(proc, f"http://127.0.0.1:{port}")
    if wait:
        with stopped_on_error(proc):
            server.wait_ready()
    return server


def stream_text(events: Iterator[dict[str, Any] | str]) -> tuple[str, list[dict[str, Any] | str]]:
    """Concatenated text of a chat or completion stream, and all its events."""
    seen = list(events)
    parts = []
    for event in seen:
        if isinstance(event, str) or "choices" not in event:
            continue
        for choice in event["choices"]:
            parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(parts), seen


class CountingProxy:
    """A TCP relay on 127.0.0.1 that counts the bytes going each way (test instrumentation).

    Used to measure what crosses the network between a server and an rpc-server. With
    ``record``, it also keeps what each connection sent to the target (``requests``, one
    bytearray per connection, in accept order).
    """

    def __init__(self, target: str, *, record: bool = False) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.to_target = 0
        self.from_target = 0
        self.record = record
        self.requests: list[bytearray] = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            sent = bytearray()
            if self.record:
                self.requests.append(sent)
            threading.Thread(target=self._pipe, args=(client, upstream, True, sent), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False, None), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, outbound: bool, sent: bytearray | None) -> None:
        try:
            while data := src.recv(1 << 20):
                dst.sendall(data)
                with self._lock:
                    if sent is not None and self.record:
                        sent += data
                    if outbound:
                        self.to_target += len(data)
                    else:
                        self.from_target += len(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        with self._lock:
            self.to_target = self.from_target = 0

    def close(self) -> None:
        self._listener.close()


# --- p2p mode -------------------------------------------------------------------------


def new_token() -> str:
    out = subprocess.run([*LOCALP2P, "token", "new"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def p2p_worker(
    log_dir: pathlib.Path, token: str, name: str, *flags: str, prefix: Sequence[str] = (), wait: bool = True
) -> Proc:
    """Start `localp2p worker p2p-llama-cpp-rpc` with its own state dir (so its own peer id)."""
    state = log_dir / f"state-{name}"
    proc = Proc(
        ["worker", "p2p-llama-cpp-rpc", "--threads", "1", "--state-dir", str(state), "--node-name", name, *flags],
        log_dir,
        name,
        {"TOKEN": token},
        prefix=prefix,
    )
    if wait:
        with stopped_on_error(proc):
            proc.wait_line("localp2p worker ready")
    return proc


def netns_prefix(topo: Any, i: int) -> list[str]:
    """The command prefix that runs something in host ``i`` of a :mod:`localp2p.testing.netns` topology."""
    return ["ip", "netns", "exec", topo.hosts[i].ns]


@contextlib.contextmanager
def netns_server(topo: Any, i: int, log_dir: pathlib.Path, token: str, *flags: str, wait: bool = True) -> Iterator[Server]:
    """`localp2p run --p2p` in host ``i`` of a netns topology, its API reached through a forwarder
    (``wait``: once it is ready; else at once, its API answering as soon as it listens)."""
    from localp2p.testing.netns import NamespaceForward  # noqa: PLC0415 - netns needs root; most tests never import it

    port = free_port()
    host = topo.hosts[i].ip
    proc = Proc(
        ["run", "--p2p", "--address", f"{host}:{port}", "--threads", "2", "--state-dir", str(log_dir / "state-server"), *flags],
        log_dir,
        "ns-server",
        {"P2P_TOKEN": token, "LLAMACPP_GRPC_SERVERS": ""},
        prefix=netns_prefix(topo, i),
    )
    forward = NamespaceForward(topo.hosts[i].ns, (host, port))
    server = Server(proc, f"http://127.0.0.1:{forward.port}")
    try:
        if wait:
            server.wait_ready()
        yield server
    finally:
        server.close()
        forward.close()


def netns_relay(topo: Any, i: int, log_dir: pathlib.Path, token: str, prefix: Sequence[str] = ()) -> tuple[Proc, str]:
    """`localp2p relay` in host ``i`` of a netns topology (``prefix`` before its ``ip netns
    exec``); returns it, once ready, and its address on the host's IP as a bootstrap multiaddr."""
    proc = Proc(
        ["relay", "--p2p-no-mdns", "--state-dir", str(log_dir / "state-relay"), "--node-name", "relay"],
        log_dir,
        "ns-relay",
        {"TOKEN": token},
        prefix=[*prefix, *netns_prefix(topo, i)],
    )
    with stopped_on_error(proc):
        line = proc.wait_line("localp2p relay ready")
    addrs = line.split("addrs=", 1)[1].split(",")
    return proc, next(a for a in addrs if f"/ip4/{topo.hosts[i].ip}/" in a)


def worker_peer_id(worker: Proc) -> str:
    line = next(line for line in worker.stdout if line.startswith("localp2p worker ready"))
    return line.split("peer=", 1)[1].split()[0]


def p2p_server(
    log_dir: pathlib.Path,
    token: str,
    *flags: str,
    name: str = "p2p-server",
    prefix: Sequence[str] = (),
    address: str = "127.0.0.1",
    wait: bool = True,
) -> Server:
    """Start `localp2p run --p2p` with its own state dir; ``wait``: until it is ready."""
    port = free_port()
    proc = Proc(
        ["run", "--p2p", "--address", f"{address}:{port}", "--threads", "2", "--state-dir", str(log_dir / f"state-{name}"), *flags],
        log_dir,
        name,
        {"P2P_TOKEN": token, "LLAMACPP_GRPC_SERVERS": ""},
        prefix=prefix,
    )
    server = Server(proc, f"http://{address}:{port}")
    if wait:
        with stopped_on_error(proc):
            server.wait_ready()
    return server


def p2p_state(server: Server) -> dict[str, Any]:
    return server.http.get("/api/p2p").json()


def wait_for_workers(server: Server, peer_ids: Sequence[str], timeout: float = 60.0) -> dict[str, Any]:
    """Wait until exactly ``peer_ids`` are online, the backend runs on all of them, and it is ready."""
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            state = p2p_state(server)
            online = sorted(w["peer_id"] for w in state["workers"] if w["online"])
            layered = all(w["layers"] > 0 for w in state["workers"] if w["online"])
            ready = server.http.get("/readyz", timeout=2).status_code == 200
            if online == sorted(peer_ids) and layered and ready and len(state["backend_rpc_servers"]) == len(peer_ids):
                return state
        time.sleep(0.25)
    raise TimeoutError(f"workers {peer_ids} not all in use; last /api/p2p: {state}\n{server.proc.stderr()[-2000:]}")


def rpc_server_child(worker: Proc) -> tuple[int, list[str]]:
    """Pid and command line of a worker's (current) llama.cpp rpc-server child."""
    for pid in descendants(worker.pid):
        try:
            argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "localp2p.worker.rpc_child" in argv:
            return pid, argv
    raise AssertionError("the worker has no rpc-server child")


def rpc_server_connections(worker: Proc) -> int:
    """Connections the worker's llama.cpp rpc-server accepted (it logs each one)."""
    return worker.stderr().count("Accepted client connection")
