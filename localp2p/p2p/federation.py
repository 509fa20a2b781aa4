"""Federation: the API servers of the network, what each serves and how busy it is, and forwarding to them.

Used by the lite client (``localp2p client``) and by every ``run --p2p`` server (for the
requests it cannot take, and for delegation). :class:`ServerDirectory` turns discovery
candidates into authenticated servers and asks each one for its announcement
(:data:`~localp2p.p2p.api_stream.INFO_PROTOCOL`: models, requests waiting and running,
recent tokens/s, whether it admits us) every :data:`INFO_INTERVAL` seconds; a server that
misses :data:`MAX_MISSED` announcements in a row, or that a request could not reach, is
offline until it answers again.

**The choice rule** (:meth:`ServerDirectory.choose`): among the online servers that serve
the model (any server when the request names none) and admit us, the one with the least
load, where load = the requests it said were waiting or running at its last announcement,
minus those of ours it counted then, plus ours in flight to it now (so a burst of requests
spreads before the next announcement comes). Ties go to the server with the fewest of our
requests so far, then by peer id. A server whose queue is full (``admitted >= max_queue``)
comes last.

:func:`forward_http` sends one HTTP request to the chosen server and fails over to the next
one when a server is unreachable, refuses (429, 503, or its firewall's 403), or breaks
before the first byte of its answer. A non-streamed answer is read whole before the caller
sees anything, so it fails over at any point; a streamed one (SSE) that breaks after its
first event ends with an SSE ``error`` event and ``data: [DONE]`` (it is not continued
elsewhere: another server's continuation would not be byte-identical in general).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from localp2p.logs import get_logger

from .api_stream import ApiCallFailed, ApiReply, ApiStreamBroken, RequestHead, call, read_info
from .attendance import PeerAttendance
from .auth import AuthError, AuthGate
from .discovery import Candidate
from .links import Links
from .node import P2PNode

__all__ = [
    "FIREWALL_HEADER",
    "FORWARD_TIMEOUT",
    "INFO_INTERVAL",
    "MAX_MISSED",
    "NoServer",
    "ServerDirectory",
    "ServerEntry",
    "error_json",
    "forward_http",
    "model_of",
    "tee_candidates",
]

#: Seconds between announcements asked of each server: with MAX_MISSED, a server that
#: died is out of the choice (and of ``/v1/models`` counts) within about 5 s.
INFO_INTERVAL = 1.0
#: Seconds one announcement may take (a LAN answers in milliseconds; a busy server's event loop in less than this).
INFO_TIMEOUT = 2.0
#: Announcements missed in a row before a server is offline.
MAX_MISSED = 2
#: Seconds to connect and authenticate a newly found server.
CONNECT_TIMEOUT = 5.0
#: Seconds between attempts to reach a server that is offline (discovery announcing it again tries at once).
RETRY_INTERVAL = 2.0
#: Seconds a forwarded request may take to get its answer's head from one server: the
#: head comes when the server starts answering (after the prompt, for a non-streamed one,
#: after the whole generation), so this is generous; failover tries the next server after it.
FORWARD_TIMEOUT = 600.0
#: Statuses that mean "this server will not take it now": try another one.
REFUSAL_STATUSES = frozenset({429, 503})
#: Header a server's firewall sets on its 403, so a forwarder tells it from the app's own 403s.
FIREWALL_HEADER = "x-localp2p-refused"
ONLINE, OFFLINE, CONNECTING = "online", "offline", "connecting"

_log: Any = get_logger("federation")


class NoServer(Exception):
    """No server could take the request; ``status``, ``message`` and ``code`` say why, OpenAI-style."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class ServerEntry:
    """What this node knows about one other API server."""

    peer_id: str
    name: str = ""
    addrs: list[str] = field(default_factory=list)
    source: str = ""
    state: str = CONNECTING
    models: list[str] = field(default_factory=list)
    #: From its last announcement: requests admitted (waiting or running), running, its --max-queue.
    admitted: int = 0
    running: int = 0
    max_queue: int = 0
    tokens_per_second: float | None = None
    ready: bool = False
    #: Whether its firewall admits this node (its announcement says).
    admits_us: bool = True
    last_seen: float | None = None
    rtt_ms: float | None = None
    #: Our requests to it: in flight now, in flight at its last announcement, all so far, failed.
    in_flight: int = 0
    in_flight_at_report: int = 0
    forwarded: int = 0
    failures: int = 0

    @property
    def load(self) -> int:
        """Requests waiting or running on it by the choice rule (others' at its last report + ours now)."""
        return max(0, self.admitted - self.in_flight_at_report) + self.in_flight

    @property
    def full(self) -> bool:
        return bool(self.max_queue) and self.load >= self.max_queue

    def serves(self, model: str | None) -> bool:
        return not model or model in self.models

    def as_dict(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "name": self.name,
            "addrs": list(self.addrs),
            "source": self.source,
            "state": self.state,
            "online": self.state == ONLINE,
            "models": list(self.models),
            "ready": self.ready,
            "admitted": self.admitted,
            "running": self.running,
            "max_queue": self.max_queue,
            "tokens_per_second": self.tokens_per_second,
            "admits_us": self.admits_us,
            "last_seen": self.last_seen,
            "rtt_ms": self.rtt_ms,
            "requests_in_flight": self.in_flight,
            "requests_forwarded": self.forwarded,
            "request_failures": self.failures,
        }

    def note_info(self, info: dict[str, Any]) -> None:
        """Take an announcement in (fields of the wrong type are ignored, the rest kept)."""
        models = info.get("models")
        if isinstance(models, list):
            self.models = [m for m in models if isinstance(m, str)]
        for key in ("admitted", "running", "max_queue"):
            value = info.get(key)
            if isinstance(value, int) and value >= 0:
                setattr(self, key, value)
        tps = info.get("tokens_per_second")
        self.tokens_per_second = float(tps) if isinstance(tps, (int, float)) else None
        self.ready = info.get("ready") is True
        self.admits_us = info.get("admits_you") is not False
        self.in_flight_at_report = self.in_flight
        self.last_seen = time.time()


