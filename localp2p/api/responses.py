"""OpenAI's Responses API for text: ``POST /v1/responses`` and ``GET /v1/responses/{id}``.

A request becomes a chat completion request (:meth:`ResponsesRequest.to_chat`:
``instructions`` first as a system message, then the stored conversation of
``previous_response_id``, then ``input``) and runs on the chat path
(:func:`localp2p.api.v1.prepare_chat`, :mod:`localp2p.api.generation`); this module owns
only the Responses shapes: the response object, its streamed events, and what is kept
for the next turn (:mod:`localp2p.api.response_store`). Tools, images, reasoning and
background runs are refused with a 400 naming the field.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from localp2p._proto import backend_pb2 as pb
from localp2p.api.errors import REFUSED, APIError
from localp2p.api.fields import Strict, Unsupported, refused, type_tag
from localp2p.api.generation import Whole, model_for, run_whole, sse, stream_response
from localp2p.api.messages import RefusalPart
from localp2p.api.response_store import ResponseStore
from localp2p.api.schemas import MAX_TOKENS_LIMIT, ChatCompletionRequest, Metadata
from localp2p.api.structured import JSONObjectFormat, JSONSchemaSpec, TextFormat
from localp2p.api.v1 import prepare_chat
from localp2p.server.backend_client import BackendError

router = APIRouter(prefix="/v1")

#: Input content types that carry media: the models here read text only.
MEDIA_INPUTS = {"input_image": "an image", "input_file": "a file", "input_audio": "audio"}
#: Chat-path parameter names as the Responses API spells them (for errors found there).
RESPONSES_PARAM = {"max_tokens": "max_output_tokens", "response_format.json_schema": "text.format", "response_format": "text.format"}


# -- the request --------------------------------------------------------------------------------


class InputText(Strict):
    type: Literal["input_text"]
    text: str


class OutputText(Strict):
    """Text of an assistant message replayed from an earlier response's ``output``."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class MediaInput(BaseModel):
    """An image, file or audio input: parsed only to be refused by name (see :meth:`ResponsesRequest.check`)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["input_image", "input_file", "input_audio"]


#: Input content type -> the class that parses it.
INPUT_TAGS = {"input_text": "InputText", "output_text": "OutputText", "refusal": "RefusalPart"}
INPUT_TAGS |= dict.fromkeys(MEDIA_INPUTS, "MediaInput")
InputContent = Annotated[
    Annotated[InputText, Tag("InputText")]
    | Annotated[OutputText, Tag("OutputText")]
    | Annotated[RefusalPart, Tag("RefusalPart")]
    | Annotated[MediaInput, Tag("MediaInput")],
    Discriminator(
        type_tag(INPUT_TAGS),
        custom_error_type=REFUSED,
        custom_error_message="unknown content type: this server takes 'input_text' (and 'output_text' in assistant messages)",
    ),
]


class InputMessage(Strict):
    """A message item of ``input`` (an earlier response's output message too)."""

    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputContent]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.refusal if isinstance(p, RefusalPart) else p.text for p in self.content if not isinstance(p, MediaInput))


def _messages_only(value: Any) -> Any:
    """``input`` items other than messages (tool calls and results, reasoning, references): a 400 that says so."""
    for i, item in enumerate(value if isinstance(value, list) else ()):
        kind = item.get("type", "message") if isinstance(item, dict) else "message"
        if kind != "message":
            raise refused(
                f"input[{i}]: items of type '{kind}' are not supported; this server takes message items "
                "(no tools or reasoning in /v1/responses)"
            )
    return value


class JSONSchemaTextFormat(JSONSchemaSpec):
    """The Responses API's json_schema format: chat's ``json_schema`` object, flattened."""

    type: Literal["json_schema"]


TextFormatConfig = Annotated[
    Annotated[TextFormat, Tag("TextFormat")]
    | Annotated[JSONObjectFormat, Tag("JSONObjectFormat")]
    | Annotated[JSONSchemaTextFormat, Tag("JSONSchemaTextFormat")],
    Discriminator(
        type_tag({"text": "TextFormat", "json_object": "JSONObjectFormat", "json_schema": "JSONSchemaTextFormat"}),
        custom_error_type=REFUSED,
        custom_error_message="text.format.type must be 'text', 'json_object' or 'json_schema'",
    ),
]


class TextConfig(Strict):
    format: TextFormatConfig | None = None
    verbosity: Annotated[Any, Unsupported("the models here have no verbosity control; use max_output_tokens", "medium")] = None

    def chat_format(self) -> dict[str, Any] | None:
        """The chat API's ``response_format`` for this format."""
        if not isinstance(self.format, JSONSchemaTextFormat):
            return self.format.model_dump() if self.format is not None else None
        spec = self.format.model_dump(by_alias=True, exclude_none=True, exclude={"type"})
        return {"type": "json_schema", "json_schema": spec}


