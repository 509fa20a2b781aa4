"""API keys: with any key configured, ``/v1/*`` and ``/api/*`` need one.

A key comes as ``Authorization: Bearer KEY`` (what OpenAI clients send) or
``x-api-key: KEY``. ``/healthz``, ``/readyz``, the web page and its static files stay
open (probes and the page's own login form need them); ``/metrics`` stays open unless
``protect_metrics``. A refusal is HTTP 401 in OpenAI's error shape with
``WWW-Authenticate: Bearer``. A CORS preflight (``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method``) carries no key by design and is never refused here:
the CORS middleware answers it, or, with CORS off, the router (405).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from localp2p.api.errors import error_body

#: Path prefixes that need a key when keys are configured.
PROTECTED_PREFIXES = ("/v1/", "/api/")
#: Also protected (exact paths): the prefixes without their trailing slash.
PROTECTED_EXACT = ("/v1", "/api")
METRICS_PATH = "/metrics"


def _is_preflight(scope: Scope) -> bool:
    if scope.get("method") != "OPTIONS":
        return False
    names = {name.lower() for name, _ in scope.get("headers", [])}
    return b"origin" in names and b"access-control-request-method" in names


def _presented_key(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        lower = name.lower()
        if lower == b"authorization":
            scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
        elif lower == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None


class RequireAPIKey:
    """ASGI middleware that refuses protected paths without a configured key.

    Keys are compared with :func:`hmac.compare_digest` against every configured key
    (no early exit), so the time taken says nothing about how close a guess was.
    With no keys configured it passes everything through.
    """

    def __init__(self, app: ASGIApp, keys: Sequence[str] = (), protect_metrics: bool = False) -> None:
        self.app = app
        self.keys = [k.encode("utf-8") for k in keys if k]
        self.protect_metrics = protect_metrics

    def protects(self, path: str) -> bool:
        if path.startswith(PROTECTED_PREFIXES) or path in PROTECTED_EXACT:
            return True
        return self.protect_metrics and path == METRICS_PATH

    def accepts(self, presented: str | None) -> bool:
        if presented is None:
            return False
        given = presented.encode("utf-8")
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(given, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not self.protects(scope.get("path", "")) or _is_preflight(scope):
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        if self.accepts(presented):
            await self.app(scope, receive, send)
            return
        message = (
            "Incorrect API key provided."
            if presented is not None
            else "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' (or 'x-api-key: KEY')."
        )
        response = JSONResponse(
            error_body(message, "invalid_request_error", code="invalid_api_key"),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)
