"""Mesh API (issue 15): a request through the lite client against the same request straight to the server.

One ``localp2p run --p2p`` server (its model loaded locally, no workers) and one
``localp2p client`` on this machine, the same network token, found by mDNS (``--p2p-no-dht``).
Each repetition sends the same streamed greedy ``/v1/completions`` (a tiny prompt,
``ignore_eos``) once straight to the server and once through the client, in alternating
order (both hit the same prompt cache: one warm-up of each first).

* ``ttft_ms``   request sent → first text chunk, client-side
* ``gen_tok_s`` (N - 1) ÷ (last - first text chunk)

Rows: TTFT overhead = median(through the client) - median(straight), goal ≤ 10 ms; generation
tok/s ratio = median(through) ÷ median(straight), goal ≥ 0.98.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from localp2p.testing import cluster

from .generation import derive, stream_once
from .models import BenchModel
from .procs import Procs, Server, new_token
from .stats import ratio, summary
from .table import Row, fmt, goal_row, mm

TTFT_GOAL_MS = 10.0
GEN_RATIO_GOAL = 0.98
#: A tiny prompt: what is measured is the hop, not the prompt's processing.
TINY_PROMPT = "Hello"
#: Repetitions of each path: a 2-core box's TTFT spread (20-50 ms) is several times the
#: overhead measured; at 10 the median overhead moved 5-25 ms between runs, at 40 it was 5.6.
REPS = 30
#: Seconds the client may take to find the server (mDNS, then its first announcement).
FIND_LIMIT = 60.0


@dataclass
class MeshPlan:
    reps: int = REPS
    max_tokens: int = 64
    threads: int = 1


def _wait_found(client: Server, model: str) -> None:
    deadline = time.monotonic() + FIND_LIMIT
    while time.monotonic() < deadline:
        try:
            if any(m["id"] == model for m in client.http.get("/v1/models").json()["data"]):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the client did not find the server within {FIND_LIMIT:.0f} s")


def run(procs: Procs, model: BenchModel, plan: MeshPlan, log: Any = print) -> dict[str, Any]:
    """Measure; every process is stopped before this returns (procs owns them)."""
    token = new_token()
    server = procs.p2p_server(token, plan.threads, "--p2p-no-dht", *model.server_args(), name="mesh-server")
    port = cluster.free_port()
    state = procs.log_dir / "state-mesh-client"
    proc = procs.localp2p(
        ["client", "--address", f"127.0.0.1:{port}", "--p2p-no-dht", "--state-dir", str(state)], "mesh-client", {"TOKEN": token}
    )
    proc.wait_line("localp2p client ready")
    client = Server(proc, f"http://127.0.0.1:{port}")
    try:
        _wait_found(client, model.name)
        targets = {"straight": server, "client": client}
        runs: dict[str, list[dict[str, Any]]] = {"straight": [], "client": []}
        for target in targets.values():  # warm-up: the prompt cache, the stream, the connection
            stream_once(target, model.name, TINY_PROMPT, plan.max_tokens)
        for rep in range(plan.reps):
            order = ["straight", "client"] if rep % 2 == 0 else ["client", "straight"]
            for name in order:
                runs[name].append(derive(stream_once(targets[name], model.name, TINY_PROMPT, plan.max_tokens), plan.max_tokens))
        out: dict[str, Any] = {}
        for name, measured in runs.items():
            out[name] = {
                "ttft_ms": summary([r["ttft_ms"] for r in measured]),
                "gen_tok_s": summary([r["gen_tok_s"] for r in measured]),
                "runs": measured,
            }
        out["ttft_overhead_ms"] = out["client"]["ttft_ms"]["median"] - out["straight"]["ttft_ms"]["median"]
        out["gen_ratio"] = ratio(out["client"]["gen_tok_s"], out["straight"]["gen_tok_s"])
        out["max_tokens"], out["prompt"], out["reps"] = plan.max_tokens, TINY_PROMPT, plan.reps
        log(
            f"mesh: TTFT straight {mm(out['straight']['ttft_ms'], 'ms')}, through the client {mm(out['client']['ttft_ms'], 'ms')}; "
            f"gen ratio {out['gen_ratio']}"
        )
        return out
    finally:
        procs.stop(client)
        procs.stop(server)


def rows(mesh: dict[str, Any] | None) -> list[Row]:
    """The table rows of a :func:`run` result (none when the section did not run)."""
    layer = "mesh API"
    if mesh is None:
        return []
    if "error" in mesh:
        return [Row(layer, "through the lite client vs straight to the server", mesh["error"][:160], result="ERROR")]
    straight, through = mesh["straight"], mesh["client"]
    overhead = mesh["ttft_overhead_ms"]
    value = f"straight {mm(straight['ttft_ms'], 'ms')} · through the client {mm(through['ttft_ms'], 'ms')}"
    gen = f"straight {mm(straight['gen_tok_s'], 'tok/s')} · through the client {mm(through['gen_tok_s'], 'tok/s')}"
    return [
        goal_row(
            layer,
            f"TTFT overhead of the lite client (median, prompt {mesh['prompt']!r})",
            value,
            overhead,
            TTFT_GOAL_MS,
            False,
            f"≤ {TTFT_GOAL_MS:.0f} ms",
            ratio_text=f"+{fmt(overhead, 'ms')}",
        ),
        goal_row(
            layer,
            f"generation tok/s through the client ÷ straight ({mesh['max_tokens']} tokens)",
            gen,
            mesh["gen_ratio"],
            GEN_RATIO_GOAL,
            True,
            f"≥ {GEN_RATIO_GOAL}",
            ratio_text=fmt(mesh["gen_ratio"]),
            chart="ratio",
        ),
    ]
