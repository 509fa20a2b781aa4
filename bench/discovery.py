"""Discovery: from a worker's process start to listed, and to used, with no restart.

A p2p server runs (SmolLM2, loaded locally, no workers). Per repetition a fresh
worker (new state dir, so a new peer id) is started and the client polls
``GET /api/p2p`` every 50 ms:

* ``ready_s``  worker start -> its "localp2p worker ready" line (its own start-up)
* ``listed_s`` worker start -> listed online in /api/p2p (connected, token proven, pinged)
* ``used_s``   worker start -> the backend holds layers on it and a request sent then
  succeeded (debounce, drain, backend restart and model load included)

Then the worker is stopped and (unless ``measure_drop`` is off, as in quick runs)
``dropped_s`` (stop -> the server lists no worker online and is ready again,
locally) is recorded before the next repetition. A repetition's worker is always
gone before the next one starts only when ``measure_drop`` is on; otherwise the
server may still be dropping the previous worker when the next one joins.

Two modes, each with its own server: mDNS only (``--p2p-no-dht`` on both sides)
and DHT only (``--p2p-no-mdns``; the worker gets the server as ``--p2p-bootstrap``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import httpx

from .models import BenchModel
from .procs import Procs, Server, new_token, p2p_state
from .stats import summary

POLL = 0.05
MODES = {"mdns": ["--p2p-no-dht"], "dht": ["--p2p-no-mdns"]}


@dataclass
class DiscoveryPlan:
    reps: dict[str, int]
    threads: int
    worker_threads: int
    timeout: float = 90.0
    measure_drop: bool = True  # wait after each stop until the server dropped the worker (~15 s)


def _worker_entry(server: Server, known: set[str]) -> dict[str, Any] | None:
    with contextlib.suppress(httpx.HTTPError):
        for worker in p2p_state(server)["workers"]:
            if worker["peer_id"] not in known:
                return worker  # type: ignore[no-any-return]
    return None


def _ready_line(stdout: list[str]) -> bool:
    return any(line.startswith("localp2p worker ready") for line in list(stdout))


def one_join(
    procs: Procs, server: Server, model: BenchModel, token: str, flags: list[str], plan: DiscoveryPlan, name: str
) -> dict[str, Any]:
    known = {w["peer_id"] for w in p2p_state(server)["workers"]}
    started = time.monotonic()
    worker = procs.p2p_worker(token, plan.worker_threads, name, *flags, wait=False)
    result: dict[str, Any] = {"ready_s": None, "listed_s": None, "layered_s": None, "used_s": None, "dropped_s": None}
    deadline = started + plan.timeout
    try:
        while time.monotonic() < deadline and result["used_s"] is None:
            if worker.popen.poll() is not None:
                raise RuntimeError(f"worker exited: {worker.stderr()[-2000:]}")
            now = time.monotonic() - started
            if result["ready_s"] is None and _ready_line(worker.stdout):
                result["ready_s"] = now
            entry = _worker_entry(server, known)
            if entry is not None and entry["online"] and result["listed_s"] is None:
                result["listed_s"] = time.monotonic() - started
            if entry is not None and entry["online"] and entry["layers"] > 0:
                result["layered_s"] = time.monotonic() - started
                response = server.http.post(
                    "/v1/completions",
                    json={"model": model.name, "prompt": "Hello", "max_tokens": 4, "temperature": 0},
                    timeout=120,
                )
                if response.status_code == 200:
                    result["used_s"] = time.monotonic() - started
                continue
            time.sleep(POLL)
        if result["used_s"] is None:
            raise TimeoutError(f"worker {name} not used within {plan.timeout} s: {result}")
    finally:
        stopped = time.monotonic()
        procs.stop(worker)
        if plan.measure_drop:
            result["dropped_s"] = _wait_dropped(server, stopped, plan.timeout)
    return result


def _wait_dropped(server: Server, since: float, timeout: float) -> float | None:
    """Seconds from ``since`` until no worker is online and the server is ready (locally)."""
    deadline = since + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            state = p2p_state(server)
            online = [w for w in state["workers"] if w["online"]]
            if not online and not state["backend_rpc_servers"] and server.http.get("/readyz", timeout=2).status_code == 200:
                return time.monotonic() - since
        time.sleep(POLL)
    return None


def _bootstrap(server: Server) -> str:
    addrs = p2p_state(server)["node"]["addrs"]
    return next((a for a in addrs if a.startswith("/ip4/127.0.0.1/")), addrs[0])


def run(procs: Procs, model: BenchModel, plan: DiscoveryPlan, log: Any = print) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, flags in MODES.items():
        reps = plan.reps.get(mode, 0)
        if not reps:
            continue
        with procs.group():
            token = new_token()
            server = procs.p2p_server(token, plan.threads, *flags, *model.server_args(), name=f"discovery-{mode}-server")
            worker_flags = list(flags)
            if mode == "dht":
                worker_flags += ["--p2p-bootstrap", _bootstrap(server)]
            runs = []
            for rep in range(reps):
                r = one_join(procs, server, model, token, worker_flags, plan, f"discovery-{mode}-worker")
                runs.append(r)
                dropped = f", dropped {r['dropped_s']:.2f} s after its stop" if r["dropped_s"] is not None else ""
                times = f"ready {r['ready_s']:.2f} s, listed {r['listed_s']:.2f} s, used {r['used_s']:.2f} s"
                log(f"  {mode} rep {rep + 1}: {times}{dropped}")
        out[mode] = {
            "runs": runs,
            **{
                key: summary([r[key] for r in runs if r[key] is not None])
                for key in ("ready_s", "listed_s", "layered_s", "used_s", "dropped_s")
            },
        }
    return out
