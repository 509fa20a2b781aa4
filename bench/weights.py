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

Every load places ~1 GB in fresh memory (the workers' buffers, KV caches, cache files),
so the section also times filling FRESH_MEMORY_BYTES of memory the system had not
touched for FRESH_MEMORY_IDLE_S: on a VM whose host takes freed pages back, that costs
seconds per GB and sets a floor under every load time here.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from localp2p.llama.fnv import Hasher
from localp2p.llama.model_index import ModelIndex
from localp2p.testing.cluster import netns_prefix, netns_server, worker_peer_id
from localp2p.testing.netns import netns_unavailable_reason, topology

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
#: Where the loads run: LAN_RATE NICs (a server and three workers in network namespaces,
#: each with its own uplink and downlink: what the goals are about) and one machine's
#: loopback (no link to spare: the three ways cost the same memory and CPU there).
LINKS = ("lan", "loopback")
#: The LAN's NIC speed (tc rate): gigabit Ethernet, the ordinary wired LAN.
LAN_RATE = "1gbit"
LINK_LABELS = {"lan": "1 Gbit/s LAN", "loopback": "one machine (loopback)"}
#: The servers' --parallel: one 2048-token KV cache (218 MB on the workers for the 1B model,
#: cleared at every load). The default 4 would add 654 MB more to clear in all three ways,
#: the same seconds in each: this section is about how the weights arrive.
PARALLEL = 1
#: Loads per configuration (interleaved): one is at the mercy of a single slow moment.
DEFAULT_REPS = 3
#: Bytes and idle seconds of the fresh-memory probe (a VM host reclaims freed pages after a few s).
FRESH_MEMORY_BYTES = 512 << 20
FRESH_MEMORY_IDLE_S = 4.0


@dataclass(frozen=True)
class WeightsPlan:
    reps: int = DEFAULT_REPS
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


@contextlib.contextmanager
def _cluster(
    procs: Procs, model: BenchModel, config: str, plan: WeightsPlan, root: pathlib.Path, held: pathlib.Path, link: str
) -> Iterator[Server]:
    """Three workers of ``config`` and a server that has loaded on them, on ``link``: one
    machine's loopback, or LAN_RATE NICs (a server and three workers in network namespaces)."""
    token = new_token()
    server_flags = ["--p2p-no-dht", "--min-workers", str(WORKERS), "--parallel", str(PARALLEL), *model.server_args()]
    with contextlib.ExitStack() as stack:
        stack.enter_context(procs.group())
        topo = stack.enter_context(topology(1 + WORKERS, rate=LAN_RATE)) if link == "lan" else None
        workers = [
            procs.p2p_worker(
                token,
                plan.worker_threads,
                f"weights-{link}-{config}{i}",
                "--p2p-no-dht",
                *_worker_flags(config, i, root, held),
                prefix=netns_prefix(topo, 1 + i) if topo is not None else (),
            )
            for i in range(WORKERS)
        ]
        peers = [worker_peer_id(w) for w in workers]
        if topo is not None:
            server = stack.enter_context(netns_server(topo, 0, root, token, *server_flags, "--threads", str(plan.threads)))
        else:
            server = procs.p2p_server(
                token, plan.threads, *server_flags, "--state-dir", str(root / "state-server"), name=f"weights-{config}", wait=False
            )
        wait_for_workers(server, peers, timeout=plan.timeout)
        yield server


def _one_load(
    procs: Procs, model: BenchModel, config: str, plan: WeightsPlan, root: pathlib.Path, held: pathlib.Path, link: str, log: Any
) -> dict[str, Any]:
    for d in root.glob("cache-*"):
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob("state-*/tensor-cache"):
        shutil.rmtree(d, ignore_errors=True)
    with _cluster(procs, model, config, plan, root, held, link) as server:
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
        f"    {link} {config}: load {result['load_s']:.2f} s, server sent {result['server_bytes'] / 1e6:.1f} MB "
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


def fresh_memory_s_per_gb() -> float:
    """Seconds per GB to fill memory nothing used for FRESH_MEMORY_IDLE_S (first touch)."""
    import numpy as np  # noqa: PLC0415 - bench-only dependency of genmodel

    time.sleep(FRESH_MEMORY_IDLE_S)
    started = time.perf_counter()
    block = np.ones(FRESH_MEMORY_BYTES, dtype=np.uint8)
    seconds = time.perf_counter() - started
    del block
    return seconds / (FRESH_MEMORY_BYTES / 1e9)


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
    reason = netns_unavailable_reason()
    links = LINKS if reason is None else ("loopback",)
    if reason is not None:
        log(f"    no {LAN_RATE} LAN: {reason}")
        out["lan_skipped"] = reason
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {link: {c: [] for c in CONFIGS} for link in links}
    for _ in range(plan.reps):
        for link in links:
            for config in CONFIGS:  # interleaved: a slow moment of the shared machine hits all three
                runs[link][config].append(_one_load(procs, model, config, plan, root, held, link, log))
    out["links"] = {
        link: {
            "runs": runs[link],
            "load_s": {c: summary([r["load_s"] for r in runs[link][c]]) for c in CONFIGS},
            "server_bytes": {c: summary([r["server_bytes"] for r in runs[link][c]]) for c in CONFIGS},
        }
        for link in links
    }
    out["rehash"] = _rehash(procs, plan, root, held, size)
    out["fresh_memory_s_per_gb"] = fresh_memory_s_per_gb()
    log(f"    fresh memory: {out['fresh_memory_s_per_gb']:.2f} s per GB")
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
    links = section["links"]
    judged = "lan" if "lan" in links else "loopback"  # the goals are about distribution: judged where there is a link
    for link, measured in links.items():
        where = LINK_LABELS[link]
        for config in CONFIGS:
            load, sent = measured["load_s"][config], measured["server_bytes"][config]
            percent = 100 * sent["median"] / weights
            mb = fmt(sent["median"] / 1e6, "MB")
            value = f"load {fmt(load.get('median'), 's')} · server sent {mb} ({fmt(percent, '%')} of the weights)"
            out.append(Row(layer, f"{where}: {LABELS[config]}", value))
        for config, server_goal, load_goal in (("b", B_SERVER_GOAL, B_LOAD_GOAL), ("c", C_SERVER_GOAL, C_LOAD_GOAL)):
            share = measured["server_bytes"][config]["median"] / weights
            value = ratio(measured["load_s"][config], measured["load_s"]["a"])
            if link != judged:
                out.append(
                    Row(
                        layer,
                        f"{where}: ({config}) server upload ÷ weights · first-load time ÷ (a) (no goal: no link to spare)",
                        f"{fmt(100 * share, '%')} · {fmt(value, '×')}",
                    )
                )
                continue
            label = f"{where}: ({config}) server upload ÷ weights"
            out.append(goal_row(layer, label, fmt(100 * share, "%"), share, server_goal, False, f"≤ {server_goal:.0%}"))
            out.append(
                goal_row(
                    layer,
                    f"{where}: ({config}) first-load time ÷ (a)",
                    fmt(value, "×"),
                    value,
                    load_goal,
                    False,
                    f"≤ {load_goal:g}×",
                    label=f"weights ({config}) load ÷ (a)",
                )
            )
    if section.get("lan_skipped"):
        out.append(Row(layer, f"{LINK_LABELS['lan']}: not measured", section["lan_skipped"][:160]))
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
    if section.get("fresh_memory_s_per_gb") is not None:
        out.append(
            Row(
                layer,
                f"fresh memory: filling {FRESH_MEMORY_BYTES >> 20} MiB untouched for {FRESH_MEMORY_IDLE_S:g} s (a floor under each load)",
                fmt(section["fresh_memory_s_per_gb"], "s/GB"),
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
