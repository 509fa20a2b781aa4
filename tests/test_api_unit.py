"""Issue 19, pure logic of the API: the bounded response memory and the log-probability shapes."""

from __future__ import annotations

import math

import pytest

from localp2p._proto import backend_pb2 as pb
from localp2p.api import response_store
from localp2p.api.logprobs import FLOOR, LegacyLogprobs, chat_content
from localp2p.api.response_store import ResponseStore


def test_store_keeps_the_newest_up_to_its_limit() -> None:
    store = ResponseStore(limit=3, max_age=60)
    for i in range(5):
        store.put(f"resp_{i}", [{"role": "user", "content": str(i)}], {"id": f"resp_{i}"})
    assert len(store) == 3
    assert store.get("resp_0") is None and store.get("resp_1") is None
    kept = store.get("resp_4")
    assert kept is not None and kept.conversation == [{"role": "user", "content": "4"}] and kept.response == {"id": "resp_4"}


def test_store_forgets_after_max_age(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(response_store.time, "monotonic", lambda: now[0])
    store = ResponseStore(limit=10, max_age=60)
    store.put("resp_old", [], {})
    now[0] += 30
    store.put("resp_new", [], {})
    now[0] += 31  # resp_old is 61 s old, resp_new 31 s
    assert store.get("resp_old") is None and store.get("resp_new") is not None
    now[0] += 30
    assert store.get("resp_new") is None and len(store) == 0


def _lp(token: bytes, logprob: float, *top: tuple[bytes, float]) -> pb.TokenLogprob:
    return pb.TokenLogprob(id=1, token=token, logprob=logprob, top=[pb.TopLogprob(token=t, logprob=v) for t, v in top])


def test_chat_shape_and_floor() -> None:
    [entry] = chat_content([_lp(b" caf\xc3", -0.5, (b" caf\xc3", -0.5), (b"x", -math.inf))])
    assert entry["token"] == " caf\ufffd" and entry["bytes"] == [32, 99, 97, 102, 195]
    assert entry["top_logprobs"][1] == {"token": "x", "logprob": FLOOR, "bytes": [120]}  # JSON has no -inf


def test_legacy_offsets_count_characters_from_the_prompt() -> None:
    """A character split over two tokens counts once, at the token that completes it."""
    legacy = LegacyLogprobs("Hi")
    first = legacy.next([_lp(b" caf", -1.0, (b" caf", -1.0)), _lp(b"\xc3", -2.0)])
    second = legacy.next([_lp(b"\xa9!", -3.0)])
    assert first["text_offset"] == [2, 6] and second["text_offset"] == [6]
    assert first["tokens"] == [" caf", "\ufffd"] and first["token_logprobs"] == [-1.0, -2.0]
    assert first["top_logprobs"] == [{" caf": -1.0}, {}]
    assert legacy.next([_lp(b"?", -1.0)])["text_offset"] == [8]  # " café!" is 6 characters after "Hi"
