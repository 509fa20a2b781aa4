"""The OpenAI-compatible routes: models, chat completions, completions, embeddings.

Each route checks its body (localp2p.api.schemas), maps it into PredictOptions and
shapes the generation (localp2p.api.generation) as OpenAI does, whole or streamed.
The Responses API is in localp2p.api.responses.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import APIRouter, Request

from localp2p._proto import backend_pb2 as pb
from localp2p.api.errors import APIError, backend_error_body
from localp2p.api.generation import (
    Whole,
    finish_reason,
    model_for,
    record,
    request_id,
    run_whole,
    sse,
    stream_response,
    supervisor,
    tool_calls,
)
from localp2p.api.logprobs import LegacyLogprobs, chat_content
from localp2p.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from localp2p.config import ModelConfig
from localp2p.server.backend_client import BackendError

router = APIRouter(prefix="/v1")

DONE = b"data: [DONE]\n\n"


def _usage(reply: pb.Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.tokens,
        "total_tokens": reply.prompt_tokens + reply.tokens,
        # Prompt tokens the backend's prompt cache served (README, "Serving engine").
        "prompt_tokens_details": {"cached_tokens": reply.cached_tokens},
    }


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "localp2p"}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(name) for name in supervisor(request).models]}


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    if model_id not in supervisor(request).models:
        raise APIError(404, f"The model '{model_id}' does not exist", "invalid_request_error", "model", "model_not_found")
    return _model_card(model_id)


# -- chat completions ---------------------------------------------------------------------------


def prepare_chat(body: ChatCompletionRequest, request: Request) -> tuple[ModelConfig, pb.PredictOptions]:
    """The model and backend options of a chat request, after every check (APIError: 400/404)."""
    model = model_for(request, body.model)
    body.check(model)
    return model, body.options(model.sampling, request_id(request))


class _Chunks:
    """What chat and completion streams share: the chunk envelope, the finish and usage
    chunks, ``[DONE]``, and a failure as one ``data: {"error": ...}`` event."""

    kind = ""  # the chunks' "object"

    def __init__(self, ident: str, created: int, model: str, include_usage: bool) -> None:
        self.ident, self.created, self.model, self.include_usage = ident, created, model, include_usage

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.ident, "object": self.kind, "created": self.created, "model": self.model, "choices": choices}

    def ending(self, last: dict[str, Any], final: pb.Reply) -> Iterable[bytes]:
        """The chunk with the finish reason, the usage chunk (if asked for), ``[DONE]``."""
        yield sse(last)
        if self.include_usage:
            yield sse({**self.envelope([]), "usage": _usage(final)})
        yield DONE

    def failure(self, error: BackendError) -> Iterable[bytes]:
        yield sse(backend_error_body(error))
        yield DONE


class ChatStream(_Chunks):
    """Chat completion chunks: a role chunk, content deltas (with their logprobs), the tool
    calls as ``delta.tool_calls``, the finish chunk, the usage chunk, ``[DONE]``."""

    kind = "chat.completion.chunk"

    def __init__(self, ident: str, created: int, model: str, body: ChatCompletionRequest) -> None:
        super().__init__(ident, created, model, body.include_usage())
        self.logprobs = bool(body.logprobs)

    def chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return self.envelope([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])

    def opening(self) -> Iterable[bytes]:
        yield sse(self.chunk({"role": "assistant", "content": ""}))

    def piece(self, text: str, logprobs: Sequence[pb.TokenLogprob]) -> Iterable[bytes]:
        yield sse(self.chunk({"content": text}, logprobs={"content": chat_content(logprobs)} if self.logprobs else None))

    def closing(self, final: pb.Reply) -> Iterable[bytes]:
        calls = tool_calls(final)
        if calls:
            yield sse(self.chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}))
        yield from self.ending(self.chunk({}, finish_reason(final)), final)


def chat_message(whole: Whole) -> dict[str, Any]:
    """The assistant message of a chat completion: content is null when it only called tools."""
    calls = tool_calls(whole.final)
    message: dict[str, Any] = {"role": "assistant", "content": whole.text if whole.text or not calls else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    return message


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    model, options = prepare_chat(body, request)
    ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        return await stream_response(request, model, options, ChatStream(ident, created, model.name, body))
    whole = await run_whole(request, model, options)
    return {
        "id": ident,
        "object": "chat.completion",
        "created": created,
        "model": model.name,
        "choices": [
            {
                "index": 0,
                "message": chat_message(whole),
                "logprobs": {"content": chat_content(whole.logprobs)} if body.logprobs else None,
                "finish_reason": finish_reason(whole.final),
            }
        ],
        "usage": _usage(whole.final),
    }


# -- completions --------------------------------------------------------------------------------


class CompletionStream(_Chunks):
    """Completion chunks: text (with legacy logprobs), the finish chunk, the usage chunk, ``[DONE]``."""

    kind = "text_completion"

    def __init__(self, ident: str, created: int, model: str, body: CompletionRequest) -> None:
        super().__init__(ident, created, model, body.include_usage())
        self.logprobs = LegacyLogprobs(body.prompt_text()) if body.logprobs is not None else None

    def chunk(self, text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return self.envelope([{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}])

    def opening(self) -> Iterable[bytes]:
        return ()

    def piece(self, text: str, logprobs: Sequence[pb.TokenLogprob]) -> Iterable[bytes]:
        yield sse(self.chunk(text, logprobs=self.logprobs.next(logprobs) if self.logprobs else None))

    def closing(self, final: pb.Reply) -> Iterable[bytes]:
        yield from self.ending(self.chunk("", finish_reason(final)), final)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    model = model_for(request, body.model)
    body.check(model)
    options = body.options(model.sampling, request_id(request))
    ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if body.stream:
        return await stream_response(request, model, options, CompletionStream(ident, created, model.name, body))
    whole = await run_whole(request, model, options)
    logprobs = LegacyLogprobs(body.prompt_text()).next(whole.logprobs) if body.logprobs is not None else None
    return {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": model.name,
        "choices": [{"index": 0, "text": whole.text, "logprobs": logprobs, "finish_reason": finish_reason(whole.final)}],
        "usage": _usage(whole.final),
    }


# -- embeddings ---------------------------------------------------------------------------------


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    model = model_for(request, body.model)
    options = pb.PredictOptions(Inputs=body.inputs(), RequestId=request_id(request))
    async with supervisor(request).session(model.name) as client:
        result = await client.embedding(options)
    record(request).observe(result)

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
