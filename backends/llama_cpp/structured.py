"""Structured output and tool calling: what a request's ``response_format`` and ``tools``
ask of the model, as a grammar that constrains its tokens and a prompt that explains it.

- ``response_format`` ``json_object``: llama.cpp's JSON grammar. ``json_schema``: the
  schema converted to a grammar (llama-cpp-python's port of llama.cpp's converter), so
  the reply parses and validates; ``strict`` changes nothing more (it always holds).
- ``tools``: the model is told the functions and the JSON shape of a call in a system
  message, and its reply is constrained to ``{"tool_calls": [{"name", "arguments"}]}``
  (``tool_choice`` ``required`` or a named function; arguments follow each function's
  parameter schema) or, with ``auto``, to either that or plain text that does not start
  with ``{``. A reply that starts with ``{`` is a tool call: it is held back and returned
  as OpenAI's ``tool_calls`` (finish reason ``tool_calls``); plain text streams as usual.
  This is llama.cpp's "generic" tool format: it works with any chat template.
- Earlier turns: an assistant message's ``tool_calls`` are rendered as that same JSON,
  and ``role: tool`` messages keep their role with the call id in front of the result.

Errors in what the client sent raise ValueError (the service answers INVALID_ARGUMENT).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

#: Plain text for ``tool_choice: auto``: anything that does not open a JSON object.
_TEXT_RULE = 'text ::= [^{] [^\\x00]*'
#: Where a tool-call reply starts (after optional whitespace).
_CALL_START = "{"


@dataclass(frozen=True)
class Structure:
    """What one request asks for: a grammar (GBNF, may be ""), a system text to add, and
    the tools a call may name (empty: no tool calling)."""

    grammar: str = ""
    system_note: str = ""
    tool_names: tuple[str, ...] = ()
    tools_required: bool = False

    @property
    def calls_tools(self) -> bool:
        return bool(self.tool_names)


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None


def _schema_grammar(schema: Any) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # noqa: PLC0415 - imports llama.cpp

    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises bare exceptions on schemas it cannot express
        raise ValueError(f"the JSON schema cannot be turned into a grammar: {exc}") from None


def _response_format_grammar(text: str) -> str:
    from llama_cpp.llama_grammar import JSON_GBNF  # noqa: PLC0415

    fmt = _loads(text, "response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in (None, "text"):
        return ""
    if kind == "json_object":
        return str(JSON_GBNF)
    if kind == "json_schema":
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        return _schema_grammar(schema)
    raise ValueError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")


def _functions(tools_text: str) -> list[dict[str, Any]]:
    tools = _loads(tools_text, "tools")
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list")
    functions = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError("every tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
        functions.append(function)
    return functions


def _call_schema(function: dict[str, Any]) -> dict[str, Any]:
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
    }


def plan(response_format: str, tools: str, tool_choice: str, parallel_tool_calls: bool) -> Structure:
    """The grammar and prompt note for one request's ``response_format`` / ``tools``."""
    choice = _loads(tool_choice, "tool_choice") if tool_choice else "auto"
    if not tools or choice == "none":
        return Structure(grammar=_response_format_grammar(response_format) if response_format else "")
    if response_format and _response_format_grammar(response_format):
        raise ValueError("response_format and tools cannot be combined in one request")
    functions = _functions(tools)
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise ValueError(f"tool_choice names a function that is not in tools: {name!r}")
        required = True
    elif choice in ("auto", "required"):
        required = choice == "required"
    else:
        raise ValueError(f"tool_choice {choice!r} is not one of none, auto, required or a named function")
    calls: dict[str, Any] = {"type": "array", "items": {"anyOf": [_call_schema(f) for f in functions]}, "minItems": 1}
    if not parallel_tool_calls:
        calls["maxItems"] = 1
    grammar = _schema_grammar({"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]})
    if not required:
        grammar = re.sub(r"^root ::=", "calls ::=", grammar, count=1, flags=re.M) + f"\nroot ::= calls | text\n{_TEXT_RULE}\n"
    described = [
        {"name": f["name"], "description": f.get("description", ""), "parameters": f.get("parameters") or {}} for f in functions
    ]
    note = (
        "You can call these functions (their parameters as JSON Schema):\n"
        + json.dumps(described, ensure_ascii=False)
        + '\nTo call functions, reply with only this JSON:\n{"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}]}'
        + ("" if required else "\nOtherwise answer in plain text.")
    )
    return Structure(grammar=grammar, system_note=note, tool_names=tuple(f["name"] for f in functions), tools_required=required)


def chat_messages(messages: list[dict[str, Any]], structure: Structure) -> list[dict[str, Any]]:
    """The messages to render: earlier tool calls and results as text, and the tools note
    in the system message (added when there is none)."""
    out = []
    for original in messages:
        message = dict(original)
        calls_text = message.pop("tool_calls", "")
        call_id = message.pop("tool_call_id", "")
        if calls_text:
            calls = _loads(calls_text, "an assistant message's tool_calls")
            rendered = {
                "tool_calls": [
                    {"name": c["function"]["name"], "arguments": _loads(c["function"].get("arguments") or "{}", "tool call arguments")}
                    for c in calls
                ]
            }
            message["content"] = ((message.get("content") or "") + "\n" + json.dumps(rendered, ensure_ascii=False)).strip()
        if message.get("role") == "tool" and call_id:
            message["content"] = f"[result of call {call_id}]\n{message.get('content') or ''}"
        out.append(message)
    if structure.system_note:
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = {**out[0], "role": "system", "content": f"{out[0].get('content') or ''}\n\n{structure.system_note}".strip()}
        else:
            out.insert(0, {"role": "system", "content": structure.system_note})
    return out


class ToolCallOutput:
    """Decides whether a reply is a tool call (it starts with ``{``) and collects it.

    :meth:`add` returns the text to stream (none once the reply is a call, nothing
    while only whitespace came); :meth:`calls` parses the held call at the end.
    """

    def __init__(self, required: bool) -> None:
        self.is_call: bool | None = True if required else None
        self._text = ""

    def add(self, text: str) -> str:
        if self.is_call is False:
            return text
        self._text += text
        if self.is_call is None:
            stripped = self._text.lstrip()
            if not stripped:
                return ""
            self.is_call = stripped.startswith(_CALL_START)
            if not self.is_call:
                text, self._text = self._text, ""
                return text
        return ""

    def held(self) -> str:
        """Text held back that turned out not to be a complete call (at the end)."""
        return self._text

    def calls(self) -> list[dict[str, Any]] | None:
        """OpenAI ``tool_calls`` for the held reply, or None when it is not a complete call."""
        if not self.is_call:
            return None
        try:
            parsed = json.loads(self._text)
            calls = [
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
                }
                for c in parsed["tool_calls"]
            ]
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
        return calls or None
