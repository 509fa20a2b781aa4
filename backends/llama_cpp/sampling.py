"""One sequence's sampler (llama.cpp's sampler chain) and its tokens' log-probabilities.

The chain is llama-cpp-python's (``Llama._init_sampler``), so a request samples as it
did before the batching engine: penalties, logit bias, grammar, then greedy at
temperature 0, else top-k, typical, top-p, min-p, temperature and a seeded draw. Each
sequence has its own chain: its penalties, grammar state and random stream depend on
its own tokens only. Runs on the engine thread (it reads the context's logits).
"""

from __future__ import annotations

import ctypes
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Tokens the repetition penalties look back over (llama-cpp-python's ``last_n_tokens_size``).
PENALTY_LAST_N = 64
#: llama-cpp-python's fixed ``typical_p`` (1.0: off).
TYPICAL_P = 1.0


class GrammarError(ValueError):
    """llama.cpp refused a grammar (it logs the parse error)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0  # 0: a random seed
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str = ""  # GBNF, root rule "root"


class Sampler:
    """A llama.cpp sampler chain for one sequence; :meth:`close` frees it (idempotent)."""

    def __init__(self, vocab: Any, n_vocab: int, params: SamplingParams) -> None:
        import llama_cpp  # noqa: PLC0415 - heavy; the backend imports it at load time

        self._lib = llama_cpp
        self._chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._add(
            llama_cpp.llama_sampler_init_penalties(
                n_vocab,
                PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
            )
        )
        if params.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))()
            for i, (token, bias) in enumerate(params.logit_bias):
                biases[i].token, biases[i].bias = token, bias  # type: ignore[assignment]
            self._add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
        if params.grammar:
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode("utf-8"), b"root")
            if not grammar:
                self.close()
                raise GrammarError("llama.cpp could not parse the grammar for this request")
            self._add(grammar)
        if params.temperature == 0:
            self._add(llama_cpp.llama_sampler_init_greedy())
        else:
            seed = params.seed or random.getrandbits(32)
            self._add(llama_cpp.llama_sampler_init_top_k(params.top_k))
            self._add(llama_cpp.llama_sampler_init_typical(TYPICAL_P, 1))
            self._add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            self._add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            self._add(llama_cpp.llama_sampler_init_temp(params.temperature))
            self._add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def _add(self, sampler: Any) -> None:
        self._lib.llama_sampler_chain_add(self._chain, sampler)

    def sample(self, ctx: Any, index: int) -> int:
        """The token drawn from the logits of batch row ``index`` (accepted into the chain)."""
        return int(self._lib.llama_sampler_sample(self._chain, ctx, index))

    def accept(self, token: int) -> None:
        """Tell the chain about a token that was not drawn here (a replayed one)."""
        self._lib.llama_sampler_accept(self._chain, token)

    def close(self) -> None:
        if self._chain:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None


def token_piece(vocab: Any, token: int) -> bytes:
    """The bytes token ``token`` stands for in generated text (special tokens: none)."""
    import llama_cpp  # noqa: PLC0415

    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def logprobs_at(ctx: Any, index: int, n_vocab: int, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of ``token`` under the model's distribution at batch row ``index``
    (softmax of the raw logits, before sampling filters and biases), and the ``top`` most
    likely tokens there, best first."""
    import llama_cpp  # noqa: PLC0415

    pointer = llama_cpp.llama_get_logits_ith(ctx, index)
    logits = np.ctypeslib.as_array(pointer, shape=(n_vocab,)).astype(np.float64)
    peak = logits.max()
    log_total = peak + np.log(np.exp(logits - peak).sum())
    chosen = float(logits[token] - log_total)
    if top <= 0:
        return chosen, []
    best = np.argpartition(-logits, top - 1)[:top]
    best = best[np.argsort(-logits[best], kind="stable")]
    return chosen, [(int(t), float(logits[t] - log_total)) for t in best]
