"""The HTTP application: OpenAI routes, health and readiness, request ids, size limits, metrics, API keys."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

import structlog
from fastapi import FastAPI, HTTPException
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from localp2p import __version__
from localp2p.api.api_keys import RequireAPIKey
from localp2p.api.errors import error_body, error_response, install_error_handlers
from localp2p.api.page import router as page_router
from localp2p.api.response_store import ResponseStore
from localp2p.api.responses import router as responses_router
from localp2p.api.v1 import router as v1_router
from localp2p.logs import get_logger
from localp2p.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from localp2p.metrics import UNMATCHED, Metrics, RequestRecord
from localp2p.server.supervisor import BackendSupervisor

log = get_logger("http")

#: Largest request body accepted (a 1 MB prompt fits; a runaway upload does not).
MAX_BODY_BYTES = 8 * 1024 * 1024
#: A client-supplied X-Request-ID is kept only when it looks like an id.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
#: Paths polled by probes, scrapers and the web page: their successful answers are logged
#: at debug level only, so an info-level log shows the requests a person sent.
QUIET_PATHS = ("/healthz", "/readyz", "/metrics", "/api/status", "/api/p2p", "/", "/static/{name}")
#: Probes: their answers (a 503 from /readyz while the model loads, too) are logged at debug level.
PROBE_PATHS = ("/healthz", "/readyz")
#: Status recorded for a request whose response never completed (the client went away).
CLIENT_CLOSED = 499
#: Seconds a browser may cache a CORS preflight answer.
CORS_MAX_AGE = 600


class RequestContext:
    """ASGI middleware: a request id per HTTP request (logged, echoed), a body size cap,
    and the request's :class:`RequestRecord` (``scope["state"]["record"]``, filled in by
    the routes): counted in the metrics and logged as one line (method, path, status,
    duration) when the request ends.

    Pure ASGI rather than BaseHTTPMiddleware so streamed responses pass through
    untouched and cancellation on client disconnect still reaches the route.
    """

    def __init__(
        self, app: ASGIApp, max_body: int = MAX_BODY_BYTES, metrics: Metrics | None = None, routes: Sequence[Any] = ()
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        record = RequestRecord(id=request_id, endpoint=UNMATCHED, started=time.monotonic())
        state = scope.setdefault("state", {})
        state["request_id"], state["record"] = request_id, record
        if scope["method"] == "POST" and "json" not in headers.get("content-type", ""):
            # curl -d and some clients omit the type; every POST body here is JSON.
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
            scope["headers"].append((b"content-type", b"application/json"))
        response = _ResponseWatch(send, request_id)
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self._limited(scope, receive, response.send, headers)
            finally:
                self._finish(scope, record, response)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        """Serve the request with its body capped at ``max_body`` bytes (413 beyond)."""
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

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            response = JSONResponse(
                error_body(f"request body exceeds the limit of {self.max_body} bytes", "invalid_request_error"),
                status_code=413,
            )
            await response(scope, receive, send)

    def _finish(self, scope: Scope, record: RequestRecord, response: _ResponseWatch) -> None:
        """Count and log the request; a response that never completed counts as CLIENT_CLOSED."""
        route = scope.get("route")  # set by the router on the scope it was given
        if route is not None:
            record.endpoint = str(getattr(route, "path", "") or UNMATCHED)
        elif scope.get("path") in _route_paths(self.routes):  # refused before routing (401, 413)
            record.endpoint = scope["path"]
        status = response.status if response.completed and response.status is not None else CLIENT_CLOSED
        if self.metrics is not None:
            self.metrics.finish(record, status)
        quiet = record.endpoint in PROBE_PATHS or (record.endpoint in QUIET_PATHS and status < 400)
        (log.debug if quiet else log.info)(
            "http request",
            method=scope["method"],
            path=scope.get("path", ""),
            status=status,
            duration_ms=round(record.duration * 1000, 1),
        )


def _route_paths(routes: Sequence[Any]) -> set[str]:
    """Every route path of the app, those of included routers too (a bounded label set)."""
    paths: set[str] = set()
    for route in routes:
        if isinstance(getattr(route, "path", None), str):
            paths.add(route.path)
        nested = getattr(getattr(route, "original_router", None), "routes", None)  # FastAPI's included routers
        if nested:
            paths |= _route_paths(nested)
    return paths


class _ResponseWatch:
    """Wraps ``send``: adds the ``x-request-id`` header, notes the status and the last body part."""

    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self._request_id = request_id.encode()
        self.status: int | None = None
        self.completed = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            message.setdefault("headers", []).append((b"x-request-id", self._request_id))
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            # Noted before the await: a streamed response's last send can be cancelled
            # once the client, having read everything, hangs up.
            self.completed = True
        await self._send(message)


class _BodyTooLarge(HTTPException):
    """A body that outgrew the cap while streaming in (no Content-Length to refuse up front).

    An HTTPException, so FastAPI's body parsing passes it on (it turns other errors
    into a 400) and the error handlers answer 413 in OpenAI's shape.
    """

    def __init__(self) -> None:
        super().__init__(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes")


def create_app(
    supervisor: BackendSupervisor,
    extra_state: dict[str, Any] | None = None,
    *,
    api_keys: Sequence[str] = (),
    protect_metrics: bool = False,
    cors_origins: Sequence[str] = (),
    mesh: Any = None,
) -> FastAPI:
    """Build the app around a running supervisor (the app only reads its state).

    With ``api_keys``, ``/v1/*`` and ``/api/*`` (and ``/metrics`` with
    ``protect_metrics``) need one of them (see :mod:`localp2p.api.api_keys`).
    With ``cors_origins`` (``"*"`` for any), browsers on those origins may call the API:
    preflights are answered before the key check, and every answer (errors too) carries
    the ``Access-Control-*`` headers. Empty (the default): no CORS headers at all.
    ``mesh`` (p2p mode: a :class:`localp2p.server.forwarding.MeshService`) forwards the
    inference requests this server should not take, inside the key check.
    """
    app = FastAPI(title="localp2p", version=__version__, docs_url=None, redoc_url=None)
    app.state.supervisor = supervisor
    for key, value in (extra_state or {}).items():
        setattr(app.state, key, value)
    metrics = Metrics(app.state)
    app.state.metrics = metrics
    app.state.responses = ResponseStore()
    install_error_handlers(app)
    app.include_router(v1_router)
    app.include_router(responses_router)
    app.include_router(page_router)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        status = supervisor.status
        body = {"status": "ready" if supervisor.ready else status.state.value, "model": status.model}
        if not supervisor.ready and status.last_error:
            body["error"] = status.last_error
        return JSONResponse(body, status_code=200 if supervisor.ready else 503)

    @app.get("/api/status")
    async def api_status() -> dict[str, Any]:
        status = await supervisor.refresh_status()
        return {
            "backend": {
                "state": status.state.value,
                "ready": supervisor.ready,
                "pid": status.pid,
                "restarts": status.restarts,
                "last_error": status.last_error or None,
                "load_seconds": status.load_seconds,
                "cpu_mode": status.cpu_mode.value,
                "cpu_mode_reason": status.cpu_mode_reason or None,
                "weight_buffers_mib": status.weight_buffers,
            },
            "model": status.model,
            "models": list(supervisor.models),
            "rpc_servers": list(status.rpc_servers),
            "devices": status.devices,
            "layers": {"total": status.layers_total, "local": status.layers_local},
            "load_progress": status.load_progress.as_dict(),
            "recent_requests": metrics.recent(),
        }

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

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
                "servers": [s.as_dict() for s in mesh.directory.all()] if mesh is not None and mesh.directory is not None else [],
                "clients": mesh.describe_clients() if mesh is not None else [],
                "mesh": mesh.describe() if mesh is not None else None,
            }
        )

    if mesh is not None:
        from localp2p.server.forwarding import MeshForwarding  # noqa: PLC0415 - p2p mode only

        mesh.app = app
        app.add_middleware(MeshForwarding, mesh=mesh)  # added first: runs inside the key check
    app.add_middleware(RequireAPIKey, keys=tuple(api_keys), protect_metrics=protect_metrics)
    if cors_origins:  # outside the key check: a preflight carries no key, and a 401 needs the headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],  # Authorization, x-api-key, the openai SDK's x-stainless-* headers
            expose_headers=["x-request-id"],
            max_age=CORS_MAX_AGE,
        )
    app.add_middleware(RequestContext, metrics=metrics, routes=app.router.routes)  # outermost: sees every answer
    return app
