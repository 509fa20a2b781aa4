"""Issue 14: the prompt cache is used, and it cannot change an answer.

With ``--parallel 1`` the one slot's cache holds the previous request's prompt, so the
order of requests decides what is cached: a request right after an unrelated one is
evaluated cold (nothing in common), right after one that shares its prefix it is warm.
The temperature-0 answer must be the same byte for byte either way, locally and with the
layers on two rpc-servers; the server's log says how many prompt tokens came from the
cache (``cached_tokens``), so the test also fails if the cache is never used.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import pytest

from localp2p.testing.cluster import Server, start_server, start_worker

#: A system prompt long enough for several whole prompt chunks (128 tokens each).
SYSTEM = (
    "You are the reference desk of a small public library in a coastal town. "
    "You answer questions about books, local history, the harbour, the lighthouse, tides, "
    "opening hours, library cards, interlibrary loans and the reading groups that meet on "
    "Tuesdays and Thursdays. Keep every answer short, friendly and factual; when you do not "
    "know something, say so and suggest asking a librarian at the front desk. "
) * 4
QUESTION = "When does the Thursday reading group meet, and what are they reading?"
OTHER_QUESTION = "Can I renew a book by phone?"
UNRELATED = "Translate 'good morning' into French, Spanish and German."
#: Generated tokens per answer: enough for greedy output to diverge if any state differed.
MAX_TOKENS = 48


def _ask(server: Server, messages: list[dict[str, str]]) -> str:
    reply = server.http.post(
        "/v1/chat/completions", json={"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    assert body["usage"]["completion_tokens"] == MAX_TOKENS
    _served_from_cache.setdefault(id(server), []).append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
    return str(body["choices"][0]["message"]["content"])


#: usage.prompt_tokens_details.cached_tokens of every request, per server (by id).
_served_from_cache: dict[int, list[int]] = {}


def _cached_tokens(server: Server) -> list[int]:
    """``cached_tokens`` of every request so far, in order; the backend's log must agree."""
    logged = [int(m) for m in re.findall(r"generation done .*?cached_tokens=(\d+)", server.proc.stderr())]
    assert logged == _served_from_cache[id(server)]
    return logged


def _system(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def _check_cache_keeps_answers(server: Server) -> None:
    cold = _ask(server, _system(QUESTION))  # first request: nothing cached
    _ask(server, _system(OTHER_QUESTION))  # shares the system prompt
    warm_shared = _ask(server, _system(QUESTION))
    _ask(server, [{"role": "user", "content": UNRELATED}])
    after_unrelated = _ask(server, _system(QUESTION))
    assert warm_shared == cold
    assert after_unrelated == cold
    cached = _cached_tokens(server)
    assert cached[0] == 0
    assert cached[1] >= 256 and cached[2] >= 256, cached  # the shared system prompt came from the cache
    assert cached[4] < 128, cached  # nothing but the template's first tokens in common with the unrelated request

    # A chat that grows turn by turn reuses the history it resends.
    history = [*_system(QUESTION), {"role": "assistant", "content": cold}, {"role": "user", "content": "And on Tuesdays?"}]
    _ask(server, [{"role": "user", "content": UNRELATED}])
    second_turn_cold = _ask(server, history)
    _ask(server, _system(QUESTION))
    second_turn_warm = _ask(server, history)
    assert _cached_tokens(server)[-1] >= 256
    assert second_turn_warm == second_turn_cold


def test_prompt_cache_keeps_answers_locally(tmp_path: pathlib.Path) -> None:
    server = start_server(tmp_path, "--parallel", "1")
    try:
        _check_cache_keeps_answers(server)
    finally:
        server.close()


@pytest.mark.parametrize("parallel", ["1", "4"])
def test_prompt_cache_keeps_answers_over_two_workers(tmp_path: pathlib.Path, parallel: str) -> None:
    w1, e1 = start_worker(tmp_path, name="w1")
    w2, e2 = start_worker(tmp_path, name="w2")
    server = start_server(tmp_path, "--parallel", parallel, rpc_servers=[e1, e2])
    try:
        assert [d["layers"] > 0 for d in server.status()["devices"]] == [True, True]
        if parallel == "1":
            _check_cache_keeps_answers(server)
        else:
            # Four slots: a request takes the slot whose cache serves it best, so the
            # shared-prefix request is warm even after an unrelated one.
            cold = _ask(server, _system(QUESTION))
            _ask(server, [{"role": "user", "content": UNRELATED}])
            warm = _ask(server, _system(QUESTION))
            assert _cached_tokens(server)[-1] >= 256
            assert warm == cold
    finally:
        server.close()
        w1.stop()
        w2.stop()
