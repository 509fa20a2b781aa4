"""Chat messages as OpenAI clients send them, checked and turned into the backend's ChatMessage.

Owns what a conversation may hold: text content (a string or ``text`` parts; an
assistant's ``refusal`` counts as what it said), an assistant's ``tool_calls`` and the
``role: tool`` messages that answer them (``tool_call_id``). Images, audio and files are
refused with a 400 naming the part (the models served here read text only); so is the
deprecated ``function`` role. Every refusal is an :class:`~localp2p.api.errors.APIError`
whose ``param`` is OpenAI's path to the offending value (``messages[2].content[1]``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from localp2p._proto import backend_pb2 as pb
from localp2p.api.errors import REFUSED, APIError
from localp2p.api.fields import Strict, Unsupported, type_tag

#: Content part types that carry media: the models here read text only.
MEDIA_PARTS = {"image_url": "an image", "input_audio": "audio", "file": "a file"}
#: Roles whose text reaches the chat template under another name: OpenAI's ``developer``
#: messages are its newer spelling of ``system`` (chat templates know only ``system``).
TEMPLATE_ROLE = {"developer": "system"}


class TextPart(Strict):
    type: Literal["text"]
    text: str


class RefusalPart(Strict):
    """An assistant's refusal, replayed: part of what it said."""

    type: Literal["refusal"]
    refusal: str


class MediaPart(BaseModel):
    """An image, audio or file part: parsed only to be refused by name (see :meth:`ChatMessage.check`)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file"]


ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[RefusalPart, Tag("RefusalPart")] | Annotated[MediaPart, Tag("MediaPart")],
    Discriminator(
        type_tag({"text": "TextPart", "refusal": "RefusalPart"} | dict.fromkeys(MEDIA_PARTS, "MediaPart")),
        custom_error_type=REFUSED,
        custom_error_message="unknown content part type: this server takes 'text' parts (and 'refusal' in assistant messages)",
    ),
]


class ToolCallFunction(Strict):
    name: str
    arguments: str = Field(description="The call's arguments as JSON text")


class ToolCall(Strict):
    """One call in an assistant message's ``tool_calls`` (replayed conversation)."""

    id: str
    type: Literal["function"]
    function: ToolCallFunction


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="assistant: the tools it called")
    tool_call_id: str | None = Field(default=None, description="role 'tool': the call this message answers")
    refusal: str | None = Field(default=None, description="assistant: a refusal it gave (read as part of what it said)")
    audio: Annotated[Any, Unsupported("the models here neither read nor make audio")] = None
    function_call: Annotated[Any, Unsupported("deprecated by OpenAI; replay calls as tool_calls")] = None

    def text(self) -> str:
        """The message's text: its content (text and refusal parts joined), else its refusal."""
        if isinstance(self.content, str):
            return self.content
        parts = [p.text if isinstance(p, TextPart) else p.refusal for p in self.content or () if not isinstance(p, MediaPart)]
        if not parts and self.refusal:
            return self.refusal
        return "".join(parts)

    def check(self, where: str, model_name: str, earlier_calls: set[str]) -> None:
        """Refuse what this message cannot be: ``where`` is its path (``messages[3]``),
        ``earlier_calls`` the tool call ids of the messages before it. Raises APIError (400)."""
        if self.role == "function":
            raise APIError(
                400,
                f"{where}.role: role 'function' is deprecated and not supported; send a tool's result as role 'tool' "
                "with the tool_call_id it answers",
                param=f"{where}.role",
            )
        for j, part in enumerate(self.content if isinstance(self.content, list) else ()):
            if isinstance(part, MediaPart):
                raise APIError(
                    400,
                    f"model '{model_name}' takes text only: {where}.content[{j}] is {MEDIA_PARTS[part.type]} ({part.type})",
                    param=f"{where}.content[{j}]",
                    code="unsupported_content",
                )
            if isinstance(part, RefusalPart) and self.role != "assistant":
                raise APIError(400, f"{where}.content[{j}]: 'refusal' parts belong to assistant messages", param=f"{where}.content[{j}]")
        if self.tool_calls is not None and self.role != "assistant":
            raise APIError(400, f"{where}.tool_calls: only assistant messages carry tool_calls", param=f"{where}.tool_calls")
        if self.role == "tool":
            if not self.tool_call_id:
                raise APIError(400, f"missing required parameter: {where}.tool_call_id", param=f"{where}.tool_call_id")
            if self.tool_call_id not in earlier_calls:
                raise APIError(
                    400,
                    f"{where}: a 'tool' message must answer a tool call of an earlier assistant message; "
                    f"no call has id '{self.tool_call_id}'",
                    param=f"{where}.tool_call_id",
                )
        elif self.tool_call_id is not None:
            raise APIError(400, f"{where}.tool_call_id: only 'tool' messages carry tool_call_id", param=f"{where}.tool_call_id")
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.refusal)):
            raise APIError(400, f"missing required parameter: {where}.content", param=f"{where}.content")

    def to_backend(self) -> pb.ChatMessage:
        calls = json.dumps([c.model_dump() for c in self.tool_calls], ensure_ascii=False) if self.tool_calls else ""
        return pb.ChatMessage(
            role=TEMPLATE_ROLE.get(self.role, self.role),
            content=self.text(),
            name=self.name or "",
            tool_calls=calls,
            tool_call_id=self.tool_call_id or "",
        )


def check_conversation(messages: Sequence[ChatMessage], model_name: str, field: str = "messages") -> None:
    """Check every message in order (see :meth:`ChatMessage.check`); raises APIError (400)."""
    calls: set[str] = set()
    for i, message in enumerate(messages):
        message.check(f"{field}[{i}]", model_name, calls)
        calls.update(call.id for call in message.tool_calls or ())
