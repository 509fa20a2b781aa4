"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from localp2p.server.backend_client import BackendError


class APIError(Exception):
    """Raise from a route to answer with an OpenAI-style error."""

    def __init__(
        self, status: int, message: str, error_type: str = "invalid_request_error", param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.param, self.code = status, message, error_type, param, code


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    error_type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param, code), status_code=status, headers=headers)


def backend_error_body(exc: BackendError) -> dict[str, Any]:
    return error_body(exc.message, exc.error_type, code=exc.code)


#: Seconds a client is asked to wait (Retry-After) on a 429/503 that does not say otherwise.
RETRY_AFTER = 5

_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}
#: pydantic error type of a refusal whose message is already complete (it names the field and
#: says why): raised by the request bodies (localp2p.api.fields) and passed on unchanged.
REFUSED = "refused"


def _is_type_tag(part: object) -> bool:
    """pydantic puts union member names ('str', 'list[str]', 'TextPart') into error locations."""
    if not isinstance(part, str):
        return False
    return "[" in part or "-" in part or part in _TYPE_NAMES or part[:1].isupper()


def param_path(loc: Sequence[object]) -> str | None:
    """OpenAI's spelling of a location in the body: ``messages[0].content[1]``."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _is_type_tag(part):
            path += f".{part}" if path else str(part)
    return path or None


def _most_telling(errors: Sequence[Any]) -> Any:
    """The error to report: of those about the first field named, a refusal (it says why),
    else the deepest (a value that failed every member of a union has an error per
    member; the one that got furthest is the one the client meant)."""
    field = errors[0].get("loc", ())[:2]
    same = [e for e in errors if e.get("loc", ())[:2] == field]
    return max(same, key=lambda e: (e.get("type") == REFUSED, len(e.get("loc", ()))))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = _most_telling(errors)
    kind = first.get("type")
    if kind == "json_invalid":
        return f"request body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}", None
    param = param_path(first.get("loc", ()))
    if kind == "missing":
        return f"missing required parameter: {param}", param
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    message = first.get("msg", "invalid value")
    if kind == REFUSED:
        return message, param
    return (f"invalid value for {param}: {message}" if param else message), param


#: The error object every non-2xx answer carries (OpenAI's shape), for the OpenAPI document.
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def document_errors(app: FastAPI) -> None:
    """Make ``/openapi.json`` say what the app answers to a bad request: 400 with :data:`ERROR_SCHEMA`.

    FastAPI documents its default 422 ``HTTPValidationError`` for every route
    with parameters; the handler below answers 400 in OpenAI's shape instead.
    The document is built once, on first request, by FastAPI's own generator.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components["Error"] = ERROR_SCHEMA
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses["400"] = {
                        "description": "Invalid request",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can produce leaves it in OpenAI's shape; nothing leaks a traceback."""
    document_errors(app)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.error_type, exc.param, exc.code)

    @app.exception_handler(BackendError)
    async def _backend_error(_request: Request, exc: BackendError) -> JSONResponse:
        retry_after = getattr(exc, "retry_after", RETRY_AFTER)
        headers = {"Retry-After": str(retry_after)} if exc.status in (429, 503) else None
        return JSONResponse(backend_error_body(exc), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, detail, kind)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        from localp2p.logs import get_logger  # noqa: PLC0415

        get_logger("api").exception("unhandled error", error=repr(exc))
        return error_response(500, "internal server error", "server_error")
