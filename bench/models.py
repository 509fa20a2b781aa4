"""The two benchmark models: the embedded SmolLM2-135M and a generated ~1B llama (Q8_0).

The 1B model has random weights (``localp2p.genmodel``): random weights cost exactly
what real weights of the same shape cost - same tensors, same kernels, same bytes on
the wire - only the text is noise. It is written once to ``bench/.cache/`` (gitignored).

Its shape is chosen so that every weight matrix a worker holds exceeds llama.cpp's
10 MiB RPC hash threshold (``RPC_HASH_THRESHOLD`` in ggml-rpc.cpp): the rpc-server's
tensor cache (``--cache-dir``) only applies above it, and GQA-sized K/V or 2048-wide Q
matrices of typical 1B models fall below it (see ``cacheable_fraction``).
"""

from __future__ import annotations

import pathlib
import time
from dataclasses import dataclass
from typing import Any

from localp2p.config import EMBEDDED_MODEL_NAME, embedded_model_path
from localp2p.genmodel import Shape, write_model

CACHE = pathlib.Path(__file__).resolve().parent / ".cache"
#: llama.cpp ggml-rpc.cpp: tensors larger than this are offered by hash first (and cached).
RPC_HASH_THRESHOLD = 10 * 1024 * 1024
#: ~1.2B parameters (0.9B of them in the 8 blocks), head dim 128, no GQA: all block
#: matrices are 11.8 MB (attention) or 23.5 MB (FFN) in Q8_0, above the threshold.
SHAPE_1B = Shape(layers=8, embd=3328, ff=6656, heads=26, kv_heads=26, tensor_type="q8_0")
#: Tensors that stay on the server (backends/llama_cpp/server.py OUTPUT_TENSOR_PATTERN).
HOST_TENSORS = ("output.weight", "output_norm.weight", "token_embd.weight")


@dataclass(frozen=True)
class BenchModel:
    key: str  # "smollm2" | "1b"
    name: str  # the API's model id
    path: pathlib.Path
    models_path: pathlib.Path | None  # --models-path for `localp2p run`; None = embedded
    context: int
    parameters: int
    label: str

    def server_args(self) -> list[str]:
        return ["--models-path", str(self.models_path)] if self.models_path else []


def smollm2() -> BenchModel:
    path = embedded_model_path()
    return BenchModel("smollm2", EMBEDDED_MODEL_NAME, path, None, 2048, 134_515_008, "SmolLM2-135M Q4_1 (embedded)")


def one_b(log: Any = print) -> BenchModel:
    """The generated 1B model, written on first use (about a minute) and reused."""
    s = SHAPE_1B
    stem = f"random-llama-{s.layers}x{s.embd}-ff{s.ff}-h{s.heads}-kv{s.kv_heads}-{s.tensor_type}"
    path = CACHE / f"{stem}.gguf"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        log(f"  writing {path.name} (random weights, once; cached in bench/.cache/) ...")
        started = time.monotonic()
        tmp = path.with_suffix(".tmp")
        write_model(tmp, s)
        tmp.rename(path)
        log(f"  wrote {path.stat().st_size / 1e9:.2f} GB in {time.monotonic() - started:.0f} s")
    models = CACHE / "models-1b"
    models.mkdir(parents=True, exist_ok=True)
    (models / "bench-1b.yaml").write_text(f"name: bench-1b\ncontext_size: 2048\nparameters:\n  model: {path}\n")
    return BenchModel(
        "1b", "bench-1b", path, models, 2048, s.parameters(49152), f"random llama {s.parameters(49152) / 1e9:.2f}B Q8_0"
    )


def tensor_bytes(path: pathlib.Path) -> dict[str, int]:
    """Bytes of the weights a worker would hold, in total and above the RPC hash threshold."""
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(path), "r")
    total = above = 0
    for tensor in reader.tensors:
        if tensor.name in HOST_TENSORS:
            continue
        n = int(tensor.n_bytes)
        total += n
        if n > RPC_HASH_THRESHOLD:
            above += n
    return {"worker_weight_bytes": total, "above_hash_threshold_bytes": above}
