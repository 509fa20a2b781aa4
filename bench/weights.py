"""Weights where they already are (issue 16): the 1B model's first load on 3 p2p workers.

* ``a``  today's path: no worker has the file or a cache; every weight crosses the tunnels
* ``b``  every worker has the GGUF file (``--models-path``): each copies its share from it
* ``c``  one worker has the file; the other two (``--cache-dir`` only) fetch from it and
         from each other, the server only what no worker can send

Each configuration: fresh workers with empty tensor caches (their model index already
built: indexing is a one-time cost at a worker's first start, reported apart), a new
server whose index of the model is warm. Measured:

* ``load_s``        ``/api/status`` ``backend.load_seconds``: the fill of the workers' caches
                    (the plan) and llama.cpp's load together
* ``server_bytes``  what the server uploaded for the load: tunnel bytes to the workers
                    (``/api/p2p`` ``workers[].bytes_sent``) plus the tensor bytes it served
                    (``load_progress.weights[].server``)
* the weights: the workers' share of the model (every tensor but the host-resident
  output, output norm and token embedding: bench.models.tensor_bytes)

Goals: (b) server bytes ≤ 1 % of the weights and load ≤ 0.5 × (a); (c) server bytes ≤ 40 %
and load ≤ 1.0 × (a). And the rehash of an unchanged file when a worker restarts (its
index reused): ≤ 1 s per GB.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any

from localp2p.llama.fnv import Hasher
from localp2p.llama.model_index import ModelIndex

from .models import BenchModel, tensor_bytes
from .procs import Procs, Server, new_token, p2p_state, wait_for_workers
from .stats import ratio, summary
from .table import Row, fmt, goal_row

CONFIGS = ("a", "b", "c")
LABELS = {
    "a": "(a) today: every weight through the tunnels",
    "b": "(b) every worker has the file (--models-path)",
    "c": "(c) one worker has the file, the others fetch from it",
}
B_SERVER_GOAL, B_LOAD_GOAL = 0.01, 0.5
C_SERVER_GOAL, C_LOAD_GOAL = 0.40, 1.0
REHASH_GOAL_S_PER_GB = 1.0
WORKERS = 3


@dataclass(frozen=True)
class WeightsPlan:
    reps: int = 1
    threads: int = 2
    worker_threads: int = 1
    timeout: float = 900.0


def _worker_flags(config: str, i: int, root: pathlib.Path, held: pathlib.Path) -> list[str]:
    state = ["--state-dir", str(root / f"state-{config}{i}")]
    if config == "a":
        return state
    if config == "b" or i == 0:
        return [*state, "--models-path", str(held)]
    return [*state, "--cache-dir", str(root / f"cache-{config}{i}")]


def _one_load(
    procs: Procs, model: BenchModel, config: str, plan: WeightsPlan, root: pathlib.Path, held: pathlib.Path, log: Any
) -> dict[str, Any]:
    for d in root.glob("cache-*"):
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob("state-*/tensor-cache"):
        shutil.rmtree(d, ignore_errors=True)
    token = new_token()
    with procs.group():
        workers = [
            procs.p2p_worker(token, plan.worker_threads, f"weights-{config}{i}", "--p2p-no-dht", *_worker_flags(config, i, root, held))
            for i in range(WORKERS)
        ]
        peers = [
            next(line for line in w.stdout if line.startswith("localp2p worker ready")).split("peer=", 1)[1].split()[0] for w in workers
        ]
        server: Server = procs.p2p_server(
            token,
            plan.threads,
            "--p2p-no-dht",
            "--min-workers",
            str(WORKERS),
            *model.server_args(),
            "--state-dir",
            str(root / "state-server"),
            name=f"weights-{config}",
            wait=False,
        )
        wait_for_workers(server, peers, timeout=plan.timeout)
        status = server.status()
        weights = status["load_progress"].get("weights") or {}
        tunnel = sum(int(w["bytes_sent"]) for w in p2p_state(server)["workers"])
        served = sum(int(w.get("server", 0)) for w in weights.values())
        result = {
            "load_s": status["backend"]["load_seconds"],
            "tunnel_bytes": tunnel,
            "served_bytes": served,
            "server_bytes": tunnel + served,
            "weights": {
                name: {k: w.get(k) for k in ("total", "local", "peers", "server", "cached", "missing", "seconds")}
                for name, w in weights.items()
            },
        }
    log(
        f"    {config}: load {result['load_s']:.2f} s, server sent {result['server_bytes'] / 1e6:.1f} MB "
        f"(tunnels {tunnel / 1e6:.1f}, tensors {served / 1e6:.1f})"
    )
    return result


def _rehash(procs: Procs, plan: WeightsPlan, root: pathlib.Path, held: pathlib.Path, size: int) -> dict[str, Any]:
    """A worker restarted on an indexed, unchanged file: seconds its start spent on the index."""
    token = new_token()
    with procs.group():
        worker = procs.p2p_worker(token, plan.worker_threads, "weights-rehash", "--p2p-no-dht", *_worker_flags("b", 0, root, held))
        line = next((x for x in worker.stderr().splitlines() if "local models" in x), "")
    match = re.search(r"\bseconds=([0-9.]+)", line)
    seconds = float(match.group(1)) if match else None
    return {"seconds": seconds, "gb": size / 1e9, "s_per_gb": seconds / (size / 1e9) if seconds is not None else None}


def run(procs: Procs, model: BenchModel, plan: WeightsPlan, log: Any = print) -> dict[str, Any]:
    root = procs.log_dir / "weights"
    shutil.rmtree(root, ignore_errors=True)
    held = root / "held"
    held.mkdir(parents=True)
    (held / model.path.name).symlink_to(model.path)  # --models-path: the file where it is, not a copy
    size = model.path.stat().st_size
    # The server's index of the model, warm (as after its first load); the first hash timed.
    started = time.monotonic()
    ModelIndex(root / "state-server" / "model-index", Hasher(root / "state-server" / "native")).entry(model.path)
    first_index_s = time.monotonic() - started
    log(f"    indexed {size / 1e9:.2f} GB in {first_index_s:.1f} s (once per file)")
    out: dict[str, Any] = {
        "weight_bytes": tensor_bytes(model.path)["worker_weight_bytes"],
        "file_bytes": size,
        "first_index_s": first_index_s,
    }
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    for _ in range(plan.reps):
        for config in CONFIGS:  # interleaved: a slow moment of the shared machine hits all three
            runs[config].append(_one_load(procs, model, config, plan, root, held, log))
    out["runs"] = runs
    out["load_s"] = {c: summary([r["load_s"] for r in runs[c]]) for c in CONFIGS}
    out["server_bytes"] = {c: summary([r["server_bytes"] for r in runs[c]]) for c in CONFIGS}
    out["rehash"] = _rehash(procs, plan, root, held, size)
    for d in root.glob("state-*/tensor-cache"):  # GBs of copies
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob("cache-*"):
        shutil.rmtree(d, ignore_errors=True)
    return out


def rows(section: dict[str, Any] | None) -> list[Row]:
    """The table rows of a :func:`run` result (none when the section did not run)."""
    layer = "weights"
    if section is None:
        return []
    if "error" in section:
        return [Row(layer, "first load on 3 workers: own copy / swarm", section["error"][:160], result="ERROR")]
    weights = section["weight_bytes"]
    out = []
    for config in CONFIGS:
        load, sent = section["load_s"][config], section["server_bytes"][config]
        percent = 100 * sent["median"] / weights
        value = f"load {fmt(load.get('median'), 's')} · server sent {fmt(sent['median'] / 1e6, 'MB')} ({fmt(percent, '%')} of the weights)"
        out.append(Row(layer, LABELS[config], value))
    for config, server_goal, load_goal in (("b", B_SERVER_GOAL, B_LOAD_GOAL), ("c", C_SERVER_GOAL, C_LOAD_GOAL)):
        share = section["server_bytes"][config]["median"] / weights
        out.append(
            goal_row(layer, f"({config}) server upload ÷ weights", fmt(100 * share, "%"), share, server_goal, False, f"≤ {server_goal:.0%}")
        )
        value = ratio(section["load_s"][config], section["load_s"]["a"])
        out.append(
            goal_row(
                layer,
                f"({config}) first-load time ÷ (a)",
                fmt(value, "×"),
                value,
                load_goal,
                False,
                f"≤ {load_goal:g}×",
                label=f"weights ({config}) load ÷ (a)",
            )
        )
    rehash = section["rehash"]
    out.append(
        goal_row(
            layer,
            f"rehash of an unchanged {rehash['gb']:.2f} GB file on worker restart (index reused)",
            fmt(rehash["seconds"], "s"),
            rehash["s_per_gb"],
            REHASH_GOAL_S_PER_GB,
            False,
            f"≤ {REHASH_GOAL_S_PER_GB:g} s/GB",
        )
    )
    out.append(
        Row(
            layer,
            "first index of the file (hashing every tensor, once)",
            f"{fmt(section['first_index_s'], 's')} ({fmt(section['file_bytes'] / 1e9 / section['first_index_s'], 'GB/s')})",
        )
    )
    return out
