"""The HTTP application: OpenAI routes, health and readiness, request ids, size limits."""

from __future__ import annotations

import re
import uuid
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localp2p import __version__
from localp2p.api.errors import error_body, error_response, install_error_handlers
from localp2p.api.page import router as page_router
from localp2p.api.v1 import router as v1_router
from localp2p.supervisor import BackendSupervisor

#: Largest request body accepted (a 1 MB prompt fits; a runaway upload does not).
MAX_BODY_BYTES = 8 * 1024 * 1024
#: A client-supplied X-Request-ID is kept only when it looks like an id.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestContext:
    """ASGI middleware: a request id per HTTP request (logged, echoed) and a body size cap.

    Pure ASGI rather than BaseHTTPMiddleware so streamed responses pass through
    untouched and cancellation on client disconnect still reaches the route.
    """

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        if scope["method"] == "POST" and "json" not in headers.get("content-type", ""):
            # curl -d and some clients omit the type; every POST body here is JSON.
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            response = JSONResponse(
                error_body(f"request body of {length} bytes exceeds the limit of {self.max_body}", "invalid_request_error"),
                status_code=413,
            )
            await response(scope, receive, send)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge()
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, limited_receive, send_with_id)
            except _BodyTooLarge:
                response = JSONResponse(
                    error_body(f"request body exceeds the limit of {self.max_body} bytes", "invalid_request_error"),
                    status_code=413,
                )
                await response(scope, receive, send_with_id)


class _BodyTooLarge(Exception):
    pass


def create_app(supervisor: BackendSupervisor, extra_state: dict[str, Any] | None = None) -> FastAPI:
    """Build the app around a running supervisor (the app only reads its state)."""
    app = FastAPI(title="localp2p", version=__version__, docs_url=None, redoc_url=None)
    app.state.supervisor = supervisor
    for key, value in (extra_state or {}).items():
        setattr(app.state, key, value)
    install_error_handlers(app)
    app.include_router(v1_router)
    app.include_router(page_router)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        status = supervisor.status
        body = {"status": "ready" if supervisor.ready else status.state, "model": status.model}
        if not supervisor.ready and status.last_error:
            body["error"] = status.last_error
        return JSONResponse(body, status_code=200 if supervisor.ready else 503)

    @app.get("/api/status")
    async def api_status() -> dict[str, Any]:
        status = await supervisor.refresh_status()
        return {
            "backend": {
                "state": status.state,
                "ready": supervisor.ready,
                "pid": status.pid,
                "restarts": status.restarts,
                "last_error": status.last_error or None,
                "load_seconds": status.load_seconds,
            },
            "model": status.model,
            "models": list(supervisor.models),
            "rpc_servers": list(status.rpc_servers),
            "devices": status.devices,
            "layers": {"total": status.layers_total, "local": status.layers_local},
        }

    @app.get("/api/p2p")
    async def api_p2p() -> JSONResponse:
        network = getattr(app.state, "network", None)
        workers = getattr(app.state, "workers", None)
        if workers is None:
            return error_response(404, "p2p mode is off (start the server with --p2p)", "invalid_request_error")
        layers = {d["endpoint"]: d["layers"] for d in supervisor.status.devices if d.get("used")}
        listed = []
        for worker in workers.all():
            entry = worker.as_dict()
            entry["layers"] = layers.get(worker.endpoint, 0) if worker.endpoint else 0
            listed.append(entry)
        return JSONResponse(
            {
                "node": network.describe() if network is not None else None,
                "network_id": network.settings.token.network_id if network is not None else None,
                "workers": listed,
                "backend_rpc_servers": list(supervisor.status.rpc_servers),
            }
        )

    app.add_middleware(RequestContext)
    return app
