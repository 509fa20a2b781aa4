"""Generation: the same greedy, fixed-length, streamed request through every layer.

(a) llama-cpp-python in-process (bench.inproc, no server)
(b) ``localp2p run``, local: HTTP API + gRPC backend
(c) static: ``localp2p run`` + 2 ``worker llama-cpp-rpc`` over direct TCP (LLAMACPP_GRPC_SERVERS)
(d) p2p: ``localp2p run --p2p`` + 2 ``worker p2p-llama-cpp-rpc`` through libp2p tunnels

All four run side by side and are measured interleaved (see :func:`run_model`);
each gets one warm-up request, then ``reps`` measured ones. TTFT is
measured by the client (request sent -> first text); prompt processing tokens/s is
prompt tokens / TTFT; generation tokens/s is (N - 1) / (last text - first text).
With ``load_reps`` (the 1B model) the static and p2p runs also measure model loading
(bench.load): their workers run with ``--cache-dir``.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from typing import Any

from . import load as load_bench
from .models import BenchModel
from .procs import Procs, Server, new_token, wait_for_workers, worker_peer_id
from .prompts import SAMPLING, prompt
from .stats import CpuWatch, summary
from .streaming import stream

CONFIGS = ("inproc", "local", "static", "p2p")
#: Tokens of the tiny-prompt requests that measure the API's fixed cost per request.
TINY_TOKENS = 2
LABELS = {
    "inproc": "(a) llama-cpp-python in-process",
    "local": "(b) HTTP API, local",
    "static": "(c) static, 2 workers, TCP",
    "p2p": "(d) p2p, 2 workers, tunnels",
}


@dataclass
class GenPlan:
    max_tokens: int
    reps: int
    threads: int
    worker_threads: int
    load_reps: int = 0  # also measure first load / cached reload this many times (bench.load)
    wait_timeout: float = 240.0
    tiny_reps: int = 20  # paired tiny-prompt requests for the API overhead


def derive(run: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """Add pp/gen tokens per second and per-token ms to one raw measurement."""
    gen_s = run["gen_s"]
    run["pp_tok_s"] = run["prompt_tokens"] / run["ttft_s"]
    run["gen_tok_s"] = (max_tokens - 1) / gen_s if gen_s > 0 else None
    run["per_token_ms"] = gen_s / (max_tokens - 1) * 1000
    run["ttft_ms"] = run["ttft_s"] * 1000
    return run


def aggregate(runs: list[dict[str, Any]], max_tokens: int, **extra: Any) -> dict[str, Any]:
    runs = [derive(r, max_tokens) for r in runs]
    return {
        "runs": runs,
        "pp_tok_s": summary([r["pp_tok_s"] for r in runs]),
        "gen_tok_s": summary([r["gen_tok_s"] for r in runs]),
        "ttft_ms": summary([r["ttft_ms"] for r in runs]),
        "per_token_ms": summary([r["per_token_ms"] for r in runs]),
        **extra,
    }


def completion_body(model: str, text: str, max_tokens: int) -> dict[str, Any]:
    """A greedy /v1/completions request that runs to exactly ``max_tokens`` (``ignore_eos``)."""
    return {"model": model, "prompt": text, "max_tokens": max_tokens, "ignore_eos": True, **SAMPLING}


def stream_once(server: Server, model: str, text: str, max_tokens: int) -> dict[str, Any]:
    """One streamed /v1/completions request, timed by the client."""
    s = stream(server.http, "/v1/completions", completion_body(model, text, max_tokens), timeout=300)
    if s.finish != "length" or not s.usage:
        # ignore_eos must run to max_tokens (usage.completion_tokens counts text chunks, not tokens)
        raise RuntimeError(f"expected {max_tokens} tokens (finish_reason length), got {s.finish!r}, usage {s.usage}")
    return {
        "ttft_s": s.ttft_s,
        "prompt_tokens": int(s.usage["prompt_tokens"]),
        "generated_tokens": s.completion_tokens(),
        "chunks": len(s.times),
        "gen_s": s.gen_s,
        **({"server_timings": s.timings} if s.timings else {}),
    }


class InProcess:
    """(a): a bench.inproc child holding the model; one measured request per call."""

    def __init__(self, procs: Procs, model: BenchModel, plan: GenPlan) -> None:
        argv = [
            sys.executable,
            "-m",
            "bench.inproc",
            str(model.path),
            "--threads",
            str(plan.threads),
            "--ctx",
            str(model.context),
        ]
        self.cmd = procs.command(argv, f"{model.key}-inproc", stdin=True)
        self.load_s = float(json.loads(self.cmd.wait_line('"ready"', timeout=300))["load_s"])

    def run(self, rep: int, max_tokens: int, tiny: bool = False) -> dict[str, Any]:
        stdin = self.cmd.popen.stdin
        assert stdin is not None
        stdin.write(json.dumps({"rep": rep, "max_tokens": max_tokens, "tiny": tiny}).encode() + b"\n")
        stdin.flush()
        return json.loads(self.cmd.wait_line('"result"', timeout=600))["result"]  # type: ignore[no-any-return]


def _devices(server: Server) -> list[dict[str, Any]]:
    status = server.status()
    return [{"endpoint": d["endpoint"], "layers": d["layers"]} for d in status.get("devices", []) if d.get("used")]


def check_two_workers(server: Server) -> list[dict[str, Any]]:
    devices = _devices(server)
    if len(devices) != 2 or not all(d["layers"] > 0 for d in devices):
        raise RuntimeError(f"the server does not use both workers: {devices}")
    return devices


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per-repetition differences b - a (same prompt, measured back to back)."""
    return summary([rb[key] - ra[key] for ra, rb in zip(a, b, strict=True)])


