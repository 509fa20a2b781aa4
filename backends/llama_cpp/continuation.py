"""Token ids of a generation, and continuing a generation from the ids it already produced.

A request whose backend died mid-generation is re-issued with ``ContinueTokens``: the
ids the client already has. To give the very text an uninterrupted run would have
given (byte for byte at temperature 0), the continued run computes what the first run
computed: the prompt in the same aligned chunks, then each already-generated token in a
decode step of its own, as it was evaluated after it was sampled (batching.Scheduler
replays them in place of sampling; the sampler is told about them, so penalties and a
grammar's state are as in the first run). Evaluating them in one batch would be faster
but rounds differently, and greedy output could diverge. Everything downstream (stop
sequences, incomplete UTF-8 held back, ``max_tokens``, finish reason) counts the
replayed tokens like generated ones; the caller skips the text it already sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


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
