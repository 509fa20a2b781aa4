"""Issue 6 (reliability), faults with several hosts: a server and two workers in network
namespaces on one bridge (localp2p/testing/netns.py), faults injected one after the other on the same
topology so the model is loaded by only two server processes:

(b) the backend process is SIGKILLed while it streams: the server stays up, the next
    request succeeds.
(a) the server is restarted while the workers stay up: they re-attach by themselves and
    the next request runs on both.
(d) worker 1's link goes down mid-stream and comes back.
(e) worker 2 is SIGKILLed mid-stream (and started again).
(c) worker 1 is restarted with --cache-dir on a 2 MiB tmpfs (the guard's threshold
    lowered to 1 MiB so it starts with the cache): the load fills it, llama.cpp leaves
    truncated cache files; the worker's disk guard (localp2p/worker/tensor_cache.py) stops the
    rpc-server, deletes them and restarts it without the cache; the answer stays the
    reference one, also after a later reload. (The model is a generated one with 11 MiB
    F16 tensors, as in test_tensor_cache.py: llama.cpp caches only tensors above 10 MiB.)

(b), (d) and (e) break a generation mid-stream. (d) and (e) expect mid-stream failover
(localp2p/server/failover.py: the API continues a broken generation on what is left, from the
tokens already produced): the stream ends with [DONE], no error event, the same text as
an uninterrupted run at temperature 0. Full service after each fault is checked by the
tests that follow them.

Recovery times are printed, not asserted (except the design's own 10 s liveness bound).
Needs root; skips with the reason otherwise. Process logs stay in pytest's tmp dir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import httpx
import pytest
from test_tensor_cache import CACHE_SHAPE

from localp2p.genmodel import write_model
from localp2p.testing.cluster import Proc, Server, free_port, new_token, p2p_worker, wait_for_workers, worker_peer_id
from localp2p.testing.netns import NamespaceForward, Topology, netns_unavailable_reason, topology
from localp2p.worker.tensor_cache import CACHE_MIN_FREE_ENV

pytestmark = pytest.mark.skipif(netns_unavailable_reason() is not None, reason=f"network namespaces: {netns_unavailable_reason()}")

#: Long enough that a fault lands mid-generation on a 2-core machine.
STORY = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}], "temperature": 0, "max_tokens": 160}
SHORT = {"messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}], "temperature": 0, "max_tokens": 32}
#: test_tensor_cache's shape (11 MiB F16 ffn tensors, cached by llama.cpp) with enough
#: layers that both workers get some.
MODEL_SHAPE = dataclasses.replace(CACHE_SHAPE, layers=4)
#: Content chunks received before a fault is injected.
TOKENS_BEFORE_FAULT = 6
#: tmpfs for worker 1's tensor cache: far smaller than its share of the weights.
CACHE_TMPFS = "2m"
#: Worker 1's cache guard threshold (MiB): below the empty tmpfs, above the full one.
CACHE_MIN_FREE_MIB = "1"
#: Seconds to wait for worker 1's load to fill the tmpfs and its guard to react.
CACHE_TRIP_WAIT = 150.0
#: The design's bound for dropping a silent worker (liveness: 3 missed pings, 2 s apart).
LIVENESS_BOUND = 10.0
#: No single stream may take longer than this (nothing hangs).
STREAM_LIMIT = 180.0


def _prefix(topo: Topology, i: int) -> list[str]:
    return ["ip", "netns", "exec", topo.hosts[i].ns]


@dataclass
class Cluster:
    """One topology for the whole module: server on host 0, workers on hosts 1 and 2."""

    topo: Topology
    log_dir: pathlib.Path
    token: str
    cache_dir: pathlib.Path
    models: pathlib.Path
    workers: dict[int, Proc] = field(default_factory=dict)
    ids: dict[int, str] = field(default_factory=dict)
    server: Server | None = None
    forward: NamespaceForward | None = None
    starts: int = 0
    reference: dict[str, str] = field(default_factory=dict)
    recovery: dict[str, float] = field(default_factory=dict)

    def start_worker(self, i: int, *, cache: bool = False) -> Proc:
        flags = ["--cache-dir", str(self.cache_dir)] if cache else []
        with mock.patch.dict(os.environ, {CACHE_MIN_FREE_ENV: CACHE_MIN_FREE_MIB} if cache else {}):
            proc = p2p_worker(self.log_dir, self.token, f"fault-w{i}", *flags, prefix=_prefix(self.topo, i))
        self.workers[i] = proc
        self.ids[i] = worker_peer_id(proc)
        return proc

    def start_server(self) -> Server:
        self.starts += 1
        port, host = free_port(), self.topo.hosts[0].ip
        proc = Proc(
            ["run", "--p2p", "--address", f"{host}:{port}", "--threads", "2", "--state-dir", str(self.log_dir / "state-server"), "--models-path", str(self.models)],
            self.log_dir,
            f"fault-server-{self.starts}",
            {"P2P_TOKEN": self.token, "LLAMACPP_GRPC_SERVERS": ""},
            prefix=_prefix(self.topo, 0),
        )
        self.forward = NamespaceForward(self.topo.hosts[0].ns, (host, port))
        self.server = Server(proc, f"http://127.0.0.1:{self.forward.port}")
        self.server.wait_ready()
        return self.server

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.forward is not None:
            self.forward.close()

    def all_workers(self, timeout: float = 90.0) -> dict[str, Any]:
        assert self.server is not None
        return wait_for_workers(self.server, sorted(self.ids.values()), timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("faults")
    cache_dir = log_dir / "cache-w1"
    cache_dir.mkdir()
    models = log_dir / "models"  # big F16 tensors: llama.cpp caches only tensors above 10 MiB
    models.mkdir()
    write_model(models / "random.gguf", MODEL_SHAPE)
    (models / "random.yaml").write_text("name: random\ncontext_size: 512\nparameters:\n  model: random.gguf\n")
    with topology(3) as topo:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={CACHE_TMPFS}", "lp2p-test-cache", str(cache_dir)], check=True, timeout=15)
        state = Cluster(topo=topo, log_dir=log_dir, token=new_token(), cache_dir=cache_dir, models=models)
        try:
            for i in (1, 2):
                state.start_worker(i)
            state.start_server()
            yield state
        finally:
            state.stop_server()
            for proc in state.workers.values():
                proc.stop()
            subprocess.run(["umount", "-l", str(cache_dir)], check=False, timeout=15)
    print("\nrecovery seconds: " + json.dumps({k: round(v, 1) for k, v in state.recovery.items()}))


def _answer(server: Server, body: dict[str, Any] = SHORT) -> str:
    reply = server.http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def _answer_eventually(server: Server, limit: float = 120.0) -> tuple[str, float]:
    """First 200 answer (and the seconds it took), retrying while the server recovers."""
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < limit:
        try:
            reply = server.http.post("/v1/chat/completions", json=SHORT, timeout=60)
        except httpx.HTTPError as exc:
            last = repr(exc)
        else:
            if reply.status_code == 200:
                return str(reply.json()["choices"][0]["message"]["content"]), time.monotonic() - started
            last = f"{reply.status_code} {reply.text[:300]}"
        time.sleep(0.5)
    raise AssertionError(f"no successful request within {limit}s; last: {last}\n{server.proc.stderr()[-2000:]}")


def _wait_worker_log(worker: Proc, needle: str, timeout: float) -> str:
    """The first line of the worker's log (stderr) containing ``needle``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in worker.stderr().splitlines() if needle in line]
        if lines:
            return lines[0]
        assert worker.popen.poll() is None, f"{worker.name} exited:\n{worker.stderr()[-3000:]}"
        time.sleep(0.25)
    raise AssertionError(f"{worker.name}: no {needle!r} in its log within {timeout}s:\n{worker.stderr()[-3000:]}")