def run_model(procs: Procs, model: BenchModel, plan: GenPlan, log: Any = print) -> dict[str, Any]:
    """(a)-(d) for one model, interleaved; with ``plan.load_reps`` also the load measurements.

    All four configurations are started first (idle processes cost nothing measurable),
    then each repetition sends the same prompt to each of them in turn, the order rotating
    from one repetition to the next: slow drifts of a shared machine fall on all alike.
    """
    out: dict[str, Any] = {"model": model.label, "max_tokens": plan.max_tokens, "configs": {}, "errors": {}, "load": None}
    t, n = plan.threads, plan.max_tokens
    caches = procs.log_dir / f"cache-{model.key}"
    runners: dict[str, Any] = {}
    tiny: dict[str, Any] = {}  # the same with a tiny prompt and TINY_TOKENS (API overhead)
    extra: dict[str, dict[str, Any]] = {}
    load: dict[str, Any] = {}

    def setup(name: str, fn: Any) -> None:
        log(f"  {model.key}: starting {LABELS[name]}")
        try:
            fn()
        except Exception as exc:  # the other configurations still run
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"  {model.key}: {LABELS[name]} FAILED: {out['errors'][name]}")

    def start_inproc() -> None:
        inproc = InProcess(procs, model, plan)
        runners["inproc"] = lambda rep: inproc.run(rep, n)
        tiny["inproc"] = lambda rep: inproc.run(rep, TINY_TOKENS, tiny=True)
        extra["inproc"] = {"load_s": inproc.load_s}

    def serve(name: str, server: Server, devices: list[dict[str, Any]] | None = None) -> None:
        runners[name] = lambda rep: stream_once(server, model.name, prompt(rep), n)
        tiny[name] = lambda rep: stream_once(server, model.name, prompt(rep, tiny=True), TINY_TOKENS)
        extra[name] = {"load_s": server.status()["backend"]["load_seconds"], **({"devices": devices} if devices else {})}

    def start_local() -> None:
        serve("local", procs.server(t, *model.server_args(), name=f"{model.key}-local"))

    def start_static() -> None:
        dirs = [caches / f"static-{i}" for i in (1, 2)]
        workers = []
        for i, d in enumerate(dirs, 1):
            flags = ["--cache-dir", str(d)] if plan.load_reps else []
            workers.append(procs.static_worker(plan.worker_threads, *flags, name=f"{model.key}-worker{i}"))
        endpoints = [endpoint for _, endpoint in workers]
        if plan.load_reps:
            load["direct"] = load_bench.static_loads(procs, model, t, endpoints, dirs, plan.load_reps, log)
        server = procs.server(
            t, *model.server_args(), rpc_servers=endpoints, name=f"{model.key}-static", timeout=plan.wait_timeout
        )
        serve("static", server, check_two_workers(server))

    def start_p2p() -> None:
        token = new_token()
        dirs = [caches / f"p2p-{i}" for i in (1, 2)]
        workers = []
        for i, d in enumerate(dirs, 1):
            flags = ["--cache-dir", str(d)] if plan.load_reps else []
            workers.append(procs.p2p_worker(token, plan.worker_threads, f"{model.key}-p2pworker{i}", *flags, wait=False))
        for w in workers:
            w.wait_line("localp2p worker ready")
        peers = [worker_peer_id(w) for w in workers]
        if plan.load_reps:
            load["tunnel"] = load_bench.p2p_loads(procs, model, token, t, peers, dirs, plan.load_reps, plan.wait_timeout, log)
        server = procs.p2p_server(token, t, "--min-workers", "2", *model.server_args(), name=f"{model.key}-p2p", wait=False)
        wait_for_workers(server, peers, timeout=plan.wait_timeout)
        serve("p2p", server, check_two_workers(server))

    with procs.group():
        for name, fn in (("inproc", start_inproc), ("local", start_local), ("static", start_static), ("p2p", start_p2p)):
            setup(name, fn)
        names = [name for name in CONFIGS if name in runners]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        log(f"  {model.key}: {plan.reps} repetitions x {len(names)} configurations, interleaved (after one warm-up each)")
        with CpuWatch() as cpu:
            for name in names:
                runners[name](0)
            for rep in range(1, plan.reps + 1):
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for name in order:
                    try:
                        runs[name].append(runners[name](rep))
                    except Exception as exc:
                        out["errors"][name] = f"{type(exc).__name__}: {exc}"
                        raise
                log(f"    rep {rep}: gen tok/s " + ", ".join(f"{name} {(n - 1) / runs[name][-1]['gen_s']:.1f}" for name in names))
        tiny_runs: dict[str, list[dict[str, Any]]] = {"inproc": [], "local": []}
        if "inproc" in tiny and "local" in tiny:
            log(f"  {model.key}: API overhead, {plan.tiny_reps} tiny-prompt requests each to (a) and (b), alternating")
            for rep in range(plan.tiny_reps + 1):
                for name in ("inproc", "local") if rep % 2 else ("local", "inproc"):
                    result = tiny[name](rep)
                    if rep:  # rep 0 is the warm-up
                        tiny_runs[name].append(result)
    if plan.load_reps and "direct" in load and "tunnel" in load:
        out["load"] = load_bench.combine(model, load["direct"], load["tunnel"])
    shutil.rmtree(caches, ignore_errors=True)

    tokens = [r["prompt_tokens"] for r in runs.get("inproc", [])]
    for name in names:
        if name != "inproc" and tokens:
            for run, count in zip(runs[name], tokens, strict=True):
                run["usage_prompt_tokens"] = run["prompt_tokens"]
                run["prompt_tokens"] = count
        out["configs"][name] = aggregate(runs[name], n, other_cores=cpu.other_cores, **extra[name])
    if "inproc" in runs and "local" in runs:
        a, b = out["configs"]["inproc"]["runs"], out["configs"]["local"]["runs"]
        out["api_overhead"] = {"ttft_ms": _paired(a, b, "ttft_ms"), "per_token_ms": _paired(a, b, "per_token_ms")}
        if tiny_runs["local"]:
            ta = [derive(r, TINY_TOKENS) for r in tiny_runs["inproc"]]
            tb = [derive(r, TINY_TOKENS) for r in tiny_runs["local"]]
            out["api_overhead"]["tiny"] = {
                "max_tokens": TINY_TOKENS,
                "prompt_tokens": summary([r["prompt_tokens"] for r in ta]),
                "ttft_ms": _paired(ta, tb, "ttft_ms"),
                "inproc_ttft_ms": summary([r["ttft_ms"] for r in ta]),
                "local_ttft_ms": summary([r["ttft_ms"] for r in tb]),
            }
    return out
