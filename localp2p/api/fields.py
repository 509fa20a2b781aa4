"""What every request body of the API is built from: nothing in a request is silently dropped.

- :class:`Strict`: a pydantic model that refuses fields it does not declare (a 400 that
  names the field) and text that is not valid Unicode.
- :class:`Unsupported`: the marker of a field OpenAI defines that this server does not
  honour. Absent, ``null`` or a value that asks for what the server does anyway passes;
  anything else is a 400 that names the field and says why.
- :func:`refused`: the error those checks raise (pydantic error type
  :data:`~localp2p.api.errors.REFUSED`, whose message the error handler passes on as is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler, GetJsonSchemaHandler, ValidationInfo, field_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from localp2p.api.errors import REFUSED


def refused(message: str) -> PydanticCustomError:
    """A validation error whose ``message`` is the whole answer (it names the field and says why)."""
    return PydanticCustomError(REFUSED, message)  # no context: pydantic formats nothing in it


def check_unicode(value: Any) -> Any:
    """Refuse text that is not valid Unicode: JSON may carry lone surrogates (``"\\ud800"``),
    which no UTF-8 encoder (protobuf, the JSON response) accepts."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text is not valid Unicode (it contains a lone surrogate)") from None
    elif isinstance(value, list):
        for item in value:
            check_unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(key)
            check_unicode(item)
    return value


class Strict(BaseModel):
    """A request body (or part of one): undeclared fields are refused, text must be valid Unicode."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        return check_unicode(value)


def _same(value: Any, accepted: Any) -> bool:
    """Equal and of the same JSON type (``1`` is not ``true``)."""
    return type(value) is type(accepted) and bool(value == accepted)


class Unsupported:
    """``Annotated[Any, Unsupported(why, *accepted)]``: an OpenAI field this server does not honour.

    Absent, ``null``, or equal to one of ``accepted`` (values that ask for what the server
    does anyway, such as ``store: false``) passes; anything else fails validation with
    ``"<field> is not supported: <why>"``. The OpenAPI document says so in the field's
    description.
    """

    def __init__(self, why: str, *accepted: Any) -> None:
        self.why = why
        self.accepted = accepted

    def check(self, value: Any, info: ValidationInfo) -> Any:
        if value is None or any(_same(value, ok) for ok in self.accepted):
            return value
        raise refused(f"{info.field_name} is not supported: {self.why}")

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.with_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        document = handler(schema)
        allowed = ", ".join(repr(v) for v in self.accepted)
        document["description"] = f"Not supported: {self.why}" + (f" (accepted: {allowed})" if allowed else "")
        return document


def type_tag(tags: dict[str, str]) -> Callable[[Any], str | None]:
    """A pydantic ``Discriminator`` function: the tag of the union member a value's ``type``
    names (``tags``: type -> tag), None for a type not in ``tags`` (a validation error)."""

    def tag(value: Any) -> str | None:
        kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        return tags.get(kind) if isinstance(kind, str) else None

    return tag