async def tee_candidates(receive: trio.MemoryReceiveChannel[Candidate], *sends: trio.MemorySendChannel[Candidate]) -> None:
    """Copy every discovery candidate to each of ``sends`` (a server's worker attacher and directory)."""
    async with contextlib.AsyncExitStack() as stack:
        for send in sends:
            await stack.enter_async_context(send)
        async for candidate in receive:
            for send in sends:
                await send.send(candidate)


class ServerDirectory(PeerAttendance):
    """The network's API servers as this node sees them; one task per server keeps its entry current.

    Owns the entries (read by the choice, ``/v1/models`` and ``/api/p2p``) and our
    per-server request counts. ``exclude`` (a server's own peer id) is never listed.
    """

    role = "server"

    def __init__(self, node: P2PNode, gate: AuthGate, links: Links | None = None) -> None:
        super().__init__(node)
        self.gate = gate
        self.links = links
        self._servers: dict[str, ServerEntry] = {}
        self._changed = trio.Event()

    # -- reading ----------------------------------------------------------------------------

    def all(self) -> list[ServerEntry]:
        return sorted(self._servers.values(), key=lambda s: s.peer_id)

    def online(self) -> list[ServerEntry]:
        return [s for s in self.all() if s.state == ONLINE]

    def get(self, peer_id: str) -> ServerEntry | None:
        return self._servers.get(peer_id)

    def model_counts(self) -> dict[str, int]:
        """Every model served by an online server, and how many serve it."""
        counts: dict[str, int] = {}
        for server in self.online():
            for model in server.models:
                counts[model] = counts.get(model, 0) + 1
        return counts

    def choose(self, model: str | None, exclude: set[str] | frozenset[str] = frozenset()) -> ServerEntry | None:
        """The server a request for ``model`` goes to by the rule in this module's docstring; None if none."""
        fit = [s for s in self.online() if s.serves(model) and s.admits_us and s.peer_id not in exclude]
        if not fit:
            return None
        return min(fit, key=lambda s: (s.full, s.load, s.forwarded, s.peer_id))

    async def wait_changed(self) -> None:
        """Return at the next change of any entry's state or announcement."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    @contextlib.contextmanager
    def tracking(self, server: ServerEntry) -> Iterator[Callable[[], None]]:
        """Count one request of ours to ``server``; yields the function that ends the count (idempotent)."""
        server.in_flight += 1
        server.forwarded += 1
        done = False

        def end() -> None:
            nonlocal done
            if not done:
                done = True
                server.in_flight -= 1

        try:
            yield end
        except BaseException:
            end()
            raise

    def note_failure(self, server: ServerEntry, reason: str) -> None:
        """A request could not reach ``server``: offline until its next announcement."""
        server.failures += 1
        if server.state == ONLINE:
            _log.warning("api server unreachable; offline until it answers again", peer_id=server.peer_id, reason=reason)
            server.state = OFFLINE
            self._notify()
        event = self._announced.get(server.peer_id)
        if event is not None:
            event.set()

    # -- keeping it current ------------------------------------------------------------------

    async def _attend(self, peer_id: ID, source: str, name: str | None) -> None:
        """Own one peer: connect and authenticate, then ask for announcements until it stops
        answering; then try again every RETRY_INTERVAL (or when announced). Ends for a peer
        that turns out not to be a server."""
        key = str(peer_id)
        try:
            while True:
                self._announced[key] = trio.Event()
                role = await self._connect(peer_id)
                if role == "server":
                    entry = self._servers.setdefault(key, ServerEntry(peer_id=key))
                    entry.source = entry.source or source
                    hello = self.gate.hello_of(peer_id)
                    entry.name = (hello.name if hello is not None else "") or name or key[-8:]
                    entry.addrs = [str(a) for a in self._addrs.get(key, [])]
                    await self._watch(peer_id, entry)
                elif role is not None:
                    return  # a worker, a client, a relay: not ours to watch
                with trio.move_on_after(RETRY_INTERVAL):
                    await self._announced[key].wait()
        finally:
            self._attending.discard(key)
            self._announced.pop(key, None)

    async def ensure_connected(self, peer_id: ID) -> bool:
        """Connect to ``peer_id`` and prove the token unless that is done already; whether it worked."""
        return await self._connect(peer_id) is not None

    async def _connect(self, peer_id: ID) -> str | None:
        """Connect and prove the token (unless already proven); the peer's role, or None when that failed."""
        hello = self.gate.hello_of(peer_id)
        if hello is not None and self.node.host.get_network().get_connections(peer_id):
            return hello.role
        addrs = self._addrs.get(str(peer_id), [])
        unblock = getattr(self.node.host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(peer_id)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                if self.links is not None:
                    await self.links.connect(peer_id, addrs)
                else:
                    await self.node.connect(PeerInfo(peer_id, addrs))
                hello = await self.gate.authenticate(self.node, peer_id)
        except AuthError as exc:
            _log.warning("peer refused: token proof failed", peer_id=str(peer_id), reason=str(exc))
            return None
        except Exception as exc:  # unreachable, timed out, reset ...
            _log.debug("cannot reach peer", peer_id=str(peer_id), error=f"{type(exc).__name__}: {exc}")
            return None
        return hello.role

    async def _watch(self, peer_id: ID, entry: ServerEntry) -> None:
        """Ask for announcements every INFO_INTERVAL until MAX_MISSED in a row are missing."""
        missed = 0
        while missed < MAX_MISSED:
            started = trio.current_time()
            try:
                info = await read_info(self.node, peer_id, timeout=INFO_TIMEOUT)
            except ApiCallFailed as exc:
                missed += 1
                _log.debug("announcement missed", peer_id=entry.peer_id, missed=missed, error=str(exc))
                await trio.sleep(max(0.0, INFO_INTERVAL - (trio.current_time() - started)))
                continue
            missed = 0
            entry.rtt_ms = round((trio.current_time() - started) * 1000, 2)
            was = (entry.state, entry.models, entry.admits_us)
            entry.note_info(info)
            if entry.state != ONLINE:
                _log.info("api server online", peer_id=entry.peer_id, name=entry.name, models=entry.models)
            entry.state = ONLINE
            if (entry.state, entry.models, entry.admits_us) != was:
                self._notify()
            await trio.sleep(INFO_INTERVAL)
        if entry.state != OFFLINE:
            _log.warning("api server stopped answering", peer_id=entry.peer_id, name=entry.name)
            entry.state = OFFLINE
            self._notify()


# -- forwarding ---------------------------------------------------------------------------------


def error_json(message: str, kind: str, code: str, param: str | None = None) -> bytes:
    """An OpenAI-shaped error body."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def model_of(body: bytes) -> str | None:
    """The ``model`` a JSON request body names; None when it names none or is not a JSON object
    (the server it goes to answers that with a 400 of its own)."""
    try:
        value = json.loads(body) if body else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    model = value.get("model") if isinstance(value, dict) else None
    return model if isinstance(model, str) and model else None


#: Answer headers that describe the hop: the relaying side sets its own.
_HOP = frozenset({"content-length", "transfer-encoding", "connection"})

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


async def open_reply(
    directory: ServerDirectory,
    head: RequestHead,
    body: bytes,
    model: str | None,
    *,
    only: str | None = None,
    timeout: float = FORWARD_TIMEOUT,
    connect_timeout: float | None = None,
    exclude: set[str] | None = None,
    pass_refusals: bool = True,
) -> tuple[ServerEntry, ApiReply]:
    """Send the request to the chosen server, failing over while servers are left; the server
    and its answer (a refusal, when every server refused: the last one's).

    ``only``: that peer and no other (delegation); it need not be announced yet.
    ``connect_timeout``: bound on reaching a server and sending it the request (default
    ``timeout``); ``timeout`` bounds that and the wait for the answer's head. ``exclude``:
    servers not to try. ``pass_refusals=False``: a refusal by every server raises instead.

    :raises NoServer: no server serves ``model`` (404 ``model_not_found``), none could be
        reached (503 ``no_server``), or (``pass_refusals=False``) all refused (their status,
        ``refused``).
    """
    tried: set[str] = set(exclude or ())
    last_refusal: tuple[ServerEntry, ApiReply] | None = None
    last_error = ""
    while True:
        if only is not None:
            server = directory.get(only) if only not in tried else None
            if server is None and only not in tried:
                server = ServerEntry(peer_id=only)  # not announced (yet): try it all the same
        else:
            server = directory.choose(model, exclude=tried)
        if server is None:
            if last_refusal is not None:
                if pass_refusals:
                    return last_refusal
                await last_refusal[1].aclose()
                status = last_refusal[1].status
                raise NoServer(status, f"refused by {last_refusal[0].name or last_refusal[0].peer_id} (HTTP {status})", "refused")
            if not tried and model and only is None and not any(s.serves(model) for s in directory.online()):
                served = ", ".join(sorted(directory.model_counts())) or "none"
                message = f"The model '{model}' does not exist on any server of the network (served: {served})"
                raise NoServer(404, message, "model_not_found")
            reason = f": {last_error}" if last_error else ""
            raise NoServer(503, f"no API server of the network could take the request{reason}", "no_server")
        tried.add(server.peer_id)
        with directory.tracking(server) as end:
            try:
                if only is not None:
                    with trio.fail_after(connect_timeout or timeout):
                        if not await directory.ensure_connected(ID.from_base58(only)):
                            raise ApiCallFailed("cannot connect and prove the token")
                reply = await call(
                    directory.node,
                    ID.from_base58(server.peer_id),
                    head,
                    body,
                    timeout=timeout,
                    connect_timeout=connect_timeout,
                    on_close=end,
                )
            except trio.TooSlowError:
                last_error = f"{server.name or server.peer_id}: not reached within {connect_timeout or timeout:g} s"
                directory.note_failure(server, last_error)
                end()
                continue
            except ApiCallFailed as exc:
                end()
                last_error = f"{server.name or server.peer_id}: {exc}"
                directory.note_failure(server, str(exc))
                continue
        refused = reply.status in REFUSAL_STATUSES or (reply.status == 403 and reply.header(FIREWALL_HEADER) is not None)
        if not refused:
            return server, reply
        if last_refusal is not None:
            await last_refusal[1].aclose()
        # Keep the refusal's body for the caller in case no other server takes it.
        last_refusal = server, reply
        _log.info("api server refused; trying another", peer_id=server.peer_id, status=reply.status)


async def relay_reply(
    directory: ServerDirectory,
    head: RequestHead,
    body: bytes,
    model: str | None,
    send: Send,
    *,
    only: str | None = None,
    timeout: float = FORWARD_TIMEOUT,
    connect_timeout: float | None = None,
    pass_refusals: bool = True,
) -> None:
    """Forward and answer: the whole of :func:`forward_http` but the disconnect watch."""
    tried: set[str] = set()
    while True:
        server, reply = await open_reply(
            directory,
            head,
            body,
            model,
            only=only,
            timeout=timeout,
            connect_timeout=connect_timeout,
            exclude=tried,
            pass_refusals=pass_refusals,
        )
        tried.add(server.peer_id)
        try:
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers if k.lower() not in _HOP]
            streamed = (reply.header("content-type") or "").startswith("text/event-stream")
            if not streamed:
                try:
                    data = await reply.read_all()
                except ApiStreamBroken as exc:
                    directory.note_failure(server, f"answer broke: {exc}")
                    if only is not None:
                        raise NoServer(503, f"the provider's answer broke off ({exc})", "provider_unavailable") from None
                    continue  # nothing sent yet: the next server
                headers.append((b"content-length", str(len(data)).encode()))
                await send({"type": "http.response.start", "status": reply.status, "headers": headers})
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return
            chunks = reply.chunks().__aiter__()
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                first = b""
            except ApiStreamBroken as exc:
                directory.note_failure(server, f"answer broke before its first byte: {exc}")
                if only is not None:
                    raise NoServer(503, f"the provider's answer broke off ({exc})", "provider_unavailable") from None
                continue
            await send({"type": "http.response.start", "status": reply.status, "headers": headers})
            if first:
                await send({"type": "http.response.body", "body": first, "more_body": True})
            try:
                async for chunk in chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except ApiStreamBroken as exc:
                directory.note_failure(server, f"answer broke mid-stream: {exc}")
                who = server.name or server.peer_id
                message = f"the server answering this request ({who}) went away mid-stream ({exc}); the stream ends here"
                event = json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": "server_gone"}})
                await send({"type": "http.response.body", "body": f"data: {event}\n\ndata: [DONE]\n\n".encode(), "more_body": False})
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        finally:
            await reply.aclose()


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body from ASGI ``receive``; None when the caller went away or sent more than ``limit`` bytes."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(body)


async def forward_http(
    directory: ServerDirectory,
    head: RequestHead,
    body: bytes,
    receive: Receive,
    send: Send,
    *,
    only: str | None = None,
    timeout: float = FORWARD_TIMEOUT,
    connect_timeout: float | None = None,
    pass_refusals: bool = True,
) -> None:
    """Answer one HTTP request (its ``body`` already read) from a server of the network.

    Picks the server by :meth:`ServerDirectory.choose` (``only``: that peer), fails over as
    this module's docstring says, and relays the answer through ASGI ``send``, SSE events as
    they come. A caller that goes away (``http.disconnect`` on ``receive``) cancels the
    forward, which resets the stream: the serving side stops the generation.

    :raises NoServer: nothing could take it (the caller answers with an error; nothing was sent yet).
    """
    model = model_of(body) if head.method == "POST" else None
    refused: NoServer | None = None
    async with trio.open_nursery() as nursery:

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_disconnect)
        try:
            await relay_reply(
                directory,
                head,
                body,
                model,
                send,
                only=only,
                timeout=timeout,
                connect_timeout=connect_timeout,
                pass_refusals=pass_refusals,
            )
        except NoServer as exc:  # raised bare, not in the nursery's exception group
            refused = exc
        nursery.cancel_scope.cancel()
    if refused is not None:
        raise refused
