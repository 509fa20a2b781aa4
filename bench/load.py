"""Model load: seconds and bytes sent to the workers, first load vs cached reload.

Workers run with ``--cache-dir`` (fresh, empty directories). The "reload" is a new
server process loading the same model on the same workers, which is what a server
restart or a backend reload after a worker-set change does.

* direct TCP: each worker sits behind a counting TCP relay (localp2p/testing/cluster.py
  ``CountingProxy``); bytes are what crossed it towards the worker.
* tunnels: bytes are ``GET /api/p2p`` ``workers[].bytes_sent`` (server -> worker).

Each repetition empties the cache directories first (the rpc-server looks cached
files up per request, so the workers keep running).

Load seconds are ``GET /api/status`` ``backend.load_seconds`` in both cases (the
backend's LoadModel call: reading the file, sending tensors, allocating).
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

from .models import BenchModel, tensor_bytes
from .procs import CountingProxy, Procs, Server, p2p_state, wait_for_workers
from .stats import CpuWatch, ratio, summary


def _status(server: Server) -> dict[str, Any]:
    status = server.status()
    return {
        "load_s": status["backend"]["load_seconds"],
        "backend_starts": status["backend"]["restarts"] + 1,
        "devices": [{"endpoint": d["endpoint"], "layers": d["layers"]} for d in status.get("devices", []) if d.get("used")],
    }


def _clear(dirs: list[pathlib.Path]) -> None:
    """Empty the workers' cache directories (the rpc-server looks files up per request)."""
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)


def static_loads(
    procs: Procs, model: BenchModel, threads: int, endpoints: list[str], dirs: list[pathlib.Path], reps: int, log: Any = print
) -> dict[str, list[dict[str, Any]]]:
    """``reps`` x (first load, cached reload) over direct TCP, through counting relays."""
    proxies = [CountingProxy(endpoint) for endpoint in endpoints]
    out: dict[str, list[dict[str, Any]]] = {"first": [], "cached": []}
    try:
        for _ in range(reps):
            _clear(dirs)
            for phase in ("first", "cached"):
                for proxy in proxies:
                    proxy.reset()
                with procs.group():
                    with CpuWatch() as cpu:
                        server = procs.server(
                            threads,
                            *model.server_args(),
                            rpc_servers=[p.endpoint for p in proxies],
                            name=f"{model.key}-load-{phase}",
                        )
                    result = {
                        **_status(server),
                        "bytes_sent": sum(p.to_target for p in proxies),
                        "bytes_received": sum(p.from_target for p in proxies),
                        "other_cores": cpu.other_cores,
                    }
                out[phase].append(result)
                log(f"    direct {phase} load: {result['load_s']:.2f} s, {result['bytes_sent'] / 1e6:.1f} MB sent")
    finally:
        for proxy in proxies:
            proxy.close()
    return out


def p2p_loads(
    procs: Procs,
    model: BenchModel,
    token: str,
    threads: int,
    peers: list[str],
    dirs: list[pathlib.Path],
    reps: int,
    timeout: float,
    log: Any = print,
) -> dict[str, list[dict[str, Any]]]:
    """``reps`` x (first load, cached reload) through tunnels: a new p2p server each time."""
    out: dict[str, list[dict[str, Any]]] = {"first": [], "cached": []}
    for _ in range(reps):
        _clear(dirs)
        for phase in ("first", "cached"):
            with procs.group():
                with CpuWatch() as cpu:
                    server = procs.p2p_server(
                        token,
                        threads,
                        "--min-workers",
                        str(len(peers)),
                        *model.server_args(),
                        name=f"{model.key}-p2p-load-{phase}",
                        wait=False,
                    )
                    wait_for_workers(server, peers, timeout=timeout)
                state = p2p_state(server)
                result = {
                    **_status(server),
                    "bytes_sent": sum(int(w["bytes_sent"]) for w in state["workers"]),
                    "bytes_received": sum(int(w["bytes_received"]) for w in state["workers"]),
                    "other_cores": cpu.other_cores,
                }
            out[phase].append(result)
            log(f"    tunnel {phase} load: {result['load_s']:.2f} s, {result['bytes_sent'] / 1e6:.1f} MB sent")
    return out


def combine(
    model: BenchModel, direct: dict[str, list[dict[str, Any]]], tunnel: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Raw numbers, their summaries, and the ratios the goals are about (ratios of medians)."""
    weights = tensor_bytes(model.path)
    total = weights["worker_weight_bytes"]
    out: dict[str, Any] = {"weights": weights, "paths": {}}
    for path, runs in (("direct", direct), ("tunnel", tunnel)):
        out["paths"][path] = {
            phase: {
                "load_s": summary([r["load_s"] for r in runs[phase]]),
                "bytes_sent": summary([r["bytes_sent"] for r in runs[phase]]),
                "fraction_of_weights": summary([r["bytes_sent"] / total for r in runs[phase]]),
                "runs": runs[phase],
            }
            for phase in ("first", "cached")
        }
    paths = out["paths"]
    out["ratios"] = {
        "direct_cached_fraction": paths["direct"]["cached"]["fraction_of_weights"]["median"],
        "tunnel_cached_fraction": paths["tunnel"]["cached"]["fraction_of_weights"]["median"],
        "tunnel_vs_direct_first_load": ratio(paths["tunnel"]["first"]["load_s"], paths["direct"]["first"]["load_s"]),
        "tunnel_vs_direct_cached_load": ratio(paths["tunnel"]["cached"]["load_s"], paths["direct"]["cached"]["load_s"]),
    }
    return out
