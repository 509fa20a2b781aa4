"""A server's part of the mesh API: serving its HTTP API to peers, and forwarding what it cannot take.

* **Serving peers.** :meth:`MeshService.install` registers two libp2p protocols on the node:
  :data:`~localp2p.p2p.api_stream.API_PROTOCOL` (one HTTP request per stream, run through
  this server's own HTTP app: API keys, validation, metrics and the admission gate hold as
  for a local caller) and :data:`~localp2p.p2p.api_stream.INFO_PROTOCOL` (this server's
  announcement: models, load, whether it admits the asker). Both first ask the
  :class:`~localp2p.p2p.auth.AuthGate` (nothing of an unauthenticated peer is read), then the
  :class:`PeerFirewall` (``--allow-peer`` / ``--deny-peer``): a refused peer gets a 403 in
  OpenAI's shape before anything it sent is read.
* **Forwarding.** :class:`MeshForwarding` (ASGI middleware, inside the API-key check) sends a
  local caller's inference request to another server of the network when this one lacks the
  model or its queue is full (by :mod:`localp2p.p2p.federation`'s choice rule), and every
  inference request to the ``--delegate-to`` provider when one is set (:class:`Delegation`).
  A request that came over the network is never forwarded again (no loops).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from libp2p.abc import INetStream

from localp2p.logs import get_logger
from localp2p.p2p.api_stream import API_PROTOCOL, INFO_PROTOCOL, MAX_BODY, RequestHead, frame, serve_asgi, write_info
from localp2p.p2p.auth import AuthGate, shielded_write
from localp2p.p2p.federation import FIREWALL_HEADER, NoServer, ServerDirectory, error_json, forward_http, model_of, read_body
from localp2p.p2p.node import P2PNode
from localp2p.p2p.streams import close_or_reset, quiet_reset, remote_peer_id
from localp2p.server.supervisor import BackendSupervisor

log = get_logger("mesh")

#: Default of --delegate-timeout (s): reaching the provider and handing it the request; a LAN
#: takes milliseconds, a relayed path a second or two.
DEFAULT_DELEGATE_TIMEOUT = 10.0
#: Recent requests whose tokens/s are averaged in the announcement.
ANNOUNCED_TPS_OF = 5
#: ASGI scope key naming the peer a request came from over the network.
PEER_SCOPE_KEY = "localp2p.peer"
#: Roles whose peers may use the API over the network.
API_ROLES = ("client", "server")
#: Inference routes: what forwarding and delegation carry (everything else is this server's own).
FORWARDED_PREFIX = "/v1/"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class PeerFirewall:
    """Which authenticated peers may use this server's API over the network.

    ``deny`` always wins; a non-empty ``allow`` admits only its peers; both empty: everyone
    who proved the token.
    """

    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()

    def admits(self, peer_id: str) -> bool:
        if peer_id in self.deny:
            return False
        return not self.allow or peer_id in self.allow

    def describe(self) -> dict[str, Any]:
        return {"allow": sorted(self.allow), "deny": sorted(self.deny)}


@dataclass(frozen=True)
class Delegation:
    """``--delegate-to``: every inference request goes to ``provider`` (a peer id).

    ``timeout``: seconds to reach it and hand it the request; ``fallback_to_local``: serve
    here when it cannot be reached, refuses, or passes the timeout (else: 503, or its 403).
    """

    provider: str
    timeout: float = DEFAULT_DELEGATE_TIMEOUT
    fallback_to_local: bool = False


@dataclass
class PeerUse:
    """Requests one peer sent us over the network."""

    served: int = 0
    in_flight: int = 0
    refused: int = 0


@dataclass
class MeshService:
    """Owns this server's mesh state: the directory of other servers (once the network runs),
    the firewall, delegation, and the count of requests each peer sent us."""

    supervisor: BackendSupervisor
    firewall: PeerFirewall = field(default_factory=PeerFirewall)
    delegation: Delegation | None = None
    app: Any = None
    gate: AuthGate | None = None
    directory: ServerDirectory | None = None
    peers: dict[str, PeerUse] = field(default_factory=dict)
    #: Requests this server sent elsewhere (it lacked the model, its queue was full, delegation).
    forwarded: int = 0
    fallbacks: int = 0

    # -- serving peers ------------------------------------------------------------------------

    def install(self, node: P2PNode, gate: AuthGate) -> None:
        """Register the API and announcement handlers (before discovery starts)."""
        self.gate = gate
        node.set_handler(API_PROTOCOL, self._handle_api, close_on_return=False)
        node.set_handler(INFO_PROTOCOL, self._handle_info)

    async def _admitted(self, stream: INetStream) -> str | None:
        """The caller's peer id when it proved the token and has an API role; else the stream is reset."""
        assert self.gate is not None
        if not await self.gate.require(stream):
            return None
        peer = remote_peer_id(stream)
        hello = self.gate.hello_of(peer)
        if hello is None or hello.role not in API_ROLES:
            await quiet_reset(stream)
            return None
        return str(peer)

    async def _handle_info(self, stream: INetStream) -> None:
        peer = await self._admitted(stream)
        if peer is not None:
            await write_info(stream, self.announcement(peer))

    def announcement(self, peer: str | None = None) -> dict[str, Any]:
        """What this server tells others about itself (see localp2p.p2p.federation.ServerEntry.note_info)."""
        recent = [r["tokens_per_second"] for r in self.app.state.metrics.recent()[:ANNOUNCED_TPS_OF] if r.get("tokens_per_second")]
        return {
            "models": list(self.supervisor.models),
            "ready": self.supervisor.ready,
            "admitted": self.supervisor.admitted,
            "running": self.supervisor.admission.in_flight,
            "max_queue": self.supervisor.max_queue,
            "tokens_per_second": round(statistics.fmean(recent), 2) if recent else None,
            "admits_you": True if peer is None else self.firewall.admits(peer),
        }

    async def _handle_api(self, stream: INetStream) -> None:
        peer = await self._admitted(stream)
        if peer is None:
            return
        use = self.peers.setdefault(peer, PeerUse())
        if not self.firewall.admits(peer):
            use.refused += 1
            log.info("api request refused by the firewall", peer_id=peer)
            await _refuse(stream, peer)
            return
        use.served += 1
        use.in_flight += 1
        try:
            await serve_asgi(stream, self.app, {PEER_SCOPE_KEY: peer})
        finally:
            use.in_flight -= 1

    def describe_clients(self) -> list[dict[str, Any]]:
        """Peers that used (or may use) this server's API: authenticated clients and servers, with counts."""
        hellos = {str(h.peer_id): h for h in (self.gate.authenticated_peers() if self.gate is not None else [])}
        listed = []
        for peer in sorted(set(self.peers) | {p for p, h in hellos.items() if h.role == "client"}):
            hello = hellos.get(peer)
            use = self.peers.get(peer, PeerUse())
            listed.append(
                {
                    "peer_id": peer,
                    "role": hello.role if hello is not None else None,
                    "name": hello.name if hello is not None else "",
                    "connected": hello is not None,
                    "admitted": self.firewall.admits(peer),
                    "requests_served": use.served,
                    "requests_in_flight": use.in_flight,
                    "requests_refused": use.refused,
                }
            )
        return listed

    def describe(self) -> dict[str, Any]:
        return {
            "announcement": self.announcement(),
            "firewall": self.firewall.describe(),
            "delegate_to": self.delegation.provider if self.delegation is not None else None,
            "requests_forwarded": self.forwarded,
            "delegation_fallbacks": self.fallbacks,
        }