class StreamRun(threading.Thread):
    """A streamed chat completion in a thread; ``fault_point`` is set after a few chunks."""

    def __init__(self, base_url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.base_url, self.body = base_url, body
        self.events: list[Any] = []
        self.fault_point = threading.Event()
        self.failure: str | None = None
        self.ended_at: float | None = None
        self.arrivals: list[float] = []  # time.monotonic() of each event

    def resumed_after(self, fault_at: float) -> float | None:
        """Seconds from ``fault_at`` to the event that ended the longest pause after it
        (the stream's recovery from the fault), or None when nothing came after it."""
        times = [fault_at] + [t for t in self.arrivals if t > fault_at]
        if len(times) < 2:
            return None
        gap_end = max(range(1, len(times)), key=lambda i: times[i] - times[i - 1])
        return times[gap_end] - fault_at

    def text(self) -> str:
        parts = []
        for event in self.events:
            if isinstance(event, dict):
                for choice in event.get("choices", []):
                    parts.append((choice.get("delta") or {}).get("content") or "")
        return "".join(parts)

    def errors(self) -> list[Any]:
        return [e for e in self.events if isinstance(e, dict) and "error" in e]

    def run(self) -> None:
        chunks = 0
        try:
            with httpx.Client(base_url=self.base_url, timeout=STREAM_LIMIT) as http:
                with http.stream("POST", "/v1/chat/completions", json={**self.body, "stream": True}) as response:
                    if response.status_code != 200:
                        self.failure = f"status {response.status_code}: {response.read()[:300]!r}"
                        return
                    for line in response.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[len("data: ") :]
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        self.arrivals.append(time.monotonic())
                        chunks += 1
                        if chunks >= TOKENS_BEFORE_FAULT:
                            self.fault_point.set()
        except Exception as exc:  # the connection broke: recorded, judged by the test
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended_at = time.monotonic()
            self.fault_point.set()


def _stream_with_fault(c: Cluster, inject: Any) -> tuple[StreamRun, bool]:
    """Start a long stream, call ``inject()`` mid-generation, wait for the stream to end.

    Returns the run and whether the fault really landed before the stream ended.
    """
    assert c.server is not None
    run = StreamRun(c.server.base_url, STORY)
    run.start()
    assert run.fault_point.wait(STREAM_LIMIT), "stream produced nothing"
    mid_stream = run.ended_at is None
    inject()
    run.join(STREAM_LIMIT)
    assert not run.is_alive(), f"stream still running {STREAM_LIMIT}s after the fault (hang)"
    return run, mid_stream


class OfflineWatch(threading.Thread):
    """Polls /api/p2p from ``start`` and records when ``peer_id`` first shows offline."""

    def __init__(self, server: Server, peer_id: str) -> None:
        super().__init__(daemon=True)
        self.server, self.peer_id = server, peer_id
        self.offline_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.server.base_url, timeout=5) as http:
            while not self.stop.is_set() and self.offline_at is None:
                try:
                    workers = {w["peer_id"]: w for w in http.get("/api/p2p").json()["workers"]}
                except (httpx.HTTPError, ValueError, KeyError):
                    workers = {}
                if self.peer_id in workers and not workers[self.peer_id]["online"]:
                    self.offline_at = time.monotonic()
                time.sleep(0.2)

    def wait(self, limit: float) -> float | None:
        self.join(limit)
        self.stop.set()
        return self.offline_at


