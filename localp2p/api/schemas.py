"""Request bodies of the OpenAI-compatible API (pydantic), and turning them into backend calls.

Unknown fields are accepted and ignored, as OpenAI clients send many; values that
are present must be valid, else the request gets a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from localp2p._proto import backend_pb2 as pb

#: The most stop sequences OpenAI accepts.
MAX_STOP = 4
#: Upper bound of max_tokens before the per-model context check (keeps ints sane).
MAX_TOKENS_LIMIT = 1 << 20


def _check_unicode(value: Any) -> Any:
    """Refuse text that is not valid Unicode: JSON may carry lone surrogates (``"\\ud800"``),
    which no UTF-8 encoder (protobuf, the JSON response) accepts."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text is not valid Unicode (it contains a lone surrogate)") from None
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)
    return value


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        return _check_unicode(value)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class _Sampling(_Lenient):
    model: str | None = Field(default=None, description="Model id; the default model when omitted")
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=1000)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, Field(ge=0, le=10)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    n: Annotated[int, Field(ge=1, le=1, description="Only 1 is supported")] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(default=False, description="LocalAI extension: generate exactly max_tokens tokens")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

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
            IgnoreEOS=self.ignore_eos,
            RequestId=request_id,
        )

    def max_token_limit(self, defaults: dict[str, Any]) -> int:
        value = self.max_tokens if self.max_tokens is not None else defaults.get("max_tokens", 0)
        return int(value or 0)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None

    def max_token_limit(self, defaults: dict[str, Any]) -> int:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().max_token_limit(defaults)


class CompletionRequest(_Sampling):
    # An empty prompt has no tokens to start from (llama.cpp asserts on it).
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=1)]
    echo: bool = False

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(_Lenient):
    model: str | None = None
    # An empty text has no tokens to embed (llama.cpp fails to decode it): OpenAI refuses it too.
    input: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)
