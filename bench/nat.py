"""NAT (issue 17): a worker reached through a relay, and hole-punched, against one on the server's LAN.

Each configuration gets a fresh :func:`localp2p.testing.netns.nat_topology`: ``localp2p
relay`` on the simulated internet (everyone's DHT bootstrap; ``--p2p-no-mdns`` everywhere),
the server behind NAT router A, and one worker (``--threads 1``, no ``--cache-dir``):

* ``lan``      the worker on the server's LAN, dialed directly: the baseline
* ``relayed``  the worker behind router B; both routers pick random source ports, so no
               hole punch gets through and the tunnel stays on the relay
* ``punched``  the worker behind router B; port-keeping routers: relayed first, then
               hole-punched; measured once the tunnel moved (the backend reloaded onto the
               direct path and the relayed connection closed)

As users do: the server first (ready once its model is loaded locally), then the worker.
The server finds the worker in the DHT before the worker holds its reservation on the
relay, so its first relayed dials fail and it retries.

* ``used_s``    worker process start -> the backend holds layers on it and a request answered
                (its reservation, the DHT lookup, the relayed dial and the first load included)
* ``moved_s``   (punched) worker start -> hole-punched, relayed connection closed, backend ready
* ``load_s``    the backend's time for the load on the measured path (every worker weight crosses it)
* ``gen_tok_s`` streamed greedy ``/v1/completions`` (one warm-up, then ``reps``), (N - 1) ÷ (last - first token)

Ratios: relayed and punched ÷ lan, for generation tok/s and first-load time. Goal: a worker
behind NAT is used ≤ 20 s after its start. Needs root and nftables; skipped with the reason
otherwise.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import httpx

from localp2p.testing import cluster
from localp2p.testing.netns import nat_topology, nat_unavailable_reason

from .generation import derive, stream_once
from .models import BenchModel
from .procs import PDEATHSIG, Procs, Server, new_token, p2p_state
from .prompts import prompt
from .stats import ratio, summary
from .table import Row, fmt, goal_row, mm

#: name -> (hosts per LAN: server first, random-port routers, the link the worker must end on).
CONFIGS: dict[str, tuple[list[int], bool, str]] = {
    "lan": ([2], False, "direct"),
    "relayed": ([1, 1], True, "relayed"),
    "punched": ([1, 1], False, "hole-punched"),
}
LABELS = {
    "lan": "worker on the server's LAN (direct)",
    "relayed": "worker behind another NAT, relayed (random-port NATs)",
    "punched": "worker behind another NAT, hole-punched (port-keeping NATs)",
}
USED_GOAL_S = 20.0
POLL = 0.1


@dataclass
class NatPlan:
    reps: int = 5
    max_tokens: int = 64
    timeout: float = 150.0


def _worker(server: Server) -> dict[str, Any] | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        workers = p2p_state(server)["workers"]
        return workers[0] if workers else None
    return None


def _serves_on(server: Server, entry: dict[str, Any]) -> bool:
    """Whether the ready backend holds layers on the worker's tunnel."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        status = server.http.get("/api/status", timeout=5).json()
        endpoint = f"127.0.0.1:{entry['tunnel_port']}"
        return bool(status["backend"]["ready"]) and any(d["endpoint"] == endpoint and d["used"] for d in status["devices"])
    return False


def _until(what: str, condition: Any, started: float, timeout: float, worker: cluster.Proc) -> float:
    """Seconds from ``started`` until ``condition()`` is true (polled); raises after ``timeout``."""
    while time.monotonic() - started < timeout:
        if worker.popen.poll() is not None:
            raise RuntimeError(f"worker exited: {worker.stderr()[-2000:]}")
        if condition():
            return time.monotonic() - started
        time.sleep(POLL)
    raise TimeoutError(f"{what} not within {timeout} s; worker: {worker.stderr()[-1500:]}")


