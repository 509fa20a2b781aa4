"""The OpenAI-compatible routes: models, chat completions, completions, embeddings."""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from localp2p._proto import backend_pb2 as pb
from localp2p.api.errors import APIError, backend_error_body
from localp2p.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, _Sampling
from localp2p.config import ModelConfig
from localp2p.metrics import RequestRecord
from localp2p.server import failover
from localp2p.server.backend_client import BackendError
from localp2p.server.supervisor import BackendSupervisor

router = APIRouter(prefix="/v1")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _supervisor(request: Request) -> BackendSupervisor:
    return request.app.state.supervisor


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or uuid.uuid4().hex)


def _record(request: Request) -> RequestRecord:
    """This request's facts for metrics and recent requests (made by the RequestContext middleware)."""
    record = getattr(request.state, "record", None)
    return record if record is not None else RequestRecord(id=_request_id(request), endpoint="", started=time.monotonic())


def _generation(request: Request, model: ModelConfig, options: pb.PredictOptions) -> AsyncGenerator[pb.Reply, None]:
    """The replies of one generation, continued on a restarted backend if the backend dies
    (bounded by ``--failover-timeout``; see localp2p.server.failover). Close it when done."""
    timeout = getattr(request.app.state, "failover_timeout", failover.DEFAULT_FAILOVER_TIMEOUT)
    return failover.generate(_supervisor(request), model.name, options, timeout)


async def _whole_reply(request: Request, model: ModelConfig, options: pb.PredictOptions) -> pb.Reply:
    """Run a generation to its end and return it as one Reply (for a response sent whole).

    Streamed from the backend internally, so a failover keeps the tokens already made.
    Raises BackendError like :func:`localp2p.server.failover.generate`.
    """
    parts: list[bytes] = []
    final = pb.Reply()
    async with contextlib.aclosing(_generation(request, model, options)) as generation:
        async for reply in generation:
            if reply.finish_reason:
                final = reply
            else:
                parts.append(reply.message)
    final.message = b"".join(parts)
    return final


def _model(request: Request, name: str | None) -> ModelConfig:
    models = _supervisor(request).models
    _record(request).describe(name or next(iter(models)))
    if name is None or name == "":
        return next(iter(models.values()))
    if name not in models:
        raise APIError(404, f"The model '{name}' does not exist", "invalid_request_error", "model", "model_not_found")
    return models[name]


def _check_limits(body: _Sampling, model: ModelConfig) -> None:
    limit = body.max_token_limit(model.sampling)
    if limit > model.context_size:
        raise APIError(
            400,
            f"max_tokens ({limit}) exceeds the context window of model '{model.name}' ({model.context_size} tokens)",
            param="max_tokens",
            code="context_length_exceeded",
        )


def _usage(reply: pb.Reply) -> dict[str, int]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.tokens,
        "total_tokens": reply.prompt_tokens + reply.tokens,
    }


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


async def _stream_response(
    request: Request,
    model: ModelConfig,
    options: pb.PredictOptions,
    chunk: Callable[[str | None, str | None], dict[str, Any]],
    include_usage: bool,
    first: dict[str, Any] | None = None,
) -> StreamingResponse:
    """Stream a generation as SSE.

    The first reply is awaited before the response starts, so errors found before any
    token (unknown model, backend down, prompt too long) get a real HTTP status. A
    backend that dies mid-stream is failed over (the stream pauses, then goes on). Errors
    after the first reply arrive as one ``data: {"error": ...}`` event, then ``data: [DONE]``.
    """
    _record(request).stream = True

    async def replies() -> AsyncGenerator[pb.Reply, None]:
        async with contextlib.aclosing(_generation(request, model, options)) as generation:
            async for reply in generation:
                _record(request).observe(reply)
                yield reply

    source = replies()
    try:
        head = await source.__anext__()
    except StopAsyncIteration:
        head = None

    async def events() -> AsyncIterator[bytes]:
        final: pb.Reply | None = None
        try:
            if first is not None:
                yield _sse(first)
            pending = [head] if head is not None else []
            while True:
                if pending:
                    reply = pending.pop()
                else:
                    try:
                        reply = await source.__anext__()
                    except StopAsyncIteration:
                        break
                if reply.finish_reason:
                    final = reply
                else:
                    yield _sse(chunk(reply.message.decode("utf-8", errors="replace"), None))
            yield _sse(chunk(None, final.finish_reason if final else "stop"))
            if include_usage and final is not None:
                usage_chunk = chunk(None, None)
                usage_chunk["choices"] = []
                usage_chunk["usage"] = _usage(final)
                yield _sse(usage_chunk)
        except BackendError as exc:
            yield _sse(backend_error_body(exc))
        finally:
            await source.aclose()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "localp2p"}
            for name in _supervisor(request).models
        ],
    }


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    model = _model(request, body.model)
    _check_limits(body, model)
    options = body.options(model.sampling, _request_id(request))
    options.Messages.extend(pb.ChatMessage(role=m.role, content=m.text(), name=m.name or "") for m in body.messages)
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    if body.stream:

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {"content": text} if text is not None else {}
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        first = chunk(None, None)
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream_response(request, model, options, chunk, include_usage, first)

    reply = await _whole_reply(request, model, options)
    _record(request).observe(reply)
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": model.name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.message.decode("utf-8", errors="replace")},
                "finish_reason": reply.finish_reason or "stop",
            }
        ],
        "usage": _usage(reply),
    }


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    model = _model(request, body.model)
    _check_limits(body, model)
    options = body.options(model.sampling, _request_id(request))
    options.Prompt = body.prompt_text()
    options.Echo = body.echo
    ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    if body.stream:

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": model.name,
                "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}],
            }

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream_response(request, model, options, chunk, include_usage)

    reply = await _whole_reply(request, model, options)
    _record(request).observe(reply)
    return {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": model.name,
        "choices": [
            {
                "index": 0,
                "text": reply.message.decode("utf-8", errors="replace"),
                "logprobs": None,
                "finish_reason": reply.finish_reason or "stop",
            }
        ],
        "usage": _usage(reply),
    }


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    model = _model(request, body.model)
    options = pb.PredictOptions(Inputs=body.inputs(), RequestId=_request_id(request))
    async with _supervisor(request).session(model.name) as client:
        result = await client.embedding(options)
    _record(request).observe(result)

    def encode(vector: Any) -> Any:
        if body.encoding_format == "base64":
            return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        return list(vector)

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(item.embeddings)} for i, item in enumerate(result.data)
        ],
        "model": model.name,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
