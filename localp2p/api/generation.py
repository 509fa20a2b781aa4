"""One generation as the API serves it: sent whole, or streamed as server-sent events.

Owns running a generation through failover (:mod:`localp2p.server.failover`), decoding
its text, keeping log-probabilities with the text they belong to, and the SSE response.
What each endpoint's events look like is a :class:`StreamRenderer`'s business; this
module never knows whether it serves chat, completions or the Responses API.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse

from localp2p._proto import backend_pb2 as pb
from localp2p.api.errors import APIError
from localp2p.config import ModelConfig
from localp2p.metrics import RequestRecord
from localp2p.server import failover
from localp2p.server.backend_client import BackendError
from localp2p.server.supervisor import BackendSupervisor

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- the request's context ---------------------------------------------------------------------


def supervisor(request: Request) -> BackendSupervisor:
    return request.app.state.supervisor


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or uuid.uuid4().hex)


def record(request: Request) -> RequestRecord:
    """This request's facts for metrics and recent requests (made by the RequestContext middleware)."""
    found = getattr(request.state, "record", None)
    return found if found is not None else RequestRecord(id=request_id(request), endpoint="", started=time.monotonic())


def model_for(request: Request, name: str | None) -> ModelConfig:
    """The served model called ``name`` (the default model for None or ""); 404 in OpenAI's shape if none is."""
    models = supervisor(request).models
    record(request).describe(name or next(iter(models)))
    if name is None or name == "":
        return next(iter(models.values()))
    if name not in models:
        raise APIError(404, f"The model '{name}' does not exist", "invalid_request_error", "model", "model_not_found")
    return models[name]


# -- running a generation ----------------------------------------------------------------------


def _generation(request: Request, model: ModelConfig, options: pb.PredictOptions) -> AsyncGenerator[pb.Reply, None]:
    """The replies of one generation, continued on a restarted backend if the backend dies
    (bounded by ``--failover-timeout``; see localp2p.server.failover). Close it when done."""
    timeout = getattr(request.app.state, "failover_timeout", failover.DEFAULT_FAILOVER_TIMEOUT)
    return failover.generate(supervisor(request), model.name, options, timeout)


def tool_calls(final: pb.Reply) -> list[dict[str, Any]]:
    """The tool calls of a final reply (OpenAI's list; empty when it made none)."""
    if not final.tool_calls:
        return []
    try:
        calls = json.loads(final.tool_calls)
    except json.JSONDecodeError as exc:
        raise BackendError(500, f"the backend's tool_calls are not JSON ({exc})", "server_error") from None
    if not isinstance(calls, list):
        raise BackendError(500, "the backend's tool_calls are not a list", "server_error")
    return calls


def finish_reason(final: pb.Reply) -> str:
    return final.finish_reason or "stop"


@dataclass
class Whole:
    """A generation run to its end: its text, every token's log-probabilities, the final reply
    (finish reason, token counts, tool calls)."""

    text: str
    logprobs: list[pb.TokenLogprob]
    final: pb.Reply


async def run_whole(request: Request, model: ModelConfig, options: pb.PredictOptions) -> Whole:
    """Run a generation to its end (for a response sent whole).

    Streamed from the backend internally, so a failover keeps the tokens already made.
    Raises BackendError like :func:`localp2p.server.failover.generate`.
    """
    parts: list[bytes] = []
    logprobs: list[pb.TokenLogprob] = []
    final = pb.Reply(finish_reason="stop")
    async with contextlib.aclosing(_generation(request, model, options)) as generation:
        async for reply in generation:
            parts.append(reply.message)
            logprobs.extend(reply.logprobs)
            if reply.finish_reason:
                final = reply
    record(request).observe(final)
    return Whole(b"".join(parts).decode("utf-8", errors="replace"), logprobs, final)


class StreamRenderer(Protocol):
    """An endpoint's server-sent events for one generation (each method returns whole SSE events)."""

    def opening(self) -> Iterable[bytes]:
        """Before the first text."""
        ...

    def piece(self, text: str, logprobs: Sequence[pb.TokenLogprob]) -> Iterable[bytes]:
        """The next text, and the log-probabilities of the tokens it completes."""
        ...

    def closing(self, final: pb.Reply) -> Iterable[bytes]:
        """After the last text: ``final`` has the finish reason, counts and tool calls."""
        ...

    def failure(self, error: BackendError) -> Iterable[bytes]:
        """The generation failed after the response started (status 200 is already sent)."""
        ...


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event: ``data`` as JSON, under ``event`` when given."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


async def stream_response(request: Request, model: ModelConfig, options: pb.PredictOptions, renderer: StreamRenderer) -> StreamingResponse:
    """Stream a generation as SSE, in the events ``renderer`` makes.

    The first reply is awaited before the response starts, so errors found before any
    token (unknown model, backend down, prompt too long) get a real HTTP status. A
    backend that dies mid-stream is failed over (the stream pauses, then goes on). Errors
    after the first reply go to ``renderer.failure``. Log-probabilities that arrive before
    their text (held back by the backend) wait for it.
    """
    record(request).stream = True

    async def replies() -> AsyncGenerator[pb.Reply, None]:
        async with contextlib.aclosing(_generation(request, model, options)) as generation:
            async for reply in generation:
                record(request).observe(reply)
                yield reply

    source = replies()
    try:
        head = await source.__anext__()
    except StopAsyncIteration:
        head = None

    async def all_replies() -> AsyncIterator[pb.Reply]:
        if head is not None:
            yield head
            async for reply in source:
                yield reply

    async def events() -> AsyncIterator[bytes]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending: list[pb.TokenLogprob] = []
        final = pb.Reply(finish_reason="stop")
        tail = ""  # text of the final reply and bytes the decoder still holds
        try:
            for event in renderer.opening():
                yield event
            async for reply in all_replies():
                pending.extend(reply.logprobs)
                text = decoder.decode(reply.message)
                if reply.finish_reason:
                    final, tail = reply, text
                    break
                if text:
                    for event in renderer.piece(text, pending):
                        yield event
                    pending = []
            tail += decoder.decode(b"", final=True)
            if tail or pending:
                for event in renderer.piece(tail, pending):
                    yield event
            for event in renderer.closing(final):
                yield event
        except BackendError as exc:
            for event in renderer.failure(exc):
                yield event
        finally:
            await source.aclose()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
