"""TCP ⇄ libp2p stream relay: how the server reaches a worker's rpc-server.

Protocol ``/localp2p/rpc-tunnel/1.0.0``::

    server (llama.cpp) ──TCP──▶ 127.0.0.1:<tunnel port>   (serve_tunnel)
                                   │ one libp2p stream per TCP connection
                                   ▼
    worker tunnel_handler: gate check ─▶ admission ─▶ TCP to 127.0.0.1:<rpc port>
                           replies 1 byte: 0 OK | 1 BUSY | 2 rpc-server unavailable
                           then, on OK, raw bytes both ways until either side closes

Security: the worker handler asks :meth:`AuthGate.require` *before reading
anything*, so nothing an unauthenticated peer sends reaches the rpc-server (or
is even parsed). Only peers whose hello says ``role: server`` may tunnel.

Admission (:class:`Admission`): llama.cpp's rpc-server serves one client at a
time and knows nothing about who uses it, so a worker belongs to one server at
a time: the first authenticated server that opens a tunnel owns it until it
disconnects or :meth:`Admission.release` is called (which also cancels its open
relays, so the rpc-server is free for the next owner). Other servers get BUSY.

Relay (:func:`relay`, shared by both sides): one task per direction, reads of
up to :data:`RELAY_CHUNK`, each write awaited before the next read
(back-pressure end to end). Both directions are drained concurrently at all
times: py-libp2p's Yamux writer gives up after 5 s on a zero window, so a
direction that stopped reading would kill the other side's writes. The
TCP -> libp2p direction may gather several reads into one frame: the caller's
``framing`` (:data:`Framing`, default :class:`PassThrough`: every read goes as
read) says where a burst ends, and the relay holds bytes until then, never longer
than its ``hold_timeout``. The framing may also hold the other direction: bytes
from the peer go on to TCP once what its ``from_peer`` returned has been awaited
(the worker's tensor gate, localp2p.worker.tensor_gate). Every frame costs both ends Python time in Noise and
Yamux; llama.cpp's connections use :class:`~localp2p.llama.burst.RpcBurstFraming`
(one frame per ggml-RPC burst, each way). An EOF in one
direction is passed on as a half-close (TCP ``shutdown(SHUT_WR)`` / Yamux FIN);
an error in either direction tears both down (stream reset, socket closed).
Writes to the libp2p stream are shielded from cancellation
(:func:`~localp2p.p2p.auth.shielded_write`): a py-libp2p write cancelled
half-way breaks the whole connection, not just this tunnel. (A read can still
be cancelled inside the small window-update write it sometimes makes; that
window is short and only teardown cancels a relay.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from localp2p.llama.rpc import parse_endpoint
from localp2p.logs import get_logger

from .auth import AuthGate, Role, shielded_write
from .node import P2PNode
from .streams import CLEANUP_TIMEOUT, StreamHandler, quiet_reset, remote_peer_id

__all__ = [
    "ADMIT_BUSY",
    "ADMIT_OK",
    "ADMIT_UNAVAILABLE",
    "REFUSED_BUSY",
    "REFUSED_PROTOCOL",
    "REFUSED_UNAVAILABLE",
    "REFUSED_UNREACHABLE",
    "RELAY_CHUNK",
    "TUNNEL_PROTOCOL",
    "Admission",
    "ConnectionFraming",
    "Framing",
    "PassThrough",
    "TunnelStats",
    "relay",
    "serve_tunnel",
    "tunnel_handler",
]

TUNNEL_PROTOCOL = "/localp2p/rpc-tunnel/1.0.0"
#: Bytes per read in the relay: large reads keep the per-chunk Python overhead
#: (Noise + Yamux framing are pure-Python-driven) small relative to the data.
RELAY_CHUNK = 256 * 1024
#: Admission replies (one byte, worker → server, before any relayed data).
ADMIT_OK = 0
ADMIT_BUSY = 1
ADMIT_UNAVAILABLE = 2
#: Seconds the server waits for a stream plus the admission byte; the worker
#: answers after one local TCP connect, so this only trips on a dead peer.
ADMISSION_TIMEOUT = 5.0
#: Seconds the worker waits to connect to its local rpc-server.
RPC_CONNECT_TIMEOUT = 2.0

#: ``TunnelStats.last_refusal`` / ``on_refused`` reasons (server side).
REFUSED_BUSY = "busy"
REFUSED_UNAVAILABLE = "rpc-server unavailable"
REFUSED_UNREACHABLE = "tunnel stream could not be opened"
REFUSED_PROTOCOL = "no valid admission reply"
_REPLY_REASONS = {ADMIT_BUSY: REFUSED_BUSY, ADMIT_UNAVAILABLE: REFUSED_UNAVAILABLE}

_log = get_logger(__name__)


@dataclass
class TunnelStats:
    """Byte and connection counters for the tunnels to (or from) one peer.

    Directions are named from the server's point of view on both sides:
    ``bytes_sent`` is server → worker, ``bytes_received`` worker → server.
    Bytes are counted once written onward. ``last_refusal`` is the reason of the
    most recent admission refusal (server side; it is not cleared by a later
    success) and ``refusals`` their number.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    connections_total: int = 0
    connections_open: int = 0
    refusals: int = 0
    last_refusal: str | None = None


