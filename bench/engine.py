"""The serving engine against llama.cpp's own llama-server: same model, same threads, same machine.

Three kinds of server, each started fresh by the bench for every measurement round and
stopped after it, interleaved (localp2p, llama-server, localp2p, llama-server, ... the order
rotating from round to round), locally and over 2 static workers on this machine:

* ``localp2p``: ``localp2p run --parallel P`` (the output layer stays on the server);
* ``localp2p-offload``: the same with the model's YAML ``offload_output: true`` (the output
  layer on the last worker, as llama-server puts it); over workers only;
* ``llama-server``: built by bench.llama_server, ``-np P -c P×context`` (it splits its
  context between its slots), ``--rpc W1,W2 -ngl 99`` over workers, in localp2p's CPU mode.

Over workers each server gets two fresh ``localp2p worker llama-cpp-rpc`` processes (an
rpc-server serves one client at a time); llama-server speaks the same RPC protocol.

Each start measures, talking HTTP only:

1. single stream: ``single_reps`` greedy streamed /v1/completions of ``single_tokens`` tokens
   (``ignore_eos``), one at a time, after one warm-up request; decode tok/s = (N − 1) ÷ (last −
   first text chunk), as the generation section counts it (llama-server's own ``timings`` kept
   beside it); 1-stream throughput = N ÷ (request sent → last chunk);
2. ``streams`` concurrent streams (released together by a barrier), ``bursts`` times:
   aggregate tok/s = all tokens ÷ (first request sent → last chunk of any stream), per-stream
   decode tok/s, per-token latency = gaps between consecutive chunks of a stream (p50/p99 over
   every gap), TTFT p50/p99; 8 ÷ 1 = aggregate ÷ the 1-stream throughput;
3. multi-turn chat: a system prompt and ``turns`` user turns (bench.prompts.CHAT_TURNS), each
   request resending the history with the assistant's replies (streamed /v1/chat/completions,
   greedy, ``turn_tokens`` at most); TTFT of every turn;
4. determinism (first round): the greedy answer to one prompt alone, then the same prompt sent
   while ``streams − 1`` other requests run; identical or not, and how many of the others were
   generating while it was (with a server that queues, none).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from localp2p import cpumode

from . import llama_server
from .generation import aggregate, check_two_workers, completion_body, stream_once
from .models import CACHE, BenchModel
from .procs import Procs, Server
from .prompts import CHAT_SYSTEM, CHAT_TURNS, SAMPLING, prompt
from .stats import CpuWatch, percentile, ratio, summary
from .streaming import Streamed, stream
from .table import Row, fmt, goal_row, mm

LOCALP2P, OFFLOAD, LLAMA = "localp2p", "localp2p-offload", "llama-server"
PLACEMENTS = {"local": "local", "workers": "2 workers"}
#: Goals (issue 14): localp2p ÷ llama-server single-stream decode, 8-stream aggregate,
#: multi-turn speed; TTFT of the last turn ÷ the first.
SINGLE_GOAL, BURST_GOAL, CHAT_SPEED_GOAL, CHAT_GROWTH_GOAL = 0.95, 0.9, 0.9, 1.5
#: The prompt of the determinism check (answered alone, then among others).
DETERMINISM_PROMPT = "Write three short sentences about why the sea is salty, then one about rivers."


@dataclass(frozen=True)
class EnginePlan:
    threads: int
    worker_threads: int
    parallel: int = 8
    rounds: int = 2  # fresh starts of each server per placement, interleaved
    single_reps: int = 3
    single_tokens: int = 64
    streams: int = 8
    stream_tokens: int = 64
    bursts: int = 2
    turns: int = 8
    turn_tokens: int = 64
    placements: tuple[str, ...] = ("local", "workers")
    offload_variant: bool = True  # also localp2p with offload_output: true over workers
    determinism: tuple[str, ...] = ("local", "workers")  # placements where the check runs
    start_timeout: float = 300.0

    @classmethod
    def quick(cls, threads: int, worker_threads: int) -> EnginePlan:
        """A few minutes: one round, fewer repetitions, no offload variant, determinism locally."""
        return cls(
            threads, worker_threads, rounds=1, single_reps=2, bursts=1, stream_tokens=32, offload_variant=False, determinism=("local",)
        )

    def kinds(self, placement: str) -> list[str]:
        return [LOCALP2P, LLAMA] + ([OFFLOAD] if placement == "workers" and self.offload_variant else [])


def label(kind: str, parallel: int) -> str:
    return {
        LOCALP2P: f"localp2p --parallel {parallel}",
        OFFLOAD: f"localp2p --parallel {parallel}, offload_output: true",
        LLAMA: f"llama-server -np {parallel}",
    }[kind]


def offload_models(model: BenchModel) -> str:
    """A --models-path whose one YAML serves ``model`` under its own name with offload_output: true."""
    directory = CACHE / f"models-{model.key}-offload"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{model.key}-offload.yaml").write_text(
        f"name: {model.name}\ncontext_size: {model.context}\noffload_output: true\nparameters:\n  model: {model.path}\n"
    )
    return str(directory)


def _layout(server: Server, placement: str) -> Any:
    """Where the layers went (localp2p: /api/status devices; llama-server: its buffer log lines);
    over workers, RuntimeError unless both are used."""
    if not isinstance(server, llama_server.LlamaServer):
        return check_two_workers(server) if placement == "workers" else server.status().get("devices", [])
    lines = [line.strip() for line in server.proc.stderr().splitlines() if "model buffer size" in line or "offloaded" in line]
    if placement == "workers" and sum("RPC" in line and "model buffer size" in line for line in lines) != 2:
        raise RuntimeError(f"llama-server does not use both workers: {lines}")
    return lines


def _start(procs: Procs, kind: str, placement: str, model: BenchModel, plan: EnginePlan, build: llama_server.Build | None) -> Server:
    name = f"engine-{model.key}-{placement}-{kind}"
    endpoints = []
    if placement == "workers":
        for i in (1, 2):
            endpoints.append(procs.static_worker(plan.worker_threads, name=f"{name}-worker{i}")[1])
    server: Server
    if kind == LLAMA:
        assert build is not None
        server = llama_server.start(
            procs, build, model.path, alias=model.name, threads=plan.threads, context_per_slot=model.context,
            parallel=plan.parallel, rpc_servers=endpoints, mode=cpumode.CpuMode.DEFAULT, name=name, timeout=plan.start_timeout,
        )  # fmt: skip
    else:
        args = ["--models-path", offload_models(model)] if kind == OFFLOAD else model.server_args()
        server = procs.server(
            plan.threads, *args, "--parallel", str(plan.parallel), rpc_servers=endpoints, name=name, timeout=plan.start_timeout
        )
    # A new connection for every request, to both servers alike: llama-server closes idle
    # keep-alive connections after 5 s, and a POST on a closed pooled connection fails.
    server.http.close()
    server.http = httpx.Client(base_url=server.base_url, timeout=600.0, limits=httpx.Limits(max_keepalive_connections=0))
    return server


# -- the measurements ------------------------------------------------------------------------


def _concurrently(server: Server, bodies: list[tuple[str, dict[str, Any]]], **kwargs: Any) -> list[Streamed]:
    """Stream every (path, body) at once, one client and thread each, released together."""
    barrier = threading.Barrier(len(bodies))
    results: list[Streamed | BaseException | None] = [None] * len(bodies)

    def one(i: int, path: str, body: dict[str, Any]) -> None:
        try:
            with httpx.Client(base_url=server.base_url) as http:
                barrier.wait(60)
                results[i] = stream(http, path, body, **{k: v[i] for k, v in kwargs.items()})
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i, *pb), daemon=True) for i, pb in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if not isinstance(r, Streamed)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(bodies)} streams failed: {errors[0]!r}")
    return [r for r in results if isinstance(r, Streamed)]


def _burst(server: Server, model: BenchModel, plan: EnginePlan, burst: int) -> dict[str, Any]:
    first = burst * plan.streams + 1  # different prompts each time (no prefix shared past the first word)
    bodies = [("/v1/completions", completion_body(model.name, prompt(first + i), plan.stream_tokens)) for i in range(plan.streams)]
    streams = _concurrently(server, bodies)
    tokens = sum(s.completion_tokens() for s in streams)
    wall = max(s.end for s in streams) - min(s.started for s in streams)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        "per_stream_tok_s": [(s.completion_tokens() - 1) / s.gen_s for s in streams if s.gen_s > 0],
        "ttft_ms": [s.ttft_s * 1000 for s in streams],
        "gaps_ms": [round(g, 3) for s in streams for g in s.gaps_ms()],
        "chunks": [len(s.times) for s in streams],
    }


def _chat(server: Server, model: BenchModel, plan: EnginePlan) -> dict[str, Any]:
    messages = [{"role": "system", "content": CHAT_SYSTEM}]
    turns: list[dict[str, Any]] = []
    for text in CHAT_TURNS[: plan.turns]:
        messages.append({"role": "user", "content": text})
        body = {"model": model.name, "messages": messages, "max_tokens": plan.turn_tokens, **SAMPLING}
        s = stream(server.http, "/v1/chat/completions", body)
        messages.append({"role": "assistant", "content": s.text})
        details = s.usage.get("prompt_tokens_details") or {}
        turns.append(
            {
                "ttft_ms": s.ttft_s * 1000,
                "prompt_tokens": s.usage.get("prompt_tokens"),
                "completion_tokens": s.usage.get("completion_tokens"),
                "cached_tokens": details.get("cached_tokens", (s.timings or {}).get("cache_n")),
                "server_prompt_ms": (s.timings or {}).get("prompt_ms"),
            }
        )
    return {"turns": turns, "growth": turns[-1]["ttft_ms"] / turns[0]["ttft_ms"]}


def _determinism(server: Server, model: BenchModel, plan: EnginePlan) -> dict[str, Any]:
    probe = completion_body(model.name, DETERMINISM_PROMPT, plan.stream_tokens)
    alone = stream(server.http, "/v1/completions", probe)
    others = plan.streams - 1
    started = [threading.Event() for _ in range(others)]
    bodies = [("/v1/completions", completion_body(model.name, prompt(40 + i), 2 * plan.stream_tokens)) for i in range(others)]
    result: dict[str, Any] = {}

    def background() -> None:
        try:
            result["others"] = _concurrently(server, bodies, on_first=[e.set for e in started])
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    # Send the probe once the others are generating; a server that queues answers them one by
    # one: then go after at most 30 s or when the first of them has ended.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(e.is_set() for e in started) and thread.is_alive():
        time.sleep(0.05)
    batched = stream(server.http, "/v1/completions", probe)
    thread.join()
    if "error" in result:
        raise RuntimeError(f"the other requests failed: {result['error']!r}")
    overlapping = sum(1 for s in result["others"] if s.times[0] < batched.end and s.end > batched.times[0])
    first_difference = next((i for i, (a, b) in enumerate(zip(alone.text, batched.text, strict=False)) if a != b), None)
    if first_difference is None and len(alone.text) != len(batched.text):
        first_difference = min(len(alone.text), len(batched.text))
    return {
        "identical": alone.text == batched.text,
        "first_difference": first_difference,
        "others": others,
        "others_generating_alongside": overlapping,
        "alone": alone.text,
        "batched": batched.text,
    }


def _measure(server: Server, model: BenchModel, plan: EnginePlan, determinism: bool, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"errors": {}}

    def step(name: str, fn: Callable[[], Any]) -> None:
        try:
            out[name] = fn()
        except Exception as exc:  # the other measurements of this start still run
            out["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"      {name} FAILED: {out['errors'][name][:300]}")

    with CpuWatch() as cpu:
        step("warmup", lambda: stream_once(server, model.name, prompt(0), 8))
        step("single", lambda: [stream_once(server, model.name, prompt(rep), plan.single_tokens) for rep in range(1, plan.single_reps + 1)])
        step("bursts", lambda: [_burst(server, model, plan, b) for b in range(plan.bursts)])
        step("chat", lambda: _chat(server, model, plan))
        if determinism:
            step("determinism", lambda: _determinism(server, model, plan))
    out["other_cores"] = cpu.other_cores
    return out


def _describe(m: dict[str, Any], plan: EnginePlan) -> str:
    parts = []
    if m.get("single"):
        parts.append("single " + "/".join(f"{(plan.single_tokens - 1) / r['gen_s']:.1f}" for r in m["single"]) + " tok/s")
    if m.get("bursts"):
        parts.append(f"{plan.streams} streams " + "/".join(f"{b['aggregate_tok_s']:.1f}" for b in m["bursts"]) + " tok/s")
    if m.get("chat"):
        t = m["chat"]["turns"]
        parts.append(f"chat TTFT {t[0]['ttft_ms']:.0f} → {t[-1]['ttft_ms']:.0f} ms ({t[-1]['prompt_tokens']} prompt tokens)")
    if m.get("determinism"):
        d = m["determinism"]
        parts.append(f"determinism {'identical' if d['identical'] else 'DIFFERS'} ({d['others_generating_alongside']} alongside)")
    return "; ".join(parts)


# -- one model ---------------------------------------------------------------------------------


def run(procs: Procs, model: BenchModel, plan: EnginePlan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every placement × kind × round, interleaved; raw results and their summaries."""
    out: dict[str, Any] = {"model": model.label, "plan": dataclasses.asdict(plan), "placements": {}}
    build: llama_server.Build | None = None
    try:
        build = llama_server.ensure(procs, log)
        out["llama_server"] = dataclasses.asdict(build)
    except llama_server.Unavailable as exc:
        out["llama_server"] = {"skipped": str(exc)}
        log(f"  llama-server skipped: {exc}")
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {p: {k: [] for k in plan.kinds(p)} for p in plan.placements}
    errors: dict[str, dict[str, list[str]]] = {p: {k: [] for k in plan.kinds(p)} for p in plan.placements}
    for rnd in range(plan.rounds):
        for placement in plan.placements:
            kinds = [k for k in plan.kinds(placement) if k != LLAMA or build]
            kinds = kinds[rnd % len(kinds) :] + kinds[: rnd % len(kinds)]
            for kind in kinds:
                log(f"  {model.key}, {PLACEMENTS[placement]}, round {rnd + 1}/{plan.rounds}: {label(kind, plan.parallel)}")
                started = time.monotonic()
                try:
                    with procs.group():
                        server = _start(procs, kind, placement, model, plan, build)
                        start_s = time.monotonic() - started
                        layout = _layout(server, placement)
                        m = _measure(server, model, plan, rnd == 0 and placement in plan.determinism, log)
                except Exception as exc:  # the other servers still run
                    errors[placement][kind].append(f"{type(exc).__name__}: {exc}"[:2000])
                    log(f"    FAILED: {errors[placement][kind][-1][:300]}")
                    continue
                m.update(start_s=start_s, layout=layout, seconds=time.monotonic() - started)
                raw[placement][kind].append(m)
                log(f"    {_describe(m, plan)} ({m['seconds']:.0f} s)")
    for placement in plan.placements:
        out["placements"][placement] = {
            kind: {**summarize(raw[placement][kind], plan), "starts": raw[placement][kind], "errors": errors[placement][kind]}
            for kind in plan.kinds(placement)
        }
    return out


def summarize(starts: list[dict[str, Any]], plan: EnginePlan) -> dict[str, Any]:
    """Medians over every start of one server: single stream, bursts, chat, determinism."""
    out: dict[str, Any] = {}
    singles = [dict(r) for m in starts for r in m.get("single") or []]
    if singles:
        out["single"] = aggregate(singles, plan.single_tokens)
        out["single"]["throughput_tok_s"] = summary([r["generated_tokens"] / (r["ttft_s"] + r["gen_s"]) for r in singles])
        served = [r["server_timings"]["predicted_per_second"] for r in singles if r.get("server_timings")]
        out["single"]["server_gen_tok_s"] = summary(served)
    bursts = [b for m in starts for b in m.get("bursts") or []]
    if bursts:
        gaps = [g for b in bursts for g in b["gaps_ms"]]
        ttfts = [t for b in bursts for t in b["ttft_ms"]]
        out["burst"] = {
            "aggregate_tok_s": summary([b["aggregate_tok_s"] for b in bursts]),
            "per_stream_tok_s": summary([x for b in bursts for x in b["per_stream_tok_s"]]),
            "gap_p50_ms": percentile(gaps, 50) if gaps else None,
            "gap_p99_ms": percentile(gaps, 99) if gaps else None,
            "ttft_p50_ms": percentile(ttfts, 50),
            "ttft_p99_ms": percentile(ttfts, 99),
        }
        if "single" in out:
            out["burst"]["vs_single"] = ratio(out["burst"]["aggregate_tok_s"], out["single"]["throughput_tok_s"])
    chats = [m["chat"]["turns"] for m in starts if m.get("chat")]
    if chats:
        per_turn = [summary([c[i]["ttft_ms"] for c in chats]) for i in range(len(chats[0]))]
        out["chat"] = {
            "ttft_ms": per_turn,
            "prompt_tokens": [c[-1]["prompt_tokens"] for c in chats],
            "first_prompt_tokens": [c[0]["prompt_tokens"] for c in chats],
            "growth": ratio(per_turn[-1], per_turn[0]),
        }
    checks = [m["determinism"] for m in starts if m.get("determinism")]
    if checks:
        out["determinism"] = checks[0]
    out["other_cores"] = summary([m["other_cores"] for m in starts if m.get("other_cores") is not None]).get("median")
    return out