def _assert_continued(run: StreamRun, reference: str, mid_stream: bool) -> None:
    """The failover contract: [DONE], no error event, the uninterrupted text."""
    assert mid_stream, "the fault landed after the stream had ended; the test did not test anything"
    assert run.failure is None, run.failure
    assert not run.errors(), run.errors()
    assert run.events and run.events[-1] == "[DONE]", run.events[-3:]
    assert run.text() == reference


# --------------------------------------------------------------------------
# the faults, in order, on one topology
# --------------------------------------------------------------------------


def test_reference_answers_on_both_workers(cluster: Cluster) -> None:
    """Before any fault: both workers in use; the answers every later step must reproduce."""
    c = cluster
    started = time.monotonic()
    state = c.all_workers(timeout=180)
    assert all(w["layers"] > 0 for w in state["workers"]), state
    c.reference["short"] = _answer(c.server)  # type: ignore[arg-type]
    run = StreamRun(c.server.base_url, STORY)  # type: ignore[union-attr]
    run.run()
    assert run.failure is None and not run.errors() and run.events[-1] == "[DONE]", (run.failure, run.events[-3:])
    c.reference["story"] = run.text()
    assert len(c.reference["story"]) > 200, c.reference["story"]
    print(f"\nloaded on both workers {time.monotonic() - started:.1f}s after the server was ready")