class ResponsesStreamOptions(Strict):
    include_obfuscation: Annotated[Any, Unsupported("stream events carry no obfuscation padding here", False)] = None


class ResponsesRequest(Strict):
    model: str | None = Field(default=None, description="Model id; the default model when omitted")
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = Field(default=None, description="A system message first (not carried to the next turn)")
    max_output_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stream: bool | None = False
    stream_options: ResponsesStreamOptions | None = None
    previous_response_id: str | None = Field(default=None, description="Continue a conversation kept in memory (bounded)")
    store: bool | None = Field(default=True, description="Keep this response for previous_response_id (in memory, bounded)")
    text: TextConfig | None = None
    metadata: Metadata | None = None
    parallel_tool_calls: bool | None = Field(default=None, description="No tools here: accepted, no effect")
    user: str | None = Field(default=None, description="An end-user id for OpenAI's abuse monitoring: accepted, no effect")
    safety_identifier: str | None = Field(default=None, description="An end-user id for OpenAI's abuse monitoring: accepted, no effect")
    prompt_cache_key: str | None = Field(default=None, description="OpenAI's prompt-cache routing key: accepted, no effect")
    tools: Annotated[Any, Unsupported("tools are not supported in /v1/responses here; use /v1/chat/completions", [])] = None
    tool_choice: Annotated[Any, Unsupported("no tools in /v1/responses here", "auto", "none")] = None
    max_tool_calls: Annotated[Any, Unsupported("no tools in /v1/responses here")] = None
    reasoning: Annotated[Any, Unsupported("the models here do no separate reasoning")] = None
    background: Annotated[Any, Unsupported("responses run in the foreground only", False)] = None
    include: Annotated[Any, Unsupported("there is no extra output data to include", [])] = None
    top_logprobs: Annotated[Any, Unsupported("log-probabilities are served by /v1/chat/completions")] = None
    truncation: Annotated[Any, Unsupported("a conversation beyond the context is refused, never truncated", "disabled")] = None
    service_tier: Annotated[Any, Unsupported("this server has one service tier", "auto", "default")] = None
    conversation: Annotated[Any, Unsupported("conversations are not stored; use previous_response_id")] = None
    prompt: Annotated[Any, Unsupported("stored prompt templates are not supported")] = None
    prompt_cache_retention: Annotated[Any, Unsupported("the prompt cache lives in memory only", "in_memory")] = None
    prompt_cache_options: Annotated[Any, Unsupported("the prompt cache is automatic and has no options")] = None
    context_management: Annotated[Any, Unsupported("a conversation beyond the context is refused, never compacted")] = None

    _messages_only = field_validator("input", mode="before")(_messages_only)

    def input_messages(self) -> list[InputMessage]:
        return [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input

    def check(self, model_name: str) -> None:
        """Refuse media input by name (APIError 400)."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        for i, message in enumerate(self.input_messages() if isinstance(self.input, list) else ()):
            for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
                if isinstance(part, MediaInput):
                    raise APIError(
                        400,
                        f"model '{model_name}' takes text only: input[{i}].content[{j}] is {MEDIA_INPUTS[part.type]} ({part.type})",
                        param=f"input[{i}].content[{j}]",
                        code="unsupported_content",
                    )

    def turn(self) -> list[dict[str, Any]]:
        """This request's input as chat messages."""
        return [{"role": m.role, "content": m.text()} for m in self.input_messages()]

    def to_chat(self, conversation: list[dict[str, Any]]) -> ChatCompletionRequest:
        """The chat request this response runs as: instructions, the earlier ``conversation``, this turn."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return ChatCompletionRequest.model_validate(
            {
                "model": self.model,
                "messages": [*system, *conversation, *self.turn()],
                "max_tokens": self.max_output_tokens,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "stream": self.stream,
                "response_format": self.text.chat_format() if self.text is not None else None,
            }
        )


# -- the response -------------------------------------------------------------------------------


def _output_message(ident: str, text: str | None, status: str) -> dict[str, Any]:
    """The assistant message item (``text`` None: not started, no content yet)."""
    content = [] if text is None else [_output_text(text)]
    return {"id": ident, "type": "message", "status": status, "role": "assistant", "content": content}


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseShape:
    """The response object of one request, as it stands (``in_progress`` until :meth:`finished`)."""

    def __init__(self, body: ResponsesRequest, model: str) -> None:
        self.body = body
        self.id = f"resp_{uuid.uuid4().hex}"
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())

    def object(
        self,
        status: str,
        output: list[dict[str, Any]],
        final: pb.Reply | None = None,
        error: BackendError | None = None,
    ) -> dict[str, Any]:
        body = self.body
        text = body.text.model_dump(by_alias=True, exclude_none=True) if body.text is not None and body.text.format else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": {"code": error.code or "server_error", "message": error.message} if error is not None else None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "store": body.store is not False,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "text": text or {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "truncation": "disabled",
            "metadata": body.metadata or {},
            "user": body.user,
            "usage": _usage(final) if final is not None else None,
        }

    def finished(self, text: str, final: pb.Reply) -> dict[str, Any]:
        status = _status(final)
        return self.object(status, [_output_message(self.message_id, text, status)], final)


def _status(final: pb.Reply) -> str:
    return "incomplete" if final.finish_reason == "length" else "completed"


def _usage(final: pb.Reply) -> dict[str, Any]:
    return {
        "input_tokens": final.prompt_tokens,
        "input_tokens_details": {"cached_tokens": final.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": final.tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": final.prompt_tokens + final.tokens,
    }


def _keep(request: Request, shape: ResponseShape, conversation: list[dict[str, Any]], text: str, response: dict[str, Any]) -> None:
    """Keep a finished response for the next turn (unless ``store: false``)."""
    if shape.body.store is not False:
        store: ResponseStore = request.app.state.responses
        store.put(shape.id, [*conversation, *shape.body.turn(), {"role": "assistant", "content": text}], response)


class ResponsesStream:
    """The Responses API's events, in the order the openai SDK's stream parser expects:
    ``response.created``, ``response.in_progress``, ``response.output_item.added``,
    ``response.content_part.added``, ``response.output_text.delta``…, ``response.output_text.done``,
    ``response.content_part.done``, ``response.output_item.done``, then ``response.completed``
    (``response.incomplete`` when max_output_tokens cut it; ``error`` and ``response.failed`` on failure)."""

    def __init__(self, request: Request, shape: ResponseShape, conversation: list[dict[str, Any]]) -> None:
        self.request, self.shape, self.conversation = request, shape, conversation
        self.sequence = 0
        self.text = ""

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse(data, event=kind)

    def _at(self) -> dict[str, Any]:
        return {"item_id": self.shape.message_id, "output_index": 0, "content_index": 0}

    def opening(self) -> Iterable[bytes]:
        started = self.shape.object("in_progress", [])
        yield self.event("response.created", response=started)
        yield self.event("response.in_progress", response=started)
        yield self.event("response.output_item.added", output_index=0, item=_output_message(self.shape.message_id, None, "in_progress"))
        yield self.event("response.content_part.added", **self._at(), part=_output_text(""))

    def piece(self, text: str, logprobs: Sequence[pb.TokenLogprob]) -> Iterable[bytes]:
        self.text += text
        if text:
            yield self.event("response.output_text.delta", **self._at(), delta=text, logprobs=[])

    def closing(self, final: pb.Reply) -> Iterable[bytes]:
        yield self.event("response.output_text.done", **self._at(), text=self.text, logprobs=[])
        yield self.event("response.content_part.done", **self._at(), part=_output_text(self.text))
        item = _output_message(self.shape.message_id, self.text, _status(final))
        yield self.event("response.output_item.done", output_index=0, item=item)
        response = self.shape.finished(self.text, final)
        _keep(self.request, self.shape, self.conversation, self.text, response)
        yield self.event(f"response.{response['status']}", response=response)

    def failure(self, error: BackendError) -> Iterable[bytes]:
        yield self.event("error", code=error.code or error.error_type, message=error.message, param=None)
        item = _output_message(self.shape.message_id, self.text, "incomplete")
        yield self.event("response.failed", response=self.shape.object("failed", [item], error=error))


def _responses_spelling(text: str | None) -> Any:
    """``text`` with the chat path's parameter names replaced by the Responses API's."""
    for chat_name, name in RESPONSES_PARAM.items():
        text = text.replace(chat_name, name) if text else text
    return text


def _earlier_conversation(request: Request, body: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation of ``previous_response_id`` ([] without one); 400 when it is not kept."""
    if body.previous_response_id is None:
        return []
    store: ResponseStore = request.app.state.responses
    stored = store.get(body.previous_response_id)
    if stored is None:
        raise APIError(
            400,
            f"Previous response with id '{body.previous_response_id}' not found (responses are kept in memory "
            f"for {store.max_age:g} s, the last {store.limit} at most)",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return stored.conversation


@router.post("/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Any:
    body.check(model_for(request, body.model).name)
    conversation = _earlier_conversation(request, body)
    try:
        model, options = prepare_chat(body.to_chat(conversation), request)
    except APIError as exc:
        exc.param, exc.message = _responses_spelling(exc.param), _responses_spelling(exc.message)
        raise
    shape = ResponseShape(body, model.name)
    if body.stream:
        return await stream_response(request, model, options, ResponsesStream(request, shape, conversation))
    whole: Whole = await run_whole(request, model, options)
    response = shape.finished(whole.text, whole.final)
    _keep(request, shape, conversation, whole.text, response)
    return response


@router.get("/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> Any:
    store: ResponseStore = request.app.state.responses
    stored = store.get(response_id)
    if stored is None:
        raise APIError(404, f"No response with id '{response_id}' is kept here", param="response_id", code="not_found")
    return stored.response