# -- the table -----------------------------------------------------------------------------------


def rows(engine: dict[str, Any] | None) -> list[Row]:
    """The engine section's rows, per model and placement, goals judged on localp2p's numbers."""
    out: list[Row] = []
    for key, section in (engine or {}).items():
        if "error" in section:
            out.append(Row(f"Engine {key}", "localp2p vs llama-server", result="ERROR", value=section["error"][:160]))
            continue
        out += _model_rows(key, section)
    return out


def _model_rows(key: str, section: dict[str, Any]) -> list[Row]:
    plan = section["plan"]
    n, streams = plan["parallel"], plan["streams"]
    ref = section.get("llama_server") or {}
    skipped = ref.get("skipped")
    rows = [
        Row(
            f"Engine {key}",
            "llama-server (reference)",
            f"skipped: {skipped}"
            if skipped
            else f"llama.cpp {ref['llama_cpp_build']} from {llama_server.PACKAGE} {ref['version']}, RPC protocol {ref['rpc_protocol']}, "
            f"built in {ref['build_s']:.0f} s{' now' if ref['built_now'] else ' (cached)'}; threads {plan['threads']}, "
            f"workers --threads {plan['worker_threads']}, {plan['rounds']} interleaved round(s)",
        )
    ]
    for placement, kinds in section["placements"].items():
        layer = f"Engine {key}, {PLACEMENTS[placement]}"
        ours, theirs = kinds.get(LOCALP2P) or {}, kinds.get(LLAMA) or {}
        for kind, k in kinds.items():
            if k.get("errors"):
                rows.append(Row(layer, label(kind, n), result="ERROR", value="; ".join(k["errors"])[:200]))
        rows += _single_rows(layer, n, ours, theirs, kinds.get(OFFLOAD))
        rows += _burst_rows(layer, n, streams, kinds)
        rows += _chat_rows(layer, n, plan, kinds)
        for kind, k in kinds.items():
            d = k.get("determinism")
            if d:
                same = "identical" if d["identical"] else f"differs from character {d['first_difference']}"
                rows.append(
                    Row(
                        layer,
                        f"determinism, {label(kind, n)}: greedy answer alone vs with {d['others']} other requests running",
                        f"{same} ({d['others_generating_alongside']} of {d['others']} others generating alongside)",
                    )
                )
    return rows


