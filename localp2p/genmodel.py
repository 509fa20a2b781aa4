"""Write a llama-shaped GGUF model with random weights, for tests and benchmarks.

    python -m localp2p.genmodel OUT.gguf --layers 16 --embd 2048 --ff 5632 --type q8_0

Random weights cost exactly what real weights of the same shape cost (the same
tensors, the same kernels), but the text they produce is noise. The tokenizer is
copied from the embedded SmolLM2 model so llama.cpp can load and prompt the result.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from dataclasses import dataclass

import numpy as np

#: Weight types a model can be written in (q4_0: the type llama.cpp repacks on AVX2 CPUs).
TENSOR_TYPES = ("q8_0", "q4_0", "f16")
#: Scale of the random weights: small enough that activations stay finite.
WEIGHT_SCALE = 0.02
_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix",
    "tokenizer.chat_template",
)


@dataclass(frozen=True)
class Shape:
    layers: int = 2
    embd: int = 1024
    ff: int = 5632
    heads: int = 16
    kv_heads: int = 4
    context: int = 2048
    tensor_type: str = "q8_0"  # one of TENSOR_TYPES

    def parameters(self, vocab: int) -> int:
        head_dim = self.embd // self.heads
        kv = head_dim * self.kv_heads
        per_layer = 2 * self.embd * self.embd + 2 * self.embd * kv + 3 * self.embd * self.ff + 2 * self.embd
        return self.layers * per_layer + 2 * vocab * self.embd + self.embd


def _copy_tokenizer(writer: object, source: pathlib.Path) -> int:
    """Copy SmolLM2's tokenizer metadata into ``writer``; returns the vocabulary size."""
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(source), "r")
    vocab = 0
    for key in _TOKENIZER_KEYS:
        field = reader.get_field(key)
        if field is None:
            continue
        value = field.contents()
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, list(value))  # type: ignore[attr-defined]
            if key == "tokenizer.ggml.tokens":
                vocab = len(value)
        else:
            writer.add_key_value(key, value, value_type)  # type: ignore[attr-defined]
    return vocab


def write_model(path: pathlib.Path, shape: Shape, seed: int = 0) -> pathlib.Path:
    """Write the model to ``path`` (overwriting it) and return the path."""
    import gguf  # noqa: PLC0415

    from localp2p.config import embedded_model_path  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    qtype = getattr(gguf.GGMLQuantizationType, shape.tensor_type.upper())
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{shape.tensor_type.upper()}")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(f"random-llama-{shape.layers}x{shape.embd}")
    vocab = _copy_tokenizer(writer, embedded_model_path())
    head_dim = shape.embd // shape.heads
    writer.add_block_count(shape.layers)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.embd)
    writer.add_feed_forward_length(shape.ff)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(file_type)

    def weight(name: str, rows: int, cols: int) -> None:
        data = (rng.standard_normal((rows, cols), dtype=np.float32) * WEIGHT_SCALE)
        if qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            # Quantized data comes as uint8 rows of bytes: gguf derives the element shape
            # from that byte shape (a raw_shape would be read as a byte shape, and refused).
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(shape.embd, dtype=np.float32))

    kv = head_dim * shape.kv_heads
    weight("token_embd.weight", vocab, shape.embd)
    for i in range(shape.layers):
        norm(f"blk.{i}.attn_norm.weight")
        weight(f"blk.{i}.attn_q.weight", shape.embd, shape.embd)
        weight(f"blk.{i}.attn_k.weight", kv, shape.embd)
        weight(f"blk.{i}.attn_v.weight", kv, shape.embd)
        weight(f"blk.{i}.attn_output.weight", shape.embd, shape.embd)
        norm(f"blk.{i}.ffn_norm.weight")
        weight(f"blk.{i}.ffn_gate.weight", shape.ff, shape.embd)
        weight(f"blk.{i}.ffn_up.weight", shape.ff, shape.embd)
        weight(f"blk.{i}.ffn_down.weight", shape.embd, shape.ff)
    norm("output_norm.weight")
    weight("output.weight", vocab, shape.embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localp2p.genmodel", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--layers", type=int, default=Shape.layers)
    parser.add_argument("--embd", type=int, default=Shape.embd)
    parser.add_argument("--ff", type=int, default=Shape.ff)
    parser.add_argument("--heads", type=int, default=Shape.heads)
    parser.add_argument("--kv-heads", type=int, default=Shape.kv_heads)
    parser.add_argument("--type", dest="tensor_type", choices=TENSOR_TYPES, default=Shape.tensor_type)
    args = parser.parse_args(argv)
    shape = Shape(args.layers, args.embd, args.ff, args.heads, args.kv_heads, tensor_type=args.tensor_type)
    write_model(args.out, shape)
    print(f"wrote {args.out} ({args.out.stat().st_size >> 20} MiB, {shape.parameters(49152) / 1e9:.2f}B parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