class ConnectionFraming(Protocol):
    """Where one tunnelled connection's TCP -> libp2p bytes may be cut into frames, at one end.

    The relay feeds it both directions, in order. While :meth:`ends_burst` answers
    False the relay holds what it read, up to ``gather_limit`` bytes and at most
    ``hold_timeout`` seconds, and sends it in one write with the bytes that end the
    burst. Implementations own only their parse state and never raise.
    """

    #: Seconds held bytes wait for the rest of their burst before they go anyway.
    hold_timeout: float
    #: Bytes gathered at most; a read at least this big goes as read.
    gather_limit: int

    def from_peer(self, data: bytes) -> Awaitable[None] | None:
        """Note ``data`` the libp2p stream delivered; the relay awaits what this returns
        before it passes ``data`` on to TCP (None: at once)."""

    def ends_burst(self, data: bytes) -> bool:
        """Account for ``data`` read from TCP; True if it and what is held go on now."""


#: Makes one connection's framing for this end of the tunnel (``"server"`` or ``"worker"``).
Framing = Callable[[Role], ConnectionFraming]


class PassThrough:
    """The default :data:`Framing`: every read goes on as read, one frame each."""

    hold_timeout = 0.0
    gather_limit = 0

    def __init__(self, side: Role) -> None:
        del side  # the same at both ends

    def from_peer(self, data: bytes) -> Awaitable[None] | None:
        return None

    def ends_burst(self, data: bytes) -> bool:
        return True


# --------------------------------------------------------------------------
# the relay (both sides)
# --------------------------------------------------------------------------


async def relay(
    tcp_stream: trio.SocketStream,
    p2p_stream: INetStream,
    stats: TunnelStats,
    *,
    side: Role = "server",
    framing: Framing = PassThrough,
) -> None:
    """Copy bytes both ways between ``tcp_stream`` and ``p2p_stream`` until both end.

    Owns both streams: they are closed (or, after an error or cancellation, the
    libp2p stream is reset and the socket closed) before this returns. ``side``
    says which end of the tunnel we are, so ``stats`` counts the right direction;
    ``framing(side)`` decides how TCP reads are gathered into frames. Never raises
    for I/O errors (they end the relay and are logged at debug level);
    ``trio.Cancelled`` propagates after the cleanup.
    """
    count_up, count_down = (
        ("bytes_sent", "bytes_received") if side == "server" else ("bytes_received", "bytes_sent")
    )
    stats.connections_total += 1
    stats.connections_open += 1
    failed: list[str] = []
    frames = framing(side)

    async def pass_on(data: bytes | bytearray) -> None:
        await shielded_write(p2p_stream, bytes(data))  # never cancelled half-way
        setattr(stats, count_up, getattr(stats, count_up) + len(data))

    async def tcp_to_p2p(cancel: trio.CancelScope) -> None:
        held = bytearray()  # the start of a burst, waiting for the bytes that end it
        try:
            while True:
                if held:
                    data = None
                    with trio.move_on_after(frames.hold_timeout):  # receive_some is cancel-safe
                        data = await tcp_stream.receive_some(RELAY_CHUNK)
                    if data is None:  # the burst stopped half-way: pass on what there is
                        await pass_on(held)
                        held.clear()
                        continue
                else:
                    data = await tcp_stream.receive_some(RELAY_CHUNK)
                if not data:
                    break
                ends_burst = frames.ends_burst(data)
                if not held and (ends_burst or len(data) >= frames.gather_limit):
                    await pass_on(data)
                    continue
                held += data
                if ends_burst or len(held) >= frames.gather_limit:
                    await pass_on(held)
                    held.clear()
            if held:
                await pass_on(held)
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT):
                await p2p_stream.close_write()  # type: ignore[attr-defined]  # a FIN frame: also a write (NetStream has it; INetStream does not say so)
        except Exception as exc:  # Broken/ClosedResourceError, StreamReset/Closed/Error
            failed.append(f"tcp->p2p: {type(exc).__name__}: {exc}")
            cancel.cancel()

    async def p2p_to_tcp(cancel: trio.CancelScope) -> None:
        try:
            while True:
                try:
                    data = await p2p_stream.read(RELAY_CHUNK)
                except StreamEOF:
                    break
                if not data:
                    break
                hold = frames.from_peer(data)
                if hold is not None:  # e.g. a tensor the rpc-server is asked for is still being placed
                    await hold
                await tcp_stream.send_all(data)
                setattr(stats, count_down, getattr(stats, count_down) + len(data))
            await tcp_stream.send_eof()
        except Exception as exc:
            failed.append(f"p2p->tcp: {type(exc).__name__}: {exc}")
            cancel.cancel()

    clean = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tcp_to_p2p, nursery.cancel_scope)
            nursery.start_soon(p2p_to_tcp, nursery.cancel_scope)
        clean = not failed
    finally:
        stats.connections_open -= 1
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            try:
                if clean:
                    await p2p_stream.close()
                else:
                    await p2p_stream.reset()
            except Exception:
                with contextlib.suppress(Exception):
                    await p2p_stream.reset()
            with contextlib.suppress(Exception):
                await tcp_stream.aclose()
        if failed:
            _log.debug("tunnel relay ended with an error", side=side, error=failed[0])