def _used(server: Server, model: BenchModel) -> bool:
    entry = _worker(server)
    if entry is None or not entry["online"] or not entry.get("layers") or not _serves_on(server, entry):
        return False
    body = {"model": model.name, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    with contextlib.suppress(httpx.HTTPError):
        return server.http.post("/v1/completions", json=body, timeout=120).status_code == 200
    return False


def _on_path(server: Server, link: str) -> bool:
    """The worker is on ``link`` with no relayed connection left (unless relayed), the backend serving on it."""
    entry = _worker(server)
    if entry is None or not entry["online"] or entry["link"] != link:
        return False
    return (link == "relayed" or entry["relay"] is None) and _serves_on(server, entry)


def one(procs: Procs, model: BenchModel, plan: NatPlan, name: str) -> dict[str, Any]:
    """One configuration of :data:`CONFIGS`, in a topology of its own."""
    lans, random_ports, link = CONFIGS[name]
    log_dir = procs.log_dir / f"nat-{name}"
    log_dir.mkdir(parents=True, exist_ok=True)
    token = new_token()
    with nat_topology(1, lans, random_ports=random_ports) as topo, procs.group():
        relay, bootstrap = cluster.netns_relay(topo, 0, log_dir, token, prefix=PDEATHSIG)
        procs.track(relay)
        flags = ("--p2p-no-mdns", "--p2p-bootstrap", bootstrap)
        with cluster.netns_server(topo, 1, log_dir, token, *flags, *model.server_args()) as server:
            started = time.monotonic()
            worker = cluster.p2p_worker(
                log_dir, token, f"nat-{name}-worker", *flags, prefix=[*PDEATHSIG, *cluster.netns_prefix(topo, 2)], wait=False
            )
            procs.track(worker)
            used_s = _until("used", lambda: _used(server, model), started, plan.timeout, worker)
            moved_s = _until(f"on the {link} path", lambda: _on_path(server, link), started, plan.timeout, worker)
            status = server.http.get("/api/status").json()
            stream_once(server, model.name, prompt(0), plan.max_tokens)  # warm-up
            runs = []
            for rep in range(1, plan.reps + 1):
                runs.append(derive(stream_once(server, model.name, prompt(rep), plan.max_tokens), plan.max_tokens))
            entry = _worker(server) or {}
            if entry.get("link") != link:
                raise RuntimeError(f"the link changed during the measurement: {entry}")
    return {
        "used_s": used_s,
        "moved_s": moved_s if name == "punched" else None,
        "load_s": status["backend"]["load_seconds"],
        "load_network_mib": (status["load_progress"].get("network_bytes") or 0) / 2**20,
        "layers": entry.get("layers"),
        "rtt_ms": entry.get("rtt_ms"),
        "link": entry.get("link"),
        "runs": runs,
        "gen_tok_s": summary([r["gen_tok_s"] for r in runs]),
    }


def run(procs: Procs, model: BenchModel, plan: NatPlan, log: Any = print) -> dict[str, Any]:
    reason = nat_unavailable_reason()
    if reason is not None:
        log(f"  skipped: {reason}")
        return {"skipped": reason}
    out: dict[str, Any] = {}
    for name in CONFIGS:
        try:
            r = out[name] = one(procs, model, plan, name)
        except Exception as exc:  # one configuration failing must not hide the others
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(f"  {name} FAILED: {out[name]['error']}")
            continue
        moved = f", moved to the punched path {r['moved_s']:.1f} s" if r["moved_s"] is not None else ""
        log(
            f"  {name}: used {r['used_s']:.1f} s{moved}, first load {r['load_s']:.2f} s, "
            f"gen {r['gen_tok_s']['median']:.1f} tok/s, rtt {r['rtt_ms']} ms"
        )
    return out


def _g(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def rows(nat: dict[str, Any] | None) -> list[Row]:
    """The table rows of a :func:`run` result (none when the section did not run)."""
    layer = "NAT"
    if nat is None:
        return []
    if "skipped" in nat:
        return [Row(layer, "relay / hole punch through two NATs", f"skipped: {nat['skipped']}")]
    if "error" in nat:
        return [Row(layer, "relay / hole punch through two NATs", nat["error"][:160], result="ERROR")]
    done = {name: nat[name] for name in LABELS if "error" not in nat.get(name, {"error": ""})}
    out = []
    for name, label in LABELS.items():
        r = nat.get(name, {"error": "not measured"})
        if name not in done:
            out.append(Row(layer, label, r["error"][:160], result="ERROR"))
            continue
        mib = f", {r['load_network_mib']:.0f} MiB to the worker" if r.get("load_network_mib") else ""
        value = f"gen {mm(r['gen_tok_s'], 'tok/s')} · first load {fmt(r['load_s'], 's')}{mib} · ping {fmt(r['rtt_ms'], 'ms')}"
        out.append(Row(layer, label, value))
    for name in [n for n in ("relayed", "punched") if n in done and "lan" in done]:
        gen = ratio(done[name]["gen_tok_s"], done["lan"]["gen_tok_s"])
        load = ratio({"median": done[name]["load_s"]}, {"median": done["lan"]["load_s"]})
        measurement = f"{name} ÷ LAN: generation tok/s, first-load time"
        out.append(
            Row(
                layer,
                measurement,
                ratio=f"gen {_g(gen)} · first load {_g(load)}",
                chart="ratio",
                number=gen,
                label=f"NAT: {name} ÷ LAN, gen tok/s",
            )
        )
    for name in [n for n in ("relayed", "punched") if n in done]:
        used = done[name]["used_s"]
        measurement = f"{name}: worker start → used (through NAT, first load included)"
        out.append(goal_row(layer, measurement, fmt(used, "s"), used, USED_GOAL_S, False, f"≤ {USED_GOAL_S:.0f} s"))
    if "punched" in done:
        moved = fmt(done["punched"]["moved_s"], "s")
        out.append(Row(layer, "punched: worker start → tunnel on the punched path (backend reloaded, relay connection closed)", moved))
    if "lan" in done:
        out.append(Row(layer, "LAN: worker start → used (baseline)", fmt(done["lan"]["used_s"], "s")))
    return out
