"""What each CPU mode (localp2p.cpumode) costs: prompt processing and generation tokens/s.

Each measurement is one ``backends.llama_cpp.selftest --bench`` child (the mode is
process-wide), loading the model the way the backend does. The modes run interleaved,
``reps`` rounds, so drift of the machine's speed hits them alike. Two models: the
embedded SmolLM2 (Q4_1: no repack exists for it, so default and safe differ only in
ggml's tiled matmul and op fusion) and a generated Q4_0 model (repacked on AVX2 CPUs:
the speed-up that safe mode gives up, and that default mode keeps). ``amx`` runs only
on CPUs with AMX.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from localp2p import cpumode
from localp2p.config import embedded_model_path
from localp2p.genmodel import Shape, write_model

from .models import CACHE
from .stats import summary

#: A small llama in Q4_0 (the weight type llama.cpp repacks on AVX2): 8 blocks of 1024.
SHAPE_Q4_0 = Shape(layers=8, embd=1024, ff=2816, heads=16, kv_heads=4, tensor_type="q4_0")
#: Seconds one measurement may take (load, prompt, generation) before it counts as failed.
RUN_TIMEOUT = 300.0


@dataclass(frozen=True)
class CpuPlan:
    reps: int = 3
    prompt_tokens: int = 256
    gen_tokens: int = 64
    threads: int = 1


def _q4_0_model(log: Callable[[str], None]) -> pathlib.Path:
    s = SHAPE_Q4_0
    path = CACHE / f"random-llama-{s.layers}x{s.embd}-ff{s.ff}-h{s.heads}-kv{s.kv_heads}-{s.tensor_type}.gguf"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        log(f"  writing {path.name} (random weights, once; cached in bench/.cache/) ...")
        write_model(path.with_suffix(".tmp"), s).rename(path)
    return path


def _measure(model: pathlib.Path, mode: cpumode.CpuMode, plan: CpuPlan) -> dict[str, Any]:
    argv = [
        sys.executable, "-m", "backends.llama_cpp.selftest", str(model),
        "--threads", str(plan.threads), "--bench", str(plan.prompt_tokens), str(plan.gen_tokens),
    ]  # fmt: skip
    done = subprocess.run(argv, env=cpumode.child_env(mode, os.environ), capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"selftest in mode {mode.value} exited with {done.returncode}: {done.stderr[-500:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run(plan: CpuPlan, log: Callable[[str], None]) -> dict[str, Any]:
    modes = [cpumode.CpuMode.DEFAULT, cpumode.CpuMode.SAFE] + ([cpumode.CpuMode.AMX] if cpumode.has_amx() else [])
    bench_models = {"smollm2 (Q4_1)": embedded_model_path(), "random 8x1024 (Q4_0)": _q4_0_model(log)}
    out: dict[str, Any] = {
        "cpu": cpumode.cpu_name(),
        "amx_cpu": cpumode.has_amx(),
        "plan": vars(plan),
        "models": {},
    }
    for label, path in bench_models.items():
        raw: dict[str, dict[str, list[float]]] = {m.value: {"pp": [], "gen": []} for m in modes}
        buffers: dict[str, Any] = {}
        for rep in range(plan.reps):
            for mode in modes:
                result = _measure(path, mode, plan)
                raw[mode.value]["pp"].append(result["prompt_tokens_per_s"])
                raw[mode.value]["gen"].append(result["gen_tokens_per_s"])
                buffers[mode.value] = result["weight_buffers"]
            log(f"  {label} round {rep + 1}/{plan.reps}: " + ", ".join(f"{m}: gen {v['gen'][-1]:.1f} tok/s" for m, v in raw.items()))
        out["models"][label] = {
            mode: {"pp_tok_s": summary(v["pp"]), "gen_tok_s": summary(v["gen"]), "weight_buffers": buffers[mode]}
            for mode, v in raw.items()
        }
    return out
