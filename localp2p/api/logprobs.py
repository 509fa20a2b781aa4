"""Token log-probabilities (Reply.logprobs) in OpenAI's shapes: chat's ``logprobs.content``
and the legacy completions object.

A token is a piece of bytes that may end inside a UTF-8 character: its ``token`` text
replaces such bytes (U+FFFD) and ``bytes`` has them exactly, as OpenAI does.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Sequence
from typing import Any

from localp2p._proto import backend_pb2 as pb

#: What OpenAI reports for a token with no chance at all (a -inf logprob, say after a
#: logit_bias ban): JSON has no infinity.
FLOOR = -9999.0


def _value(logprob: float) -> float:
    return FLOOR if math.isnan(logprob) or logprob < FLOOR else float(logprob)


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def chat_content(logprobs: Sequence[pb.TokenLogprob]) -> list[dict[str, Any]]:
    """Chat completions: the list under ``logprobs.content``, one entry per token."""
    return [
        {
            "token": _text(lp.token),
            "logprob": _value(lp.logprob),
            "bytes": list(lp.token),
            "top_logprobs": [{"token": _text(t.token), "logprob": _value(t.logprob), "bytes": list(t.token)} for t in lp.top],
        }
        for lp in logprobs
    ]


class LegacyLogprobs:
    """Completions' ``logprobs`` object, built across a stream: ``text_offset`` counts characters
    from the start of the prompt, as OpenAI's does."""

    def __init__(self, prompt: str) -> None:
        self._offset = len(prompt)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a character's first bytes

    def next(self, logprobs: Sequence[pb.TokenLogprob]) -> dict[str, Any]:
        """The object for these tokens (the next ones of the generation)."""
        offsets = []
        for lp in logprobs:
            offsets.append(self._offset)
            self._offset += len(self._decoder.decode(lp.token))
        return {
            "tokens": [_text(lp.token) for lp in logprobs],
            "token_logprobs": [_value(lp.logprob) for lp in logprobs],
            "top_logprobs": [{_text(t.token): _value(t.logprob) for t in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }
