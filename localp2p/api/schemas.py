"""Request bodies of the OpenAI-compatible API (pydantic), and turning them into backend calls.

Every field OpenAI defines for an endpoint is declared: honoured (mapped into
PredictOptions) or :class:`~localp2p.api.fields.Unsupported` (a 400 that says why,
unless its value asks for what the server does anyway). Any other field is refused
(400, ``unrecognized request argument``), except the extensions in :data:`EXTENSIONS`
that llama.cpp-based servers (LocalAI, llama.cpp's server) take and their clients send.
Values must be valid, else the request gets a 400 naming the field. Checks that need
the model or more than one field are each request's ``check``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from localp2p._proto import backend_pb2 as pb
from localp2p.api.errors import APIError
from localp2p.api.fields import Strict, Unsupported, refused
from localp2p.api.messages import ChatMessage, check_conversation
from localp2p.api.structured import (
    MAX_TOOLS,
    FunctionTool,
    JSONSchemaFormat,
    ResponseFormat,
    TextFormat,
    ToolChoice,
    refuse_other_tool_choices,
    response_format_text,
    tool_choice_text,
    tools_text,
)
from localp2p.config import ModelConfig

#: The most stop sequences OpenAI accepts.
MAX_STOP = 4
#: Upper bound of max_tokens before the per-model context check (keeps ints sane).
MAX_TOKENS_LIMIT = 1 << 20
#: Most logit_bias entries: OpenAI documents none; this keeps a request's bias map small
#: next to any vocabulary (a ban list of a thousand tokens fits).
MAX_LOGIT_BIAS = 1024
#: Largest token id a logit_bias key may name (the backend refuses ids beyond its vocabulary).
MAX_TOKEN_ID = 2**31 - 1
#: Most alternatives per token: chat ``top_logprobs`` (OpenAI's limit).
MAX_TOP_LOGPROBS = 20
#: Most alternatives per token: completions ``logprobs`` (OpenAI's limit).
MAX_LEGACY_LOGPROBS = 5
#: OpenAI's bound on embeddings inputs per request.
MAX_EMBEDDING_INPUTS = 2048
#: Request fields that are not OpenAI's but are honoured (llama.cpp samplers, LocalAI's ignore_eos).
EXTENSIONS = ("top_k", "min_p", "repeat_penalty", "ignore_eos")

#: Fields a client may send that only tag the request for OpenAI's own bookkeeping (abuse
#: monitoring, stored completions, its prompt-cache routing); they change no output, and
#: this server stores nothing (its prompt cache needs no key), so they are accepted as is.
Metadata = Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)]


class StreamOptions(Strict):
    include_usage: bool | None = None
    include_obfuscation: Annotated[Any, Unsupported("stream events carry no obfuscation padding here", False)] = None


def _token_id(key: str) -> int:
    """A logit_bias key: a token id written as a decimal string."""
    if not key.isdigit() or int(key) > MAX_TOKEN_ID:
        raise refused(f"logit_bias keys are token ids (integers from 0 to {MAX_TOKEN_ID}); got {key!r}")
    return int(key)


class _Sampling(Strict):
    """What chat and completions share: the model, sampling, stopping, streaming."""

    model: str | None = Field(default=None, description="Model id; the default model when omitted")
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=1000, description="Extension: llama.cpp's top-k sampler")] | None = None
    min_p: Annotated[float, Field(ge=0, le=1, description="Extension: llama.cpp's min-p sampler")] | None = None
    repeat_penalty: Annotated[float, Field(ge=0, le=10, description="Extension: llama.cpp's repeat penalty")] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] | None = None
    stop: str | list[str] | None = Field(default=None, description=f"Up to {MAX_STOP} sequences that end the generation")
    n: int | None = Field(default=None, description="Choices to generate: only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=MAX_LOGIT_BIAS)] | None = Field(
        default=None, description="Token id (as a string) -> bias added to its logit: -100 bans it, 100 forces it"
    )
    user: str | None = Field(default=None, description="An end-user id for OpenAI's abuse monitoring: accepted, no effect")
    ignore_eos: bool | None = Field(default=False, description="Extension (LocalAI): generate exactly max_tokens tokens")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise refused(f"n: only 1 choice per request is supported (got {value}); send separate requests, with a seed each")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise refused(f"stop: at most {MAX_STOP} stop sequences (got {len(value)})")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            _token_id(key)
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def check(self, model: ModelConfig) -> None:
        """Checks across fields and against the model; raises APIError (400)."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        limit = self.max_token_limit(model.sampling)
        if limit > model.context_size:
            raise APIError(
                400,
                f"max_tokens ({limit}) exceeds the context window of model '{model.name}' ({model.context_size} tokens)",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def options(self, defaults: dict[str, Any], request_id: str) -> pb.PredictOptions:
        """PredictOptions with request values over the model's YAML defaults over llama.cpp's."""

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        return pb.PredictOptions(
            Tokens=self.max_token_limit(defaults),
            Temperature=pick("temperature", 0.8),
            TopP=pick("top_p", 0.95),
            TopK=pick("top_k", 40),
            MinP=pick("min_p", 0.05),
            RepeatPenalty=pick("repeat_penalty", 1.0),
            PresencePenalty=pick("presence_penalty", 0.0),
            FrequencyPenalty=pick("frequency_penalty", 0.0),
            Seed=pick("seed", 0),
            StopPrompts=self.stop_list(),
            IgnoreEOS=bool(self.ignore_eos),
            RequestId=request_id,
            LogitBias={_token_id(k): v for k, v in (self.logit_bias or {}).items()},
        )

    def max_token_limit(self, defaults: dict[str, Any]) -> int:
        value = self.max_tokens if self.max_tokens is not None else defaults.get("max_tokens", 0)
        return int(value or 0)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = Field(default=None, description="More than one tool call per reply (default true)")
    logprobs: bool | None = Field(default=None, description="Return each output token's log-probability")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        default=None, description="With logprobs: the N most likely tokens at each position"
    )
    metadata: Metadata | None = Field(default=None, description="Tags for stored completions: accepted; nothing is stored")
    store: Annotated[Any, Unsupported("completions are not stored by this server", False)] = None
    safety_identifier: str | None = Field(default=None, description="An end-user id for OpenAI's abuse monitoring: accepted, no effect")
    prompt_cache_key: str | None = Field(default=None, description="OpenAI's prompt-cache routing key: accepted, no effect")
    service_tier: Annotated[Any, Unsupported("this server has one service tier", "auto", "default")] = None
    modalities: Annotated[Any, Unsupported("the models here write text only", ["text"])] = None
    audio: Annotated[Any, Unsupported("the models here write text only")] = None
    prediction: Annotated[Any, Unsupported("predicted outputs are not supported")] = None
    reasoning_effort: Annotated[Any, Unsupported("the models here do no separate reasoning", "none")] = None
    verbosity: Annotated[Any, Unsupported("the models here have no verbosity control; use max_tokens")] = None
    web_search_options: Annotated[Any, Unsupported("this server cannot search the web")] = None
    moderation: Annotated[Any, Unsupported("this server runs no moderation")] = None
    prompt_cache_retention: Annotated[Any, Unsupported("the prompt cache lives in memory only", "in_memory")] = None
    prompt_cache_options: Annotated[Any, Unsupported("the prompt cache is automatic and has no options")] = None
    functions: Annotated[Any, Unsupported("deprecated by OpenAI; use tools")] = None
    function_call: Annotated[Any, Unsupported("deprecated by OpenAI; use tool_choice")] = None

    _other_tool_choices = field_validator("tool_choice", mode="before")(refuse_other_tool_choices)

    def max_token_limit(self, defaults: dict[str, Any]) -> int:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().max_token_limit(defaults)

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        check_conversation(self.messages, model.name)
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        names = {tool.function.name for tool in self.tools or ()}
        if self.tool_choice == "required" and not names:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        if not isinstance(self.tool_choice, str | None) and self.tool_choice.function.name not in names:
            raise APIError(
                400, f"tool_choice names function '{self.tool_choice.function.name}', which is not among the tools", param="tool_choice"
            )
        if len(names) < len(self.tools or ()):
            raise APIError(400, "tools: function names must be unique", param="tools")
        fmt = self.response_format
        if isinstance(fmt, JSONSchemaFormat) and fmt.json_schema.schema_ is None:
            where = "response_format.json_schema.schema"
            raise APIError(400, f"missing required parameter: {where}", param=where)
        if names and self.tool_choice != "none" and not isinstance(fmt, TextFormat | None):
            raise APIError(
                400,
                "response_format (JSON output) and tools cannot be combined in one request here: both constrain the reply",
                param="response_format",
            )

    def options(self, defaults: dict[str, Any], request_id: str) -> pb.PredictOptions:
        options = super().options(defaults, request_id)
        options.Messages.extend(m.to_backend() for m in self.messages)
        options.ResponseFormat = response_format_text(self.response_format)
        if self.tools:
            options.Tools = tools_text(self.tools)
            options.ToolChoice = tool_choice_text(self.tool_choice)
            options.ParallelToolCalls = self.parallel_tool_calls is not False
        options.Logprobs = bool(self.logprobs)
        options.TopLogprobs = self.top_logprobs or 0
        return options


