"""A small, hardened wrapper around a py-libp2p 0.8.1 host (trio).

What this module adds on top of ``libp2p.new_host``:

* **Noise-only security, Yamux-only muxing, TCP-only transport.**  The
  default ``new_host()`` offers ``/noise``, ``/tls/1.0.0``, ``/secio/1.0.0``
  *and* ``/plaintext/2.0.0`` (and Mplex as a muxer fallback); we pass explicit
  ``sec_opt`` / ``muxer_opt`` / ``transports`` so nothing else is ever
  offered or accepted.
* **Crash-proof stream handlers.**  In py-libp2p 0.8.1 an exception escaping a
  stream handler propagates through ``SwarmConn._handle_new_streams`` into the
  swarm's service manager, which cancels the *whole swarm* and re-raises an
  ``ExceptionGroup`` out of ``host.run()``.  :meth:`P2PNode.set_handler` wraps
  every handler (and the built-in identify/ping handlers) so an exception is
  logged and the stream reset instead.
* Listen addresses that reflect the real bound ports, with ``0.0.0.0`` / ``::``
  expanded to concrete interface addresses (:mod:`localp2p.p2p.addresses`), and a
  hard error when a listen address could not be bound (py-libp2p only logs that).
* A simple "peer disconnected" callback built on the swarm notifee API.
* A clean, bounded shutdown (py-libp2p leaks its listening socket otherwise).

Everything that changes py-libp2p's own code (the Yamux fixes and inbound stream
cap, the hot path, the opt-in auto-connector, identify/push, log limits) is in
:mod:`localp2p.p2p._libp2p`; :func:`open_node` installs it, after checking
py-libp2p's version, before it builds a host. The node's key comes from
:mod:`localp2p.p2p.identity`.

Everything is trio and structured: :func:`open_node` is an async context
manager; :func:`serve_node` is the same thing shaped for ``nursery.start``.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.transport.tcp.tcp import TCP
from multiaddr import Multiaddr

from localp2p.logs import get_logger

from . import _libp2p
from ._libp2p.connmgr import HIGH_WATERMARK, LOW_WATERMARK, MIN_CONNECTIONS
from ._libp2p.yamux import ReaderNeverBlocksYamux
from .addresses import expand_addrs, ip_of, is_tcp, strip_p2p
from .streams import StreamHandler, close_or_reset, quiet_reset, remote_peer_id

_log: Any = get_logger(__name__)

__all__ = [
    "NOISE_PROTOCOL_ID",
    "YAMUX_PROTOCOL_ID",
    "P2PNode",
    "StreamHandler",
    "open_node",
    "remote_peer_id",
    "serve_node",
]


class _DisconnectNotifee(INotifee):
    """Swarm notifee that turns connection events into per-peer callbacks."""

    def __init__(self, node: P2PNode) -> None:
        self._node = node

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id
        # The swarm notifies per *connection*; only report the peer as gone
        # when its last connection closed.
        if network.get_connections(peer_id):
            return
        for callback in list(self._node._disconnect_callbacks):
            try:
                await callback(peer_id)
            except Exception:
                _log.exception("disconnect callback failed", peer_id=str(peer_id))

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None


# --------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------


class P2PNode:
    """A running libp2p host (Noise + Yamux + TCP). Create with :func:`open_node`."""

    def __init__(self, host: IHost, key_pair: KeyPair, extra_addrs: list[Multiaddr] | None = None) -> None:
        self.host = host
        self.key_pair = key_pair
        #: Announced besides the listen addresses (relay circuits): see :meth:`announce_extra`.
        self._extra_addrs = extra_addrs if extra_addrs is not None else []
        self._disconnect_callbacks: list[Callable[[ID], Awaitable[None]]] = []
        self._notifee = _DisconnectNotifee(self)
        host.get_network().register_notifee(self._notifee)

    # -- identity / addresses -------------------------------------------------

    @property
    def peer_id(self) -> ID:
        """This node's peer id (derived from its Ed25519 public key)."""
        return self.host.get_id()

    @property
    def bound_addrs(self) -> list[Multiaddr]:
        """Addresses the TCP listeners are bound to, with the real ports.

        ``0.0.0.0`` is *not* expanded here (see :attr:`listen_addrs`).
        """
        return list(self.host.get_transport_addrs())

    @property
    def listen_addrs(self) -> list[Multiaddr]:
        """Dialable listen addresses (real ports, wildcards expanded), no ``/p2p``."""
        return expand_addrs(self.bound_addrs)

    @property
    def peer_info(self) -> PeerInfo:
        """``PeerInfo(peer_id, listen_addrs)`` - what another node needs to dial us."""
        return PeerInfo(self.peer_id, self.listen_addrs)

    def announce_extra(self, addrs: Sequence[Multiaddr]) -> None:
        """Announce ``addrs`` too (identify, DHT records): where others reach us through relays."""
        self._extra_addrs[:] = list(addrs)

    @property
    def extra_addrs(self) -> list[Multiaddr]:
        """What :meth:`announce_extra` set last."""
        return list(self._extra_addrs)

    def p2p_addrs(self) -> list[Multiaddr]:
        """:attr:`listen_addrs` with ``/p2p/<peer id>`` appended."""
        suffix = Multiaddr(f"/p2p/{self.peer_id}")
        return [a.encapsulate(suffix) for a in self.listen_addrs]

    # -- connections -----------------------------------------------------------

    async def connect(self, peer_info: PeerInfo) -> None:
        """Dial ``peer_info`` (no-op if already connected).

        Addresses may carry a ``/p2p/<id>`` suffix. Raises
        ``libp2p.network.exceptions.SwarmException`` (or a subclass) if no
        address could be dialed or the security/muxer upgrade failed.
        """
        addrs = [strip_p2p(a) for a in peer_info.addrs]
        await self.host.connect(PeerInfo(peer_info.peer_id, addrs))

    async def disconnect(self, peer_id: ID) -> None:
        """Close all connections to ``peer_id``."""
        await self.host.disconnect(peer_id)

    def connected_peers(self) -> list[ID]:
        """Peers with at least one open connection."""
        return list(self.host.get_connected_peers())

    def negotiated_protocols(self, peer_id: ID) -> list[tuple[str | None, str | None]]:
        """``(security, muxer)`` protocol ids for each connection to ``peer_id``."""
        out: list[tuple[str | None, str | None]] = []
        for conn in self.host.get_network().get_connections(peer_id):
            sec = getattr(conn, "get_negotiated_security_protocol", lambda: None)()
            mux = getattr(conn, "get_negotiated_muxer_protocol", lambda: None)()
            out.append((sec, mux))
        return out

    def on_peer_disconnected(self, callback: Callable[[ID], Awaitable[None]]) -> None:
        """Call ``await callback(peer_id)`` when the last connection to a peer closes.

        Runs inside the swarm's notifee fan-out: keep it short and
        non-blocking (it delays connection cleanup). Exceptions are logged.
        """
        self._disconnect_callbacks.append(callback)

    # -- streams --------------------------------------------------------------

    async def new_stream(
        self, peer_id: ID, protocols: str | Sequence[str]
    ) -> INetStream:
        """Open a stream to ``peer_id`` speaking one of ``protocols``.

        Dials using peerstore addresses if not connected yet. The chosen
        protocol is ``stream.get_protocol()``. Always ``close()`` or
        ``reset()`` the stream when done: py-libp2p only releases its
        per-stream resource-manager/semaphore slot then.

        :raises libp2p.host.exceptions.StreamFailure: negotiation failed
            (e.g. the peer has no handler for any of ``protocols``).
        """
        if isinstance(protocols, str):
            protocols = [protocols]
        return await self.host.new_stream(peer_id, [TProtocol(p) for p in protocols])

    def set_handler(
        self,
        protocol: str,
        handler: StreamHandler,
        *,
        close_on_return: bool = True,
    ) -> None:
        """Register ``handler`` for inbound streams negotiating ``protocol``.

        The handler is wrapped: any ``Exception`` it raises is logged (with
        the remote peer id and protocol) and the stream is reset - it never
        reaches py-libp2p, where it would tear the whole host down. If the
        handler returns normally and ``close_on_return`` is true, the stream
        is closed (a no-op if the handler already closed/reset it).
        ``trio.Cancelled`` (host shutdown) is propagated untouched.

        Use :func:`remote_peer_id` inside the handler to learn who is calling.
        """
        self.host.set_stream_handler(
            TProtocol(protocol),
            _safe_handler(protocol, handler, close_on_return=close_on_return),
        )

    def remove_handler(self, protocol: str) -> None:
        """Stop accepting streams for ``protocol``."""
        self.host.remove_stream_handler(TProtocol(protocol))

    def _harden_builtin_handlers(self) -> None:
        """Wrap the handlers py-libp2p registers itself (identify, identify/push, ping...).

        identify/push is py-libp2p's no longer: :func:`~localp2p.p2p._libp2p.patch_host`
        has replaced it before this runs.
        """
        mux = self.host.get_mux()
        for protocol, handler in list(mux.handlers.items()):
            if protocol is None or handler is None:
                continue
            if getattr(handler, "_localp2p_safe", False):
                continue
            mux.add_handler(
                protocol, _safe_handler(str(protocol), handler, close_on_return=False)
            )


