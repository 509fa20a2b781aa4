"""Turn one run's raw results into the table (markdown), the JSON file and the chart.

Every row is one measurement or one ratio; ratios are ratios of medians measured in
the same run, printed next to their goal with PASS or MISS.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import asdict
from typing import Any

from . import engine, mesh, nat
from .generation import CONFIGS, LABELS
from .stats import ratio
from .table import Row, fmt, goal_row, mm
from .weights import rows as weights_rows


def _median_other(runs: list[dict[str, Any]]) -> float | None:
    values = sorted(r["other_cores"] for r in runs if r.get("other_cores") is not None)
    return values[len(values) // 2] if values else None


def _other(section: dict[str, Any]) -> str:
    """How busy the rest of the machine was while this was measured."""
    cores = section.get("other_cores")
    return "" if cores is None else f" · other processes {cores:.2f} cores"


def build_rows(results: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    sections = results["sections"]

    link = sections.get("link")
    if link and "error" not in link:
        d, t = link["paths"]["direct"], link["paths"]["tunnel"]
        mb = link["plan"]["bulk_bytes"] / 1e6
        size = link["plan"]["message_size"]

        def pair(what: str, key: str, unit: str, chart_label: str, *, higher_is_better: bool = True) -> None:
            """A direct row and a tunnel row with its tunnel ÷ direct ratio (charted)."""
            r = ratio(t[key], d[key])
            rows.append(Row("Link", f"{what}, direct TCP", mm(d[key], unit)))
            rows.append(
                Row(
                    "Link",
                    f"{what}, tunnel",
                    mm(t[key], unit),
                    f"tunnel ÷ direct {fmt(r)}",
                    chart="ratio",
                    number=r,
                    higher_is_better=higher_is_better,
                    label=f"Link: {chart_label}, tunnel ÷ direct",
                )
            )

        pair(f"bulk {mb:.0f} MB one way + ack", "bulk_mb_s", "MB/s", "bulk MB/s")
        pair(f"{size} B round trip p50", "rtt_p50_us", "µs", f"{size} B round trip p50", higher_is_better=False)
        rows.append(
            Row(
                "Link",
                f"{size} B round trip p99, direct / tunnel",
                f"{mm(d['rtt_p99_us'], 'µs')} / {mm(t['rtt_p99_us'], 'µs')}",
                f"tunnel ÷ direct {fmt(ratio(t['rtt_p99_us'], d['rtt_p99_us']))}",
            )
        )
        relay_cpu = link.get("tunnel_cpu_us_per_round_trip")
        if relay_cpu:
            rows.append(
                Row(
                    "Link",
                    f"CPU per {size} B round trip through the tunnel, server end / worker end (+ echo)",
                    f"{mm(relay_cpu['server'], 'µs')} / {mm(relay_cpu['worker'], 'µs')}",
                )
            )
        rows.append(
            Row(
                "Link",
                "new connection to first echoed byte, direct / tunnel",
                f"{mm(d['connect_ms'], 'ms', digits=2)} / {mm(t['connect_ms'], 'ms', digits=2)}{_other(link)}",
            )
        )
    elif link:
        rows.append(Row("Link", "tunnel vs direct TCP", result="ERROR", value=link["error"][:120]))

    for key, gen in sections.get("generation", {}).items():
        layer = f"Generation {key}"
        if "error" in gen:
            rows.append(Row(layer, "(a)–(d)", result="ERROR", value=gen["error"][:120]))
            continue
        configs = gen["configs"]
        for name, error in gen.get("errors", {}).items():
            rows.append(Row(layer, LABELS[name], error[:160], result="ERROR"))
        for name in CONFIGS:
            c = configs.get(name)
            if not c:
                continue
            layout = ""
            if c.get("devices"):
                layout = " · layers " + "+".join(str(dv["layers"]) for dv in c["devices"]) + " on workers"
            rows.append(
                Row(
                    layer,
                    LABELS[name],
                    f"gen {mm(c['gen_tok_s'], 'tok/s')} · pp {mm(c['pp_tok_s'], 'tok/s')} · TTFT {mm(c['ttft_ms'], 'ms')}"
                    f"{layout}{_other(c)}",
                )
            )

        def gen_ratio(a: str, b: str, metric: str = "gen_tok_s", configs: dict[str, Any] = configs) -> float | None:
            return ratio(configs.get(a, {}).get(metric), configs.get(b, {}).get(metric))

        p2p = gen_ratio("p2p", "static")
        rows.append(
            goal_row(
                layer,
                "p2p ÷ static (direct TCP), generation tok/s",
                "",
                p2p,
                0.9,
                True,
                "≥ 0.9",
                f"{fmt(p2p)} (pp {fmt(gen_ratio('p2p', 'static', 'pp_tok_s'))})",
                chart="ratio",
            )
        )
        two = gen_ratio("static", "local")
        rows.append(
            goal_row(
                layer,
                "2 workers (static) ÷ local, generation tok/s",
                "",
                two,
                0.9,
                True,
                "≥ 0.9",
                f"{fmt(two)} (pp {fmt(gen_ratio('static', 'local', 'pp_tok_s'))})",
                chart="ratio",
            )
        )
        api = gen_ratio("local", "inproc")
        rows.append(
            Row(
                layer,
                "HTTP API ÷ in-process, generation tok/s",
                "",
                f"{fmt(api)} (pp {fmt(gen_ratio('local', 'inproc', 'pp_tok_s'))})",
                chart="ratio",
                number=api,
            )
        )

        ld = gen.get("load")
        if ld:
            llayer = f"Load {key}"
            weights = ld["weights"]["worker_weight_bytes"]
            paths, r = ld["paths"], ld["ratios"]
            for path, label in (("direct", "direct TCP"), ("tunnel", "tunnels")):
                first = paths[path]["first"]
                text = f"{mm(first['load_s'], 's')} · {mm(first['bytes_sent'], 'MB', 1e-6)} sent"
                text += _other({"other_cores": _median_other(first["runs"])})
                if path == "tunnel":
                    row = goal_row(
                        llayer,
                        f"first load, {label}",
                        text,
                        r["tunnel_vs_direct_first_load"],
                        2.0,
                        False,
                        "≤ 2× direct",
                        f"tunnel ÷ direct {fmt(r['tunnel_vs_direct_first_load'])}",
                        chart="ratio",
                    )
                    row.label = f"{llayer}: first load seconds, tunnels ÷ direct"
                    rows.append(row)
                else:
                    rows.append(Row(llayer, f"first load, {label}", f"{text} (worker weights {weights / 1e6:,.0f} MB)"))
            for path, label in (("direct", "direct TCP"), ("tunnel", "tunnels")):
                cached = paths[path]["cached"]
                frac = r[f"{path}_cached_fraction"]
                row = goal_row(
                    llayer,
                    f"cached reload (--cache-dir), {label}",
                    f"{mm(cached['load_s'], 's')} · {mm(cached['bytes_sent'], 'MB', 1e-6, digits=2)} sent",
                    frac,
                    0.01,
                    False,
                    "< 1 % of weights",
                    f"{fmt(frac * 100 if frac is not None else None, digits=3)} % of weights",
                    chart="ratio",
                )
                row.label = f"{llayer}: cached reload bytes ÷ weight bytes, {label}"
                rows.append(row)

    disc = sections.get("discovery")
    if disc and "error" not in disc:
        for mode, label, limit in (("mdns", "mDNS only", 2.0), ("dht", "DHT only (bootstrap given)", 10.0)):
            m = disc.get(mode)
            if not m:
                continue
            rows.append(
                goal_row(
                    "Discovery",
                    f"{label}: worker start → listed online in /api/p2p",
                    f"{mm(m['listed_s'], 's')} (its own start-up, to 'worker ready': {mm(m['ready_s'], 's')})",
                    m["listed_s"]["median"],
                    limit,
                    False,
                    f"≤ {limit:.0f} s",
                    label=f"{label}: worker start → listed",
                )
            )
        for mode, label in (("mdns", "mDNS"), ("dht", "DHT")):
            m = disc.get(mode)
            if not m:
                continue
            rows.append(
                goal_row(
                    "Discovery",
                    f"{label}: worker start → used by the next request (no restart)",
                    mm(m["used_s"], "s"),
                    m["used_s"]["median"],
                    15.0,
                    False,
                    "≤ 15 s",
                    label=f"{label}: worker start → used by a request",
                )
            )
        for mode, label in (("mdns", "mDNS"), ("dht", "DHT")):
            m = disc.get(mode)
            if m and m["dropped_s"]["n"]:
                rows.append(
                    Row("Discovery", f"{label}: worker stopped → dropped, server ready again locally", mm(m["dropped_s"], "s"))
                )
    elif disc:
        rows.append(Row("Discovery", "mDNS / DHT", result="ERROR", value=disc["error"][:120]))

    rows += _cpu_mode_rows(sections.get("cpu_modes"))

    for key, gen in sections.get("generation", {}).items():
        c, api = gen.get("configs", {}), gen.get("api_overhead")
        if not api:
            continue
        tiny = api.get("tiny")
        if tiny:
            rows.append(
                goal_row(
                    "API overhead",
                    f"{key}: TTFT, (b) HTTP API − (a) in-process, tiny prompt ({tiny['prompt_tokens']['median']:.0f} tokens), "
                    f"{tiny['ttft_ms']['n']} paired requests",
                    f"{mm(tiny['ttft_ms'], 'ms')} (TTFT {fmt(tiny['local_ttft_ms']['median'])} vs "
                    f"{fmt(tiny['inproc_ttft_ms']['median'])} ms)",
                    tiny["ttft_ms"]["median"],
                    20.0,
                    False,
                    "≤ 20 ms",
                    f"{tiny['ttft_ms']['median']:+.1f} ms",
                    label=f"{key}: API TTFT overhead (tiny prompt), ms",
                )
            )
        ttft = api["ttft_ms"]
        rows.append(
            Row(
                "API overhead",
                f"{key}: TTFT, (b) − (a), the ~95-token prompt, paired (compute noise ≫ overhead: not judged)",
                f"{mm(ttft, 'ms')} (TTFT {fmt(c['local']['ttft_ms']['median'])} vs "
                f"{fmt(c['inproc']['ttft_ms']['median'])} ms)",
                f"{ttft['median']:+.1f} ms",
            )
        )
        per_token = api["per_token_ms"]
        rows.append(
            Row(
                "API overhead",
                f"{key}: per generated token, (b) − (a), paired",
                f"{mm(per_token, 'ms', digits=2)} ({fmt(c['local']['per_token_ms']['median'])} vs "
                f"{fmt(c['inproc']['per_token_ms']['median'])} ms/token)",
                f"{per_token['median']:+.2f} ms/token",
            )
        )
    rows += engine.rows(sections.get("engine"))
    rows += nat.rows(sections.get("nat"))
    rows += weights_rows(sections.get("weights"))
    rows += mesh.rows(sections.get("mesh"))
    return rows


def _cpu_mode_rows(cpu: dict[str, Any] | None) -> list[Row]:
    """One row per model and CPU mode (prompt and generation tok/s), with mode ÷ default."""
    if not cpu:
        return []
    if "error" in cpu:
        return [Row("CPU modes", "default / safe / amx", result="ERROR", value=cpu["error"][:120])]
    rows = []
    for label, modes in cpu["models"].items():
        base = modes.get("default")
        for mode, m in modes.items():
            buffers = ", ".join(sorted(m.get("weight_buffers") or {})) or "?"
            ratio_text = ""
            if mode != "default" and base:
                pp, gen = ratio(m["pp_tok_s"], base["pp_tok_s"]), ratio(m["gen_tok_s"], base["gen_tok_s"])
                ratio_text = f"pp {fmt(pp, digits=2)}× · gen {fmt(gen, digits=2)}× of default"
            rows.append(
                Row(
                    "CPU modes",
                    f"{label}, mode {mode} (weights in {buffers}), {cpu['cpu']}",
                    f"pp {mm(m['pp_tok_s'], 'tok/s')} · gen {mm(m['gen_tok_s'], 'tok/s')}",
                    ratio_text,
                )
            )
    return rows


def markdown(results: dict[str, Any], rows: list[Row]) -> str:
    m = results["machine"]
    lines = [
        f"# localp2p benchmarks ({'quick' if results['quick'] else 'full'} run)",
        "",
        f"{m['date']} · {m['cpu_model']} · {m['cores']} cores · {m['memory_gib']:.0f} GiB · Python {m['python']} · "
        f"llama-cpp-python {m['llama_cpp_python']} · llama.cpp RPC protocol {m['rpc_protocol']} · "
        f"git {m['git']} · load average {m['loadavg_start']} → {m['loadavg_end']} · wall {results['wall_s']:.0f} s",
        "",
        f"llama.cpp build's devices (every row's prompt and generation tok/s are theirs): {m.get('devices', 'not recorded')}",
        "",
        f"Threads: server and in-process `--threads {results['threads']}`, workers `--threads {results['worker_threads']}`, "
        "the same everywhere (default: half the cores, llama-cpp-python's own default, so the Python layers under test "
        "- HTTP, gRPC, tunnel relays - are not fighting llama.cpp's thread barriers for the cores). "
        "'other processes' = CPU used meanwhile by processes that are not the bench's: the noise.",
        "Generation: greedy, fixed prompt (~95 tokens), `ignore_eos`, streamed `/v1/completions`; "
        "pp = prompt tokens ÷ TTFT, gen = (N − 1) ÷ (last − first token). (a)–(d) run side by side and are measured "
        "interleaved (same prompt to each in turn, rotating order), so drifts of the shared machine hit all four alike.",
    ]
    runs: dict[tuple[Any, ...], list[str]] = {}
    for key, origin in (results.get("merged") or {}).items():
        runs.setdefault((origin["quick"], origin["date"], origin["git"]), []).append(key)
    for (quick, date, git), keys in runs.items():
        lines.append(
            f"Sections {', '.join(keys)}: from the {'quick' if quick else 'full'} run of {date} (git {git}), kept by `--merge`; "
            "the others measured in this run."
        )
    for note in results.get("notes", []):
        lines.append(note)
    lines += [
        "Cells: median [min – max] over the repetitions; ratios are of medians measured in this run.",
        "",
        "| Layer | Measurement | Median [min – max] | Ratio | Goal | Result |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        result = f"**{r.result}**" if r.result in ("MISS", "ERROR") else r.result
        lines.append(f"| {r.layer} | {r.measurement} | {r.value} | {r.ratio} | {r.goal} | {result} |")
    misses = [r for r in rows if r.result in ("MISS", "ERROR")]
    lines += ["", f"Goals: {sum(r.result == 'PASS' for r in rows)} PASS, {len(misses)} MISS/ERROR."]
    return "\n".join(lines) + "\n"


def chart(rows: list[Row], path: pathlib.Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ratios = [r for r in rows if r.chart == "ratio" and r.number]
    goals = [r for r in rows if r.chart == "goal" and r.number is not None and r.limit]
    colour = {"PASS": "#3a9a4a", "MISS": "#c8423b", "": "#8a8f98"}
    fig, axes = plt.subplots(
        2,
        1,
        figsize=(11, 0.42 * (len(ratios) + len(goals)) + 2.6),
        gridspec_kw={"height_ratios": [max(len(ratios), 1), max(len(goals), 1)]},
    )
    ax = axes[0]
    labels = [r.label or f"{r.layer}: {r.measurement}" for r in ratios]
    ax.barh(range(len(ratios)), [r.number for r in ratios], color=[colour.get(r.result, "#8a8f98") for r in ratios])
    for i, r in enumerate(ratios):
        ax.text(r.number, i, f"  {r.number:.3g}", va="center", fontsize=8)
        if r.limit:
            ax.plot([r.limit, r.limit], [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax.set_xscale("log")
    numbers = [float(x) for r in ratios for x in (r.number, r.limit) if x] or [1.0]  # a run with no ratio rows
    ax.set_xlim(min(numbers) / 2, max(numbers) * 4)
    ax.set_yticks(range(len(ratios)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="#444", linewidth=0.8, linestyle=":")
    ax.set_title("Ratios measured in this run (black tick: goal; green PASS, red MISS, grey: no goal)", fontsize=9)
    ax = axes[1]
    labels = [r.label or f"{r.layer}: {r.measurement}" for r in goals]
    values = [r.number / r.limit * 100 for r in goals]  # type: ignore[operator]
    ax.barh(range(len(goals)), values, color=[colour.get(r.result, "#8a8f98") for r in goals])
    for i, (r, v) in enumerate(zip(goals, values, strict=True)):
        ax.text(v, i, f"  {r.number:.3g} (goal {r.goal})", va="center", fontsize=8)
    ax.axvline(100, color="black", linewidth=1.5)
    ax.set_xlim(0, max([*values, 100]) * 1.35)
    ax.set_yticks(range(len(goals)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("% of the limit (≤ 100 % passes)")
    ax.set_title("Time goals", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out_dir: pathlib.Path) -> tuple[str, list[Row]]:
    rows = build_rows(results)
    results["rows"] = [asdict(r) for r in rows]
    text = markdown(results, rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.md").write_text(text)
    (out_dir / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    try:
        chart(
            rows,
            out_dir / "latest.png",
            f"localp2p benchmarks · {results['machine']['date']} · {results['machine']['cores']} cores",
        )
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
    return text, rows
