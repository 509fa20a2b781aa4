"""Responses kept in memory for ``previous_response_id`` and ``GET /v1/responses/{id}``.

Bounded by count and by age (both below), oldest dropped first; nothing reaches the
disk, so a restart of ``localp2p run`` forgets them all. A request with
``store: false`` is not kept.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

#: Responses kept at most: each holds at most one context window of text (a longer conversation
#: was refused before it ran), so a few hundred stay small next to the model.
MAX_STORED_RESPONSES = 256
#: Seconds a response is kept: long enough for an interactive conversation's next turn.
STORED_RESPONSE_SECONDS = 3600.0


@dataclass
class StoredResponse:
    """One response: the conversation up to and including its reply (chat messages as
    dicts, without its ``instructions``, which OpenAI does not carry over) and the
    response object as it was sent."""

    conversation: list[dict[str, Any]]
    response: dict[str, Any]
    stored_at: float


class ResponseStore:
    """Response id -> :class:`StoredResponse`, bounded by ``limit`` entries and ``max_age`` seconds."""

    def __init__(self, limit: int = MAX_STORED_RESPONSES, max_age: float = STORED_RESPONSE_SECONDS) -> None:
        self.limit = limit
        self.max_age = max_age
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._items:
            oldest = next(iter(self._items.values()))
            if now - oldest.stored_at < self.max_age and len(self._items) <= self.limit:
                return
            self._items.popitem(last=False)

    def put(self, ident: str, conversation: list[dict[str, Any]], response: dict[str, Any]) -> None:
        now = time.monotonic()
        self._items[ident] = StoredResponse(conversation, response, now)
        self._items.move_to_end(ident)
        self._expire(now)

    def get(self, ident: str) -> StoredResponse | None:
        """The response, or None when it was never kept, or has expired."""
        self._expire(time.monotonic())
        return self._items.get(ident)

    def __len__(self) -> int:
        return len(self._items)