def test_backend_killed_under_load(cluster: Cluster) -> None:
    """(b) SIGKILL the backend process mid-stream: the server stays up and recovers."""
    c = cluster
    assert c.server is not None
    pid = c.server.status()["backend"]["pid"]
    assert pid and pid != c.server.proc.pid
    killed_at = 0.0

    def kill() -> None:
        nonlocal killed_at
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)

    run, mid_stream = _stream_with_fault(c, kill)
    assert mid_stream, "the backend was killed after the stream ended"
    assert c.server.proc.popen.poll() is None, "the server died with its backend"
    resumed = run.resumed_after(killed_at)
    if resumed is not None:  # the stream going on again: the backend is back on both workers
        c.recovery["b_backend_kill_stream_resumed"] = resumed
    # The next request goes out once the stream has ended: "first answer" includes the rest
    # of the interrupted generation (about 155 tokens) besides the recovery.
    text, _ = _answer_eventually(c.server)
    c.recovery["b_backend_kill_first_answer"] = time.monotonic() - killed_at
    c.all_workers()
    c.recovery["b_backend_kill_all_workers"] = time.monotonic() - killed_at
    assert text == c.reference["short"]
    assert c.server.status()["backend"]["pid"] != pid
    print(f"\n(b) stream after the kill: failure={run.failure} errors={run.errors()[:1]} done={run.events[-1:] == ['[DONE]']} "
          f"same_text={run.text() == c.reference['story']}; resumed {'never' if resumed is None else f'{resumed:.1f}s'} after the kill; "
          f"first answer {c.recovery['b_backend_kill_first_answer']:.1f}s, all workers {c.recovery['b_backend_kill_all_workers']:.1f}s")
    _assert_continued(run, c.reference["story"], mid_stream)  # failover covers a dead backend too


def test_server_restart_workers_reattach(cluster: Cluster) -> None:
    """(a) Restart the server; the workers stay up and are taken in again by themselves."""
    c = cluster
    worker_pids = {i: w.pid for i, w in c.workers.items()}
    c.stop_server()
    c.start_server()
    ready_at = time.monotonic()
    c.all_workers()
    c.recovery["a_server_restart_all_workers_after_ready"] = time.monotonic() - ready_at
    assert _answer(c.server) == c.reference["short"]  # type: ignore[arg-type]
    assert {i: w.pid for i, w in c.workers.items()} == worker_pids and all(w.popen.poll() is None for w in c.workers.values())
    print(f"\n(a) workers back {c.recovery['a_server_restart_all_workers_after_ready']:.1f}s after the new server was ready")


def test_link_down_mid_stream(cluster: Cluster) -> None:
    """(d) Unplug worker 1 mid-stream, plug it back: the stream continues; full service returns."""
    c = cluster
    assert c.server is not None
    down_for: dict[str, float] = {}
    watch = OfflineWatch(c.server, c.ids[1])

    def unplug() -> None:
        watch.start()
        c.topo.link_down(1)
        down_for["at"] = time.monotonic()

    try:
        run, mid_stream = _stream_with_fault(c, unplug)
        offline_at = watch.wait(LIVENESS_BOUND + 10)
    finally:
        c.topo.link_up(1)
    up_at = time.monotonic()
    assert offline_at is not None, "the unplugged worker was never marked offline"
    c.recovery["d_link_down_dropped_after"] = offline_at - down_for["at"]
    assert c.recovery["d_link_down_dropped_after"] <= LIVENESS_BOUND  # the liveness design bound
    c.all_workers()
    c.recovery["d_link_up_all_workers"] = time.monotonic() - up_at
    assert c.server.proc.popen.poll() is None
    print(f"\n(d) stream: failure={run.failure} errors={run.errors()[:1]} done={run.events[-1:] == ['[DONE]']} "
          f"same_text={run.text() == c.reference['story']}; dropped {c.recovery['d_link_down_dropped_after']:.1f}s after unplug; "
          f"all workers {c.recovery['d_link_up_all_workers']:.1f}s after replug")
    _assert_continued(run, c.reference["story"], mid_stream)


def test_service_back_after_link_fault(cluster: Cluster) -> None:
    """After (d): both workers in use and the answer is the reference one (never xfail)."""
    c = cluster
    c.all_workers()
    assert _answer(c.server) == c.reference["short"]  # type: ignore[arg-type]


def test_worker_killed_mid_stream(cluster: Cluster) -> None:
    """(e) SIGKILL worker 2 mid-stream (then start it again): the stream continues."""
    c = cluster
    assert c.server is not None
    killed: dict[str, float] = {}
    watch = OfflineWatch(c.server, c.ids[2])

    def kill() -> None:
        watch.start()
        c.workers[2].kill()
        killed["at"] = time.monotonic()

    try:
        run, mid_stream = _stream_with_fault(c, kill)
        offline_at = watch.wait(LIVENESS_BOUND + 10)
        assert offline_at is not None, "the killed worker was never marked offline"
        c.recovery["e_worker_kill_dropped_after"] = offline_at - killed["at"]
        assert c.recovery["e_worker_kill_dropped_after"] <= LIVENESS_BOUND
        served_alone, _ = _answer_eventually(c.server)
        assert served_alone == c.reference["short"]
    finally:
        old_id = c.ids[2]
        c.start_worker(2)
        assert c.ids[2] == old_id  # same state dir: same peer id
    restarted_at = time.monotonic()
    c.all_workers()
    c.recovery["e_worker_restart_all_workers"] = time.monotonic() - restarted_at
    print(f"\n(e) stream: failure={run.failure} errors={run.errors()[:1]} done={run.events[-1:] == ['[DONE]']} "
          f"same_text={run.text() == c.reference['story']}; dropped {c.recovery['e_worker_kill_dropped_after']:.1f}s after kill; "
          f"all workers {c.recovery['e_worker_restart_all_workers']:.1f}s after restart")
    _assert_continued(run, c.reference["story"], mid_stream)


def test_service_back_after_worker_kill(cluster: Cluster) -> None:
    """After (e): both workers in use, the reference answer, the same server process all along."""
    c = cluster
    state = c.all_workers()
    assert all(w["layers"] > 0 for w in state["workers"]), state
    assert _answer(c.server) == c.reference["short"]  # type: ignore[arg-type]
    assert c.server.proc.popen.poll() is None and c.starts == 2  # type: ignore[union-attr]


def test_full_cache_disk_does_not_break_the_load(cluster: Cluster) -> None:
    """(c) Worker 1 restarted with --cache-dir on a 2 MiB tmpfs: the load fills it and llama.cpp
    leaves truncated cache files; the worker's guard deletes them and goes on without the cache;
    the worker and the load survive and the answer is the reference one."""
    c = cluster
    assert c.server is not None
    watch = OfflineWatch(c.server, c.ids[1])
    watch.start()
    c.workers[1].stop()
    assert watch.wait(LIVENESS_BOUND + 10) is not None, "the stopped worker was never marked offline"
    c.start_worker(1, cache=True)
    restarted_at = time.monotonic()
    worker = c.workers[1]
    assert "tensor cache disk nearly full" not in worker.stderr(), "worker 1 started without the cache: nothing to test"
    tripped = _wait_worker_log(worker, "tensor cache disk ran low", CACHE_TRIP_WAIT)
    c.recovery["c_full_cache_guard_tripped"] = time.monotonic() - restarted_at
    assert "deleted=['" in tripped, f"the full disk left no cache file to delete: the fault was not exercised\n{tripped}"
    text, _ = _answer_eventually(c.server)
    state = c.all_workers()
    c.recovery["c_full_cache_all_workers"] = time.monotonic() - restarted_at
    assert all(w["layers"] > 0 for w in state["workers"]), state
    assert text == c.reference["short"]
    assert _answer(c.server) == c.reference["short"]
    # Every tensor llama.cpp caches is 11 MiB: nothing whole fits in 2 MiB, so nothing may be left.
    cached = sorted(p.name for p in c.cache_dir.iterdir())
    print(f"\n(c) guard tripped {c.recovery['c_full_cache_guard_tripped']:.1f}s and both workers in use "
          f"{c.recovery['c_full_cache_all_workers']:.1f}s after worker 1 restarted; left in the cache: {cached}")
    assert cached == [], cached
    assert worker.popen.poll() is None and c.server.proc.popen.poll() is None


def test_reload_after_full_cache_disk_gives_the_same_answer(cluster: Cluster) -> None:
    """(c, continued) A reload (backend restarted) after the full cache disk still gives the reference answer."""
    c = cluster
    assert c.server is not None
    os.kill(c.server.status()["backend"]["pid"], signal.SIGKILL)
    text, seconds = _answer_eventually(c.server)
    c.all_workers()
    print(f"\n(c) reload after the full cache: answered in {seconds:.1f}s, same answer: {text == c.reference['short']}")
    assert text == c.reference["short"]
    assert _answer(c.server) == c.reference["short"]
    assert sorted(p.name for p in c.cache_dir.iterdir()) == []  # the cache stayed off: nothing written