def _one_text_prompt(value: Any) -> Any:
    """Completions ``prompt``: one text. Lists of texts beyond one and token ids get the real limit."""
    if isinstance(value, list) and value:
        if all(isinstance(item, int) for item in value) or all(isinstance(item, list) for item in value):
            raise refused("prompt: token-id prompts are not supported; send the prompt as text")
        if len(value) > 1:
            raise refused(f"prompt: this server takes one prompt per request (got {len(value)}); send each as its own request")
    return value


class CompletionRequest(_Sampling):
    # An empty prompt has no tokens to start from (llama.cpp asserts on it).
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    echo: bool | None = Field(default=False, description="Put the prompt before the completion")
    logprobs: Annotated[int, Field(ge=0, le=MAX_LEGACY_LOGPROBS)] | None = Field(
        default=None, description="Return each token's log-probability and the N most likely alternatives"
    )
    suffix: Annotated[Any, Unsupported("there is no insertion (fill-in-the-middle) mode", "")] = None
    best_of: Annotated[Any, Unsupported("only best_of=1 (one candidate per request)", 1)] = None

    _one_prompt = field_validator("prompt", mode="before")(_one_text_prompt)

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        if self.echo and self.logprobs is not None:
            raise APIError(
                400, "logprobs with echo is not supported: the backend gives no log-probabilities for prompt tokens", param="logprobs"
            )

    def options(self, defaults: dict[str, Any], request_id: str) -> pb.PredictOptions:
        options = super().options(defaults, request_id)
        options.Prompt = self.prompt_text()
        options.Echo = bool(self.echo)
        options.Logprobs = self.logprobs is not None
        options.TopLogprobs = self.logprobs or 0
        return options


def _text_inputs(value: Any) -> Any:
    """Embeddings ``input``: texts only (token ids get a 400 that says so)."""
    if isinstance(value, list) and value and all(isinstance(item, int | list) for item in value):
        raise refused("input: token-id inputs are not supported; send text (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))")
    return value


class EmbeddingRequest(Strict):
    model: str | None = None
    # An empty text has no tokens to embed (llama.cpp fails to decode it): OpenAI refuses it too.
    input: Annotated[str, Field(min_length=1)] | Annotated[
        list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
    ]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[Any, Unsupported("embeddings keep the model's own size")] = None
    user: str | None = Field(default=None, description="An end-user id for OpenAI's abuse monitoring: accepted, no effect")

    _texts = field_validator("input", mode="before")(_text_inputs)

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)