def _vs(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> float | None:
    return ratio(ours, theirs) if ours and theirs else None


def _single_rows(layer: str, n: int, ours: dict[str, Any], theirs: dict[str, Any], offload: dict[str, Any] | None) -> list[Row]:
    rows = []
    for kind, k in ((LOCALP2P, ours), (OFFLOAD, offload or {}), (LLAMA, theirs)):
        s = k.get("single")
        if not s:
            continue
        served = f" (its own timings: {mm(s['server_gen_tok_s'], 'tok/s')})" if s["server_gen_tok_s"]["n"] else ""
        other = "" if k.get("other_cores") is None else f" · other processes {k['other_cores']:.2f} cores"
        value = f"gen {mm(s['gen_tok_s'], 'tok/s')}{served} · TTFT {mm(s['ttft_ms'], 'ms')}{other}"
        rows.append(Row(layer, f"single stream, {label(kind, n)}", value))
    s_ours, s_theirs = ours.get("single"), theirs.get("single")
    if s_ours and s_theirs:
        r = _vs(s_ours["gen_tok_s"], s_theirs["gen_tok_s"])
        rows.append(
            goal_row(
                layer, "single stream: localp2p ÷ llama-server, decode tok/s", "", r, SINGLE_GOAL, True, f"≥ {SINGLE_GOAL}",
                fmt(r, digits=2), chart="ratio", label=f"{layer}: single-stream decode, localp2p ÷ llama-server",
            )
        )  # fmt: skip
    if offload and offload.get("single") and s_ours:
        r = _vs(offload["single"]["gen_tok_s"], s_ours["gen_tok_s"])
        what = "single stream: output layer on the workers (offload_output) ÷ on the server, decode tok/s"
        rows.append(Row(layer, what, "", fmt(r, digits=2)))
    return rows


def _burst_rows(layer: str, n: int, streams: int, kinds: dict[str, dict[str, Any]]) -> list[Row]:
    rows = []
    for kind, k in kinds.items():
        b = k.get("burst")
        if not b:
            continue
        rows.append(
            Row(
                layer,
                f"{streams} concurrent streams, {label(kind, n)}",
                f"aggregate {mm(b['aggregate_tok_s'], 'tok/s')} · per stream {mm(b['per_stream_tok_s'], 'tok/s')} · "
                f"token gap p50/p99 {fmt(b['gap_p50_ms'])}/{fmt(b['gap_p99_ms'])} ms · TTFT p50/p99 "
                f"{fmt(b['ttft_p50_ms'])}/{fmt(b['ttft_p99_ms'])} ms",
                f"{streams} ÷ 1 stream {fmt(b.get('vs_single'), digits=2)}",
            )
        )
    ours, theirs = (kinds.get(LOCALP2P) or {}).get("burst"), (kinds.get(LLAMA) or {}).get("burst")
    if ours and theirs:
        r = _vs(ours["aggregate_tok_s"], theirs["aggregate_tok_s"])
        rows.append(
            goal_row(
                layer, f"{streams} streams: localp2p ÷ llama-server, aggregate tok/s", "", r, BURST_GOAL, True, f"≥ {BURST_GOAL}",
                fmt(r, digits=2), chart="ratio", label=f"{layer}: {streams}-stream aggregate, localp2p ÷ llama-server",
            )
        )  # fmt: skip
    offload = (kinds.get(OFFLOAD) or {}).get("burst")
    if offload and ours:
        r = _vs(offload["aggregate_tok_s"], ours["aggregate_tok_s"])
        rows.append(Row(layer, f"{streams} streams: output layer on the workers ÷ on the server, aggregate tok/s", "", fmt(r, digits=2)))
    return rows


def _chat_rows(layer: str, n: int, plan: dict[str, Any], kinds: dict[str, dict[str, Any]]) -> list[Row]:
    rows = []
    turns = plan["turns"]
    for kind, k in kinds.items():
        c = k.get("chat")
        if not c:
            continue
        t = c["ttft_ms"]
        mid = f" → turn {len(t) // 2} {fmt(t[len(t) // 2 - 1]['median'])} ms" if len(t) >= 4 else ""
        value = (
            f"TTFT turn 1 {mm(t[0], 'ms')}{mid} → turn {len(t)} {mm(t[-1], 'ms')} · "
            f"prompt {min(c['first_prompt_tokens'])} → {min(c['prompt_tokens'])} tokens"
        )
        rows.append(
            goal_row(
                layer, f"multi-turn chat ({turns} turns, history resent), {label(kind, n)}: TTFT turn {turns} ÷ turn 1", value,
                c["growth"], CHAT_GROWTH_GOAL, False, f"≤ {CHAT_GROWTH_GOAL}", fmt(c["growth"], digits=2), chart="ratio",
                label=f"{layer}: chat TTFT turn {turns} ÷ turn 1, {kind}",
            )
        )  # fmt: skip
    ours, theirs = (kinds.get(LOCALP2P) or {}).get("chat"), (kinds.get(LLAMA) or {}).get("chat")
    if ours and theirs:
        speed = _vs(theirs["ttft_ms"][-1], ours["ttft_ms"][-1])
        rows.append(
            goal_row(
                layer, f"multi-turn chat: speed localp2p vs llama-server = llama-server TTFT ÷ localp2p TTFT at turn {turns} "
                "(higher is better)", "", speed, CHAT_SPEED_GOAL, True, f"≥ {CHAT_SPEED_GOAL}", fmt(speed, digits=2),
                chart="ratio", label=f"{layer}: chat turn-{turns} TTFT, llama-server ÷ localp2p",
            )
        )  # fmt: skip
    return rows
