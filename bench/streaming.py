"""One streamed OpenAI request, timed by the client: when it was sent, when each piece of text came.

Works for ``/v1/completions`` (``choices[].text``) and ``/v1/chat/completions``
(``choices[].delta.content``), against localp2p and llama-server alike; llama-server's
own ``timings`` (its prompt and decode speeds) are kept when it sends them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Streamed:
    started: float  # time.perf_counter() when the request was sent
    times: list[float] = field(default_factory=list)  # each chunk that carried text
    text: str = ""
    finish: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] | None = None  # llama-server's, when given

    @property
    def ttft_s(self) -> float:
        return self.times[0] - self.started

    @property
    def gen_s(self) -> float:
        """First text chunk to last."""
        return self.times[-1] - self.times[0]

    @property
    def end(self) -> float:
        return self.times[-1]

    def gaps_ms(self) -> list[float]:
        """Time between consecutive text chunks: the per-token latency a reader sees."""
        return [(b - a) * 1000 for a, b in zip(self.times, self.times[1:], strict=False)]

    def completion_tokens(self) -> int:
        return int(self.usage.get("completion_tokens") or 0)


def stream(
    http: httpx.Client, path: str, body: dict[str, Any], timeout: float = 600.0, on_first: Callable[[], object] | None = None
) -> Streamed:
    """POST ``body`` with ``stream: true`` and ``include_usage`` to ``path``; raises on an error.

    ``on_first`` is called when the first text arrives (other threads wait for it)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    parts: list[str] = []
    out = Streamed(started=time.perf_counter())
    with http.stream("POST", path, json=body, timeout=timeout) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:500]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            if event.get("usage"):
                out.usage = event["usage"]
            if event.get("timings"):
                out.timings = event["timings"]
            for choice in event.get("choices") or []:
                out.finish = choice.get("finish_reason") or out.finish
                piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if piece:
                    out.times.append(time.perf_counter())
                    parts.append(piece)
                    if on_first and len(out.times) == 1:
                        on_first()
    out.text = "".join(parts)
    if not out.times:
        raise RuntimeError(f"no text streamed (finish_reason {out.finish!r}, usage {out.usage})")
    return out