async def _refuse(stream: INetStream, peer: str) -> None:
    """Answer 403 in OpenAI's shape without reading the request, then close."""
    body = error_json(
        f"this server's firewall does not admit peer {peer} (--allow-peer / --deny-peer)", "permission_error", "peer_not_allowed"
    )
    head = {"status": 403, "headers": [["content-type", "application/json"], [FIREWALL_HEADER, "firewall"]]}
    try:
        await shielded_write(stream, frame(json.dumps(head).encode()) + frame(body) + frame(b""))
    except Exception:
        await quiet_reset(stream)
        return
    await close_or_reset(stream)


# -- forwarding local callers' requests ---------------------------------------------------------


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that gives ``body`` first (already read), then passes on (disconnects)."""
    given = False

    async def replayed() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _answer_error(send: Send, status: int, message: str, code: str) -> None:
    data = error_json(message, "server_error" if status >= 500 else "invalid_request_error", code)
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


class MeshForwarding:
    """ASGI middleware: forward a local caller's inference request when this server should not
    take it (see the module docstring). Passes everything else to ``app`` untouched."""

    def __init__(self, app: Any, mesh: MeshService) -> None:
        self.app = app
        self.mesh = mesh

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        mesh = self.mesh
        if (
            scope["type"] != "http"
            or mesh.directory is None
            or scope.get(PEER_SCOPE_KEY)
            or scope["method"] != "POST"
            or not scope["path"].startswith(FORWARDED_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive, MAX_BODY)
        if body is None:
            return  # the caller went away (a body too large raised in the size cap outside)
        head = RequestHead.from_scope(scope)
        if mesh.delegation is not None:
            await self._delegate(mesh.delegation, head, body, scope, receive, send)
            return
        model = model_of(body)
        supervisor = mesh.supervisor
        lacks = model is not None and model not in supervisor.models
        full = bool(supervisor.max_queue) and supervisor.admitted >= supervisor.max_queue
        target = model or next(iter(supervisor.models))
        if (lacks or full) and mesh.directory.choose(target) is not None:
            mesh.forwarded += 1
            log.info("forwarding a request", reason="model not here" if lacks else "queue full", model=target)
            try:
                await forward_http(mesh.directory, head, body, receive, send)
                return
            except NoServer as exc:
                log.info("no other server took it; answering here", reason=exc.message)
        await self.app(scope, _replay(body, receive), send)

    async def _delegate(self, delegation: Delegation, head: RequestHead, body: bytes, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the request to the provider; on failure fall back to local or answer 503.

        ``receive`` is the caller's, past the body (already read): forwarding watches it for
        a disconnect; the local app gets the body replayed first."""
        mesh = self.mesh
        assert mesh.directory is not None
        mesh.forwarded += 1
        try:
            await forward_http(
                mesh.directory,
                head,
                body,
                receive,
                send,
                only=delegation.provider,
                connect_timeout=delegation.timeout,
                pass_refusals=not delegation.fallback_to_local,
            )
            return
        except NoServer as exc:
            reason = exc.message
        if delegation.fallback_to_local:
            mesh.fallbacks += 1
            log.warning(
                "provider did not take the request; serving it here (--fallback-to-local)", provider=delegation.provider, reason=reason
            )
            await self.app(scope, _replay(body, receive), send)
            return
        log.warning("provider did not take the request", provider=delegation.provider, reason=reason)
        await _answer_error(
            send,
            503,
            f"the provider {delegation.provider} (--delegate-to) could not take the request: {reason}",
            "provider_unavailable",
        )