# --------------------------------------------------------------------------
# server side
# --------------------------------------------------------------------------


async def serve_tunnel(
    node: P2PNode,
    peer_id: ID,
    stats: TunnelStats,
    *,
    host: str = "127.0.0.1",
    on_refused: Callable[[str], Any] | None = None,
    framing: Framing = PassThrough,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host``:<free port> and tunnel each connection to ``peer_id``'s rpc-server.

    ``task_status.started(port)`` once listening. Every accepted TCP connection
    gets its own :data:`TUNNEL_PROTOCOL` stream; when the worker refuses
    (BUSY, rpc-server unavailable) or cannot be reached, the TCP connection is
    closed, ``stats.last_refusal`` set to one of the ``REFUSED_*`` reasons and
    ``on_refused(reason)`` called (synchronously; keep it short). The listener
    keeps serving. Runs until cancelled; owns the listener and all relays, which
    are closed on exit. The peer should already be authenticated (the worker
    refuses the stream otherwise, reported as :data:`REFUSED_UNREACHABLE`).
    ``framing`` gathers the relays' frames (see :func:`relay`).

    :raises OSError: if the listener cannot be opened (before ``started``).
    """
    listeners = await trio.open_tcp_listeners(0, host=host)
    port = int(listeners[0].socket.getsockname()[1])

    def refused(reason: str, detail: str = "") -> None:
        stats.refusals += 1
        stats.last_refusal = reason
        _log.info("tunnel refused", peer_id=str(peer_id), reason=reason, detail=detail or None, port=port)
        if on_refused is not None:
            try:
                on_refused(reason)
            except Exception:
                _log.exception("tunnel on_refused callback failed", peer_id=str(peer_id))

    async def handle(tcp_stream: trio.SocketStream) -> None:
        stream, reason, detail = await _open_tunnel(node, peer_id)
        if stream is None:
            refused(reason, detail)  # before closing: whoever sees the close sees the reason
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(tcp_stream)
            return
        await relay(tcp_stream, stream, stats, side="server", framing=framing)

    _log.info("tunnel listening", peer_id=str(peer_id), endpoint=f"{host}:{port}")
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(port)
            await trio.serve_listeners(handle, listeners, handler_nursery=nursery)
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                with contextlib.suppress(Exception):
                    await listener.aclose()


async def _open_tunnel(node: P2PNode, peer_id: ID) -> tuple[INetStream | None, str, str]:
    """Open a tunnel stream to ``peer_id`` and read its admission byte.

    Returns ``(stream, "", "")`` when admitted (the caller owns the stream), else
    ``(None, reason, detail)`` with the stream already reset. Bounded by
    :data:`ADMISSION_TIMEOUT`; on cancellation the stream is reset too.
    """
    stream: INetStream | None = None
    reply, detail = b"", ""
    try:
        with trio.fail_after(ADMISSION_TIMEOUT):
            try:
                stream = await node.new_stream(peer_id, TUNNEL_PROTOCOL)
            except Exception as exc:  # StreamFailure (refused/reset), SwarmException...
                return None, REFUSED_UNREACHABLE, f"{type(exc).__name__}: {exc}"
            try:
                reply = await stream.read(1)
            except Exception as exc:  # StreamEOF / StreamReset before any reply
                detail = type(exc).__name__
    except trio.TooSlowError:
        detail = "timed out"
    except BaseException:
        if stream is not None:
            await quiet_reset(stream)
        raise
    if reply and reply[0] == ADMIT_OK:
        return stream, "", ""
    if stream is not None:
        await quiet_reset(stream)
    if not reply:
        return None, REFUSED_PROTOCOL, detail
    return None, _REPLY_REASONS.get(reply[0], REFUSED_PROTOCOL), f"reply byte {reply[0]}"


# --------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------


class Admission:
    """Which server owns this worker (one at a time) and its tunnels' counters.

    Owns: the current owner, the cancel scopes of the owner's open relays, and
    per-server :class:`TunnelStats` (``stats[peer_id]``). Call :meth:`install`
    so that an owner is released when its last connection closes.
    """

    def __init__(self) -> None:
        self._owner: ID | None = None
        self._scopes: dict[ID, set[trio.CancelScope]] = {}
        #: counters per server peer (server-centric directions, see TunnelStats)
        self.stats: dict[ID, TunnelStats] = {}

    def install(self, node: P2PNode) -> None:
        """Release the owner when it disconnects from ``node``."""
        node.on_peer_disconnected(self._on_disconnected)

    async def _on_disconnected(self, peer_id: ID) -> None:
        self.release(peer_id)

    @property
    def owner(self) -> ID | None:
        """The server peer that owns this worker, or None."""
        return self._owner

    def try_acquire(self, peer_id: ID) -> bool:
        """True if ``peer_id`` owns the worker now (taking it if free)."""
        if self._owner is None:
            self._owner = peer_id
            _log.info("worker now serves", server=str(peer_id))
        return self._owner == peer_id

    def release(self, peer_id: ID) -> None:
        """Drop ``peer_id``'s ownership (no-op if it is not the owner); cancel its relays."""
        if self._owner != peer_id:
            return
        self._owner = None
        for scope in self._scopes.pop(peer_id, set()):
            scope.cancel()
        _log.info("worker released", server=str(peer_id))

    def stats_for(self, peer_id: ID) -> TunnelStats:
        """The counters for tunnels from ``peer_id`` (created on first use)."""
        return self.stats.setdefault(peer_id, TunnelStats())

    @contextlib.contextmanager
    def _owned(self, peer_id: ID) -> Iterator[trio.CancelScope]:
        """A cancel scope that :meth:`release` cancels; cancelled at once if not owner."""
        scope = trio.CancelScope()
        scopes = self._scopes.setdefault(peer_id, set())
        scopes.add(scope)
        try:
            with scope:
                if self._owner != peer_id:
                    scope.cancel()
                yield scope
        finally:
            scopes.discard(scope)
            if not scopes and self._scopes.get(peer_id) is scopes:
                del self._scopes[peer_id]


async def _reply_and_close(stream: INetStream, code: int) -> None:
    """Send a one-byte refusal and close the stream; shielded, bounded, errors ignored."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
        try:
            await stream.write(bytes([code]))
            await stream.close()
        except Exception:
            with contextlib.suppress(Exception):
                await stream.reset()


def tunnel_handler(
    gate: AuthGate, rpc_endpoint: str, admission: Admission, *, framing: Framing = PassThrough
) -> StreamHandler:
    """The worker's :data:`TUNNEL_PROTOCOL` handler, for ``node.set_handler``.

    Per stream: refuse (reset) unless the peer is an authenticated server -
    checked before anything is read; reply BUSY if another server owns the
    worker; connect to ``rpc_endpoint`` (``127.0.0.1:port``) and reply
    UNAVAILABLE if that fails; else reply OK and :func:`relay` until either side
    closes (gathering frames by ``framing``, see :func:`relay`), counting bytes in
    ``admission.stats_for(peer)``. Handles its own
    errors; never raises except ``Cancelled``.

    :raises ValueError: (now, not per stream) if ``rpc_endpoint`` is not host:port.
    """
    rpc_host, rpc_port = parse_endpoint(rpc_endpoint)

    async def handle_tunnel(stream: INetStream) -> None:
        if not await gate.require(stream, role="server"):
            return
        peer_id = remote_peer_id(stream)
        if not admission.try_acquire(peer_id):
            _log.info("tunnel refused: busy", server=str(peer_id), owner=str(admission.owner))
            await _reply_and_close(stream, ADMIT_BUSY)
            return
        with admission._owned(peer_id):
            try:
                with trio.fail_after(RPC_CONNECT_TIMEOUT):
                    tcp_stream = await trio.open_tcp_stream(rpc_host, rpc_port)
            except (OSError, trio.TooSlowError) as exc:
                _log.warning("rpc-server unavailable for tunnel", endpoint=rpc_endpoint, error=str(exc) or "timeout")
                await _reply_and_close(stream, ADMIT_UNAVAILABLE)
                return
            try:
                await shielded_write(stream, bytes([ADMIT_OK]), CLEANUP_TIMEOUT)
            except Exception as exc:  # the server went away meanwhile
                _log.debug("tunnel stream failed before relaying", server=str(peer_id), error=repr(exc))
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(tcp_stream)
                await quiet_reset(stream)
                return
            await relay(tcp_stream, stream, admission.stats_for(peer_id), side="worker", framing=framing)

    return handle_tunnel
