"""Generation with llama-cpp-python called directly: no server, no gRPC, no HTTP.

    python -m bench.inproc MODEL.gguf --threads 1 --ctx 2048

Loads the model, prints ``{"ready": true, "load_s": ...}``, then answers one JSON line
per request line read on stdin (``{"rep": 3, "max_tokens": 64, "tiny": false}`` -> one
measurement, see bench.prompts)
until stdin closes. bench.generation drives it between the requests it sends to the
servers, so (a) and (b)-(d) are measured interleaved, under the same machine noise.

The Llama(...) arguments and sampling are the backend's (backends/llama_cpp/server.py:
n_ctx, n_threads, n_batch 512, mmap, op_offload off; temperature 0, top_k 40, top_p 1,
min_p 0.05, every end-of-generation token banned as for ``ignore_eos``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from bench.prompts import SAMPLING, prompt


def measure(llm: Any, text: str, max_tokens: int, banned: dict[int, float]) -> dict[str, Any]:
    prompt_tokens = len(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
    started = time.perf_counter()
    first = last = None
    chunks = 0
    finish = None
    for chunk in llm.create_completion(prompt=text, max_tokens=max_tokens, stream=True, logit_bias=banned, **SAMPLING):
        choice = chunk["choices"][0]
        finish = choice.get("finish_reason") or finish
        if choice.get("text"):
            now = time.perf_counter()
            first = first or now
            last = now
            chunks += 1
    if first is None or last is None or finish != "length":
        raise RuntimeError(f"expected {max_tokens} streamed tokens, got finish_reason {finish!r}")
    return {
        "ttft_s": first - started,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": max_tokens,
        "chunks": chunks,
        "gen_s": last - first,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--ctx", type=int, default=2048)
    args = parser.parse_args(argv)

    import llama_cpp  # noqa: PLC0415

    started = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=args.ctx,
        n_threads=args.threads,
        n_gpu_layers=0,
        n_batch=512,
        use_mmap=True,
        use_mlock=False,
        seed=llama_cpp.LLAMA_DEFAULT_SEED,
        op_offload=False,
        verbose=False,
    )
    print(json.dumps({"ready": True, "load_s": time.perf_counter() - started}), flush=True)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    banned = {t: float("-inf") for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    for line in sys.stdin:
        request = json.loads(line)
        result = measure(llm, prompt(request["rep"], request.get("tiny", False)), request["max_tokens"], banned)
        print(json.dumps({"result": result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
