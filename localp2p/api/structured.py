"""Structured output and tools: ``response_format``, ``tools``, ``tool_choice``, as the backend gets them.

The backend (backends/llama_cpp) constrains decoding with a grammar built from these;
here they are checked for shape and passed on as JSON text (PredictOptions.ResponseFormat,
.Tools, .ToolChoice). The JSON schemas inside (a tool's ``parameters``, a format's
``schema``) are passed as given: the backend refuses one it cannot turn into a grammar
(INVALID_ARGUMENT, a 400).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator

from localp2p.api.errors import REFUSED
from localp2p.api.fields import Strict, refused, type_tag

#: OpenAI's rule for function and schema names.
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
#: The most tools OpenAI takes in one request.
MAX_TOOLS = 128
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


def _dump(value: Strict) -> str:
    return json.dumps(value.model_dump(by_alias=True, exclude_none=True), ensure_ascii=False)


# -- response_format -----------------------------------------------------------------------


class TextFormat(Strict):
    type: Literal["text"]


class JSONObjectFormat(Strict):
    type: Literal["json_object"]


class JSONSchemaSpec(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Name
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema", description="A JSON schema the reply must match")
    strict: bool | None = None


class JSONSchemaFormat(Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[
    Annotated[TextFormat, Tag("TextFormat")]
    | Annotated[JSONObjectFormat, Tag("JSONObjectFormat")]
    | Annotated[JSONSchemaFormat, Tag("JSONSchemaFormat")],
    Discriminator(
        type_tag({"text": "TextFormat", "json_object": "JSONObjectFormat", "json_schema": "JSONSchemaFormat"}),
        custom_error_type=REFUSED,
        custom_error_message="response_format.type must be 'text', 'json_object' or 'json_schema'",
    ),
]


def response_format_text(value: TextFormat | JSONObjectFormat | JSONSchemaFormat | None) -> str:
    """PredictOptions.ResponseFormat: "" for plain text, else the format as JSON."""
    return "" if value is None or isinstance(value, TextFormat) else _dump(value)


# -- tools -----------------------------------------------------------------------------------


class FunctionSpec(Strict):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON schema of the arguments")
    strict: bool | None = None


class FunctionTool(Strict):
    type: Literal["function"]
    function: FunctionSpec

    @field_validator("type", mode="before")
    @classmethod
    def _functions_only(cls, value: Any) -> Any:
        if value == "custom":
            raise refused("custom tools (free-form input) are not supported; use function tools (type 'function')")
        return value


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def refuse_other_tool_choices(value: Any) -> Any:
    """tool_choice shapes OpenAI has that this server does not: a clear 400 for each."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "allowed_tools":
        raise refused("tool_choice of type 'allowed_tools' is not supported; send only the allowed tools in 'tools'")
    if kind == "custom":
        raise refused("tool_choice of type 'custom' is not supported (custom tools are not)")
    return value


def tools_text(tools: list[FunctionTool] | None) -> str:
    """PredictOptions.Tools: the tools as JSON ("" for none)."""
    return json.dumps([t.model_dump(exclude_none=True) for t in tools], ensure_ascii=False) if tools else ""


def tool_choice_text(choice: str | NamedToolChoice | None) -> str:
    """PredictOptions.ToolChoice: the choice as JSON ("" when not given: auto)."""
    if choice is None:
        return ""
    return json.dumps(choice) if isinstance(choice, str) else _dump(choice)
