"""One decode in a throw-away process: does llama.cpp run on this CPU, in this CPU mode?

``python -m backends.llama_cpp.selftest MODEL.gguf`` loads the model the way the backend
does (same CPU mode from ``LOCALP2P_CPU_MODE``, same extra-buffer choice), evaluates a
short prompt, samples one token greedily and prints one JSON line: the token, the
buffer types that hold the weights and the CPU features llama.cpp was built for. A
crash kills only this process; ``localp2p doctor`` reads its exit code.

``--bench PROMPT_TOKENS GEN_TOKENS`` adds prompt-processing and generation speeds
(tokens/s) to the line: ``make bench`` compares the CPU modes with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

#: Prompt of the one-token check: any model answers it with a plausible word.
PROMPT = "The capital of France is"
#: Context of the check: the prompt and a bench run fit easily; allocates little.
SELFTEST_CONTEXT = 1024


def _llama(model_file: str, threads: int, extra_bufts: bool) -> Any:
    import llama_cpp  # noqa: PLC0415

    from .model_params import extra_buffer_types  # noqa: PLC0415

    with extra_buffer_types(extra_bufts):
        return llama_cpp.Llama(
            model_path=model_file,
            n_ctx=SELFTEST_CONTEXT,
            n_threads=threads or None,
            n_gpu_layers=0,
            verbose=False,
        )


def _greedy(llm: Any, tokens: list[int], n: int) -> tuple[list[int], float, float]:
    """Evaluate ``tokens``, then generate ``n`` greedily; (ids, prompt seconds, generation seconds)."""
    llm.reset()
    started = time.perf_counter()
    llm.eval(tokens)
    prompt_s = time.perf_counter() - started
    out: list[int] = []
    started = time.perf_counter()
    for _ in range(n):
        token = llm.sample(temp=0.0)
        out.append(token)
        llm.eval([token])
    return out, prompt_s, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.llama_cpp.selftest")
    parser.add_argument("model_file")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--bench", type=int, nargs=2, metavar=("PROMPT_TOKENS", "GEN_TOKENS"))
    args = parser.parse_args(argv)

    from localp2p import cpumode  # noqa: PLC0415
    from localp2p.logs import configure_logging, get_logger  # noqa: PLC0415

    from .__main__ import enter_cpu_mode  # noqa: PLC0415
    from .model_params import LoadLog  # noqa: PLC0415

    configure_logging(process="selftest")
    mode, extra_bufts = enter_cpu_mode(get_logger("selftest"))
    load_log = LoadLog()
    load_log.install()
    llm = _llama(args.model_file, args.threads, extra_bufts)
    import llama_cpp  # noqa: PLC0415

    cpumode.crash_failpoint(mode)
    prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
    ids, _, _ = _greedy(llm, prompt, 1)
    result: dict[str, Any] = {
        "ok": True,
        "cpu_mode": mode.value,
        "extra_buffer_types": extra_bufts,
        "weight_buffers": load_log.weight_buffers,
        "token": llm.detokenize(ids).decode("utf-8", "replace"),
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
    }
    if args.bench:
        n_prompt, n_gen = args.bench
        filler = llm.tokenize((" " + PROMPT).encode() * (n_prompt // len(prompt) + 1), add_bos=False)
        tokens = [llm.token_bos(), *filler][:n_prompt]
        _, prompt_s, gen_s = _greedy(llm, tokens, n_gen)
        result["prompt_tokens_per_s"] = round(len(tokens) / prompt_s, 1)
        result["gen_tokens_per_s"] = round(n_gen / gen_s, 1)
    print(json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # no llama.cpp destructors: nothing to gain, and they can be slow


if __name__ == "__main__":
    sys.exit(main())
