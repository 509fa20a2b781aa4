"""The lite client's HTTP app: the OpenAI routes, each request forwarded to a server of the network.

Plain ASGI (no framework): ``GET /v1/models`` (and ``/v1/models/{id}``) is answered here from
the :class:`~localp2p.p2p.federation.ServerDirectory` (the union of the servers' models,
each with ``servers``: how many serve it); every other ``/v1/*`` request goes to a server by
:func:`~localp2p.p2p.federation.forward_http` (choice, failover, SSE as it comes, the
caller's ``Authorization`` / ``x-api-key`` headers passed through: a server with
``--api-key`` checks them). ``/healthz``, ``/readyz`` (503 until a server is online) and
``/api/p2p`` (this node and the servers, with our request counts) are the client's own.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from localp2p.logs import get_logger
from localp2p.p2p.api_stream import MAX_BODY, METHODS, RequestHead
from localp2p.p2p.federation import NoServer, ServerDirectory, error_json, forward_http, read_body
from localp2p.p2p.network import Network

log = get_logger("client")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def _json(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _model_card(name: str, servers: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "localp2p", "servers": servers}


class ClientApp:
    """The ASGI app of ``localp2p client``; reads the directory, owns nothing."""

    def __init__(self, directory: ServerDirectory, network: Network) -> None:
        self.directory = directory
        self.network = network

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/healthz":
            await _json(send, 200, b'{"status":"ok"}')
        elif path == "/readyz":
            ready = bool(self.directory.online())
            await _json(send, 200 if ready else 503, json.dumps({"status": "ready" if ready else "no_server"}).encode())
        elif path == "/api/p2p":
            await _json(send, 200, json.dumps(self.describe()).encode())
        elif path == "/v1/models" and method == "GET":
            counts = self.directory.model_counts()
            data = [_model_card(name, n) for name, n in sorted(counts.items())]
            await _json(send, 200, json.dumps({"object": "list", "data": data}).encode())
        elif path.startswith("/v1/models/") and method == "GET":
            name = path[len("/v1/models/") :]
            counts = self.directory.model_counts()
            if name in counts:
                await _json(send, 200, json.dumps(_model_card(name, counts[name])).encode())
            else:
                missing = f"The model '{name}' does not exist on any server of the network"
                await _json(send, 404, error_json(missing, "invalid_request_error", "model_not_found", "model"))
        elif path.startswith("/v1/"):
            try:
                await self._forward(scope, receive, send)
            except Exception:
                log.exception("forwarding failed", path=path)
                raise
        else:
            await _json(send, 404, error_json(f"no route {path}", "invalid_request_error", "not_found"))

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in METHODS:
            await _json(send, 405, error_json(f"method {scope['method']} is not allowed", "invalid_request_error", "method_not_allowed"))
            return
        body = await read_body(receive, MAX_BODY)
        if body is None:
            message = f"request body exceeds the limit of {MAX_BODY} bytes"
            await _json(send, 413, error_json(message, "invalid_request_error", "body_too_large"))
            return
        try:
            await forward_http(self.directory, RequestHead.from_scope(scope), body, receive, send)
        except NoServer as exc:
            kind = "invalid_request_error" if exc.status == 404 else "server_error"
            param = "model" if exc.code == "model_not_found" else None
            await _json(send, exc.status, error_json(exc.message, kind, exc.code, param))

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.network.describe(),
            "role": "client",
            "network_id": self.network.settings.token.network_id,
            "servers": [s.as_dict() for s in self.directory.all()],
            "models": self.directory.model_counts(),
            "workers": [],
            "clients": [],
        }