def _safe_handler(
    protocol: str, handler: StreamHandler, *, close_on_return: bool
) -> StreamHandler:
    """Wrap ``handler`` so exceptions are contained (see :meth:`P2PNode.set_handler`)."""
    if getattr(handler, "_localp2p_safe", False):
        return handler

    async def safe(stream: INetStream) -> None:
        try:
            await handler(stream)
        except Exception as exc:
            try:
                peer = str(remote_peer_id(stream))
            except Exception:
                peer = "?"
            _log.error(
                "stream handler raised; resetting stream",
                protocol=protocol,
                peer_id=peer,
                error=repr(exc),
                exc_info=exc,
            )
            await quiet_reset(stream)
            return
        if close_on_return:
            await close_or_reset(stream)

    safe._localp2p_safe = True  # type: ignore[attr-defined]
    safe.__name__ = f"safe_{getattr(handler, '__name__', 'handler')}"
    return safe


def _ensure_port_free(addr: Multiaddr) -> None:
    """Fail fast if a fixed TCP port is already in use by any listener.

    py-libp2p binds listeners with SO_REUSEPORT, so a second node (or any
    SO_REUSEPORT socket of the same user) on the same fixed port is *not*
    an error: the kernel silently load-balances incoming connections between
    the processes. A plain bind (SO_REUSEADDR only, so TIME_WAIT leftovers
    are fine) fails with EADDRINUSE if anything listens there.
    """
    port = int(addr.value_for_protocol("tcp"))
    if port == 0:
        return
    family, ip = ip_of(addr)
    if family is None or ip is None:
        return
    with socket.socket(socket.AF_INET if family == "ip4" else socket.AF_INET6, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((ip, port))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from exc


def _unbound_addrs(host: IHost, requested: Sequence[Multiaddr]) -> list[str]:
    """Requested listen addresses py-libp2p failed to bind.

    ``Swarm.listen`` swallows bind errors (it logs them and returns False)
    and ``BasicHost.run`` ignores the return value, so we must check.
    """
    listeners = host.get_network().listeners
    return [
        str(a)
        for a in requested
        if str(a) not in listeners or not listeners[str(a)].get_addrs()
    ]


async def _graceful_close(host: IHost, timeout: float) -> None:
    """Close listeners, connections and the swarm, shielded from cancellation.

    Needed because ``BasicHost.run()`` exits by *cancelling* the swarm
    service: the swarm's own cleanup then runs inside a cancelled scope, its
    first ``await listener.close()`` raises ``Cancelled`` and the TCP listener
    (a trio *system* task) keeps accepting on the port until ``trio.run``
    returns - and open connections are never closed gracefully.
    """
    with trio.CancelScope(shield=True):
        with trio.move_on_after(timeout) as scope:
            # Stop accepting first: Swarm.close() closes connections serially
            # (~0.2 s each, two trio.sleep(0.1) calls) before listeners.
            for listener in list(host.get_network().listeners.values()):
                with contextlib.suppress(Exception):
                    await listener.close()
            with contextlib.suppress(Exception):
                await host.close()
        if scope.cancelled_caught:
            _log.warning("libp2p node did not shut down in time", timeout=timeout)


@contextlib.asynccontextmanager
async def open_node(
    key_pair: KeyPair,
    listen_addrs: Sequence[Multiaddr | str] = ("/ip4/127.0.0.1/tcp/0",),
    *,
    negotiate_timeout: int = 10,
    auto_connect: bool = False,
    close_timeout: float = 10.0,
) -> AsyncIterator[P2PNode]:
    """Run a Noise+Yamux+TCP libp2p host for the duration of the block.

    Only ``/noise`` is offered/accepted as security protocol and only
    ``/yamux/1.0.0`` as muxer; mDNS, UPnP, QUIC, WebSocket, relay are off.
    The host's background tasks run in nurseries owned by this context
    manager (plus one trio *system* task per TCP listener, which py-libp2p
    spawns itself and cancels on close). Leaving the block - normally, by
    exception or by cancellation - closes all connections and listeners.

    :param key_pair: identity, e.g. from :func:`load_or_create_identity`.
    :param listen_addrs: TCP multiaddrs; port 0 picks a free port. A fixed
        port that is already in use raises ``OSError`` (we pre-check: py-libp2p
        binds with SO_REUSEPORT and would silently share the port with
        another node).
    :param negotiate_timeout: seconds for multistream-select on new streams.
    :param auto_connect: run py-libp2p's AutoConnector. It re-dials peers in
        the peerstore (cooldown-limited) whenever we have fewer than
        (LOW_WATERMARK + HIGH_WATERMARK) / 2 connections, so a peer we
        disconnected from - or one the DHT merely heard about - gets dialed
        again. Off by default, and then it never runs at all.
    :param close_timeout: upper bound (s) for the shielded graceful shutdown.
    :raises OSError: if any listen address could not be bound.
    :raises StartupError: if the installed py-libp2p is not the one
        :mod:`localp2p.p2p._libp2p` was written for (before anything is bound).

    Exceptions raised inside the ``async with`` body cross py-libp2p's
    nurseries and therefore surface wrapped in (nested) ``ExceptionGroup``s;
    catch them with ``except*``.
    """
    _libp2p.install()
    addrs = [a if isinstance(a, Multiaddr) else Multiaddr(a) for a in listen_addrs]
    for a in addrs:
        if not is_tcp(a):
            raise ValueError(f"only TCP listen addresses are supported: {a}")
        _ensure_port_free(a)
    extra_addrs: list[Multiaddr] = []
    noise = NoiseTransport(
        key_pair, noise_privkey=create_new_x25519_key_pair().private_key
    )
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): ReaderNeverBlocksYamux},
        transports=[TCP()],
        listen_addrs=addrs,
        negotiate_timeout=negotiate_timeout,
        # BasicHost ignores negotiate_timeout whenever the swarm has a
        # ConnectionConfig (it always does): the config's values win.
        connection_config=ConnectionConfig(
            outbound_stream_protocol_negotiation_timeout=float(negotiate_timeout),
            inbound_stream_protocol_negotiation_timeout=float(negotiate_timeout),
            # Swarm.dial_peer's happy-eyeballs loop only returns early when
            # len(connections) >= max_connections_per_peer (default 3), so
            # with the default every successful dial waits a fixed 250 ms.
            max_connections_per_peer=1,
            # go-libp2p's public-network sizes are far too many here (see MIN_CONNECTIONS).
            min_connections=MIN_CONNECTIONS,
            low_watermark=LOW_WATERMARK,
            high_watermark=HIGH_WATERMARK,
        ),
        # host.get_addrs() feeds identify, signed peer records and DHT
        # provider records; without this it advertises /ip4/0.0.0.0/...
        # Relay circuits (P2PNode.announce_extra) go out with them.
        addrs_factory=lambda candidates: [*expand_addrs(candidates), *extra_addrs],
    )
    _libp2p.patch_host(host, auto_connect=auto_connect)
    node = P2PNode(host, key_pair, extra_addrs)
    node._harden_builtin_handlers()
    unbound: list[str] = []
    async with host.run(listen_addrs=addrs):
        try:
            unbound = _unbound_addrs(host, addrs)
            if not unbound:
                _log.info(
                    "libp2p node started",
                    peer_id=str(node.peer_id),
                    addrs=[str(a) for a in node.listen_addrs],
                )
                yield node
        finally:
            _log.info("libp2p node stopping", peer_id=str(node.peer_id))
            await _graceful_close(host, close_timeout)
    if unbound:
        # raised outside host.run()'s nurseries, so it is a bare OSError
        raise OSError(f"could not listen on {', '.join(unbound)}")


async def serve_node(
    key_pair: KeyPair,
    listen_addrs: Sequence[Multiaddr | str] = ("/ip4/127.0.0.1/tcp/0",),
    *,
    negotiate_timeout: int = 10,
    auto_connect: bool = False,
    close_timeout: float = 10.0,
    task_status: trio.TaskStatus[P2PNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    """:func:`open_node` shaped for ``node = await nursery.start(serve_node, kp)``.

    Runs until the surrounding nursery is cancelled.
    """
    async with open_node(
        key_pair,
        listen_addrs,
        negotiate_timeout=negotiate_timeout,
        auto_connect=auto_connect,
        close_timeout=close_timeout,
    ) as node:
        task_status.started(node)
        await trio.sleep_forever()
