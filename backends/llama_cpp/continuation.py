"""Token ids of a generation, and continuing a generation from the ids it already produced.

A request whose backend died mid-generation is re-issued with ``ContinueTokens``: the
ids the client already has. To give the very text an uninterrupted run would have
given (byte for byte at temperature 0), the continued run must compute exactly what
the first run computed: the prompt in one ``eval`` (as llama-cpp-python does), then
each already-generated token alone, as it was evaluated when it was sampled. Evaluating
them in one batch is faster but rounds differently, and greedy output can diverge.

llama-cpp-python builds the prompt tokens itself (chat template, BOS, special tokens),
so the continuation hooks in below that, at ``Llama.generate``: the replayed ids come
out of it first, as if sampled again, then generation goes on. Everything above it
(stop sequences, incomplete UTF-8 held back, ``max_tokens``, finish reason) counts
the replayed tokens like generated ones, as in the first run; the caller skips the text
it already sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenLog:
    """The token ids of one generation, as they leave the sampler.

    ``ids`` starts with the replayed ``ContinueTokens``; ``reported`` counts the ids
    already handed to the client (the replayed ones count as reported). ``prompt`` is
    the prompt's length in tokens, without the replayed ones.
    """

    is_end: Callable[[int], bool]
    ids: list[int] = field(default_factory=list)
    reported: int = 0
    prompt: int = 0
    completion: int = 0  # tokens generated so far, replayed ones included, end-of-generation ones not

    def add(self, token: int) -> None:
        self.ids.append(token)
        if not self.is_end(token):
            self.completion += 1

    def take(self) -> list[int]:
        """The ids not reported yet; they count as reported from now on."""
        new = self.ids[self.reported :]
        self.reported = len(self.ids)
        return new


@contextlib.contextmanager
def tracked_generation(llm: Any, continue_tokens: Sequence[int], is_end: Callable[[int], bool]) -> Iterator[TokenLog]:
    """While active, ``llm`` (a ``llama_cpp.Llama``) records every token it generates
    in the yielded TokenLog, and continues after ``continue_tokens``.

    Calls ``create_completion``/``create_chat_completion`` made inside see the
    replayed tokens first, then newly generated ones. The sampler is told about the
    replayed tokens (repeat/presence/frequency penalties count them, as in the first
    run). Callers hold the backend lock: the hooks are instance attributes, removed
    on exit. Raises nothing of its own; llama.cpp errors propagate.
    """
    continued = [int(token) for token in continue_tokens]
    record = TokenLog(is_end=is_end, reported=len(continued))
    original_generate = llm.generate
    original_init_sampler = llm._init_sampler

    def init_sampler(*args: Any, **kwargs: Any) -> Any:
        sampler = original_init_sampler(*args, **kwargs)
        for token in continued:
            sampler.accept(token)
        return sampler

    def generate(tokens: Sequence[int], **kwargs: Any) -> Iterator[int]:
        prompt = list(tokens)
        record.prompt = len(prompt)
        if continued:
            # Recompute the first run's state the way the first run computed it.
            llm.reset()
            llm.eval(prompt)
            for token in continued:
                llm.eval([token])
            for token in continued:
                record.add(token)
                yield token
            prompt = prompt + continued  # now cached exactly: generate samples at once
        for token in original_generate(prompt, **kwargs):
            record.add(token)
            yield token

    llm.generate = generate
    llm._init_sampler = init_sampler
    try:
        yield record
    finally:
        vars(llm).pop("generate", None)
        vars(llm).pop("_init_sampler", None)
