"""Circuit Relay v2 for token holders: relay service, reservations, relayed dials.

py-libp2p 0.8.1 has Circuit Relay v2 (``libp2p.relay.circuit_v2``) but ``new_host()``
wires none of it, and its swarm skips ``/p2p-circuit`` addresses on ``connect()``.
This module wires it for localp2p:

* **Relay service** (``--p2p-relay``, :class:`RelayLimits`): the hop protocol, answered
  only for peers that proved the network token to this node (:meth:`AuthGate.require`
  before py-libp2p reads a byte). A relay is not trusted with the token's rights: it
  forwards a Noise session it cannot read, and server and worker prove the token to
  each other again, end to end, over the relayed connection.
* **Every node** runs the stop side (accepting relayed connections, only from relays it
  proved the token to) once it knows a relay.
* :class:`RelayClient` keeps reservations (an unreachable node is reachable through them)
  and dials a peer through a relay.

Relayed connections are Noise + Yamux over one relay stream, so the relay sees only
ciphertext. See notes/libp2p.md, "Relays and hole punching".
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from libp2p.abc import INetStream, IRawConnection
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as STOP_PROTOCOL
from libp2p.relay.circuit_v2.resources import RelayLimits as Libp2pRelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from localp2p.logs import get_logger

from ._libp2p.relay_circuits import CircuitSafeRelayProtocol
from .auth import AuthGate
from .node import P2PNode

__all__ = [
    "HOP_PROTOCOL",
    "STOP_PROTOCOL",
    "RelayClient",
    "RelayLimits",
    "circuit_addr",
    "is_circuit",
    "relay_of",
]

_log = get_logger(__name__)

#: What "no byte limit" is told to py-libp2p: its per-reservation accounting reads 0 as "nothing".
_NO_BYTE_LIMIT = 2**62
#: Seconds a reservation or a relayed dial may take (one round trip to the relay and one on to the peer).
RELAY_OP_TIMEOUT = 10.0
#: Seconds closing a failed relayed dial's circuit may take (one stream close to the relay).
RELAY_CLOSE_TIMEOUT = 2.0


@dataclass(frozen=True)
class RelayLimits:
    """What a relay (``--p2p-relay``) grants; 0 means no limit for the circuit ones.

    A tunnel through a relay lives as long as the worker is attached and carries model
    weights on every load, so circuits are not cut by time or bytes unless asked for.
    """

    #: Peers holding a reservation at once.
    max_reservations: int = 32
    #: Relayed connections to one reserved peer at once (a server needs one per worker).
    max_circuits: int = 8
    #: Seconds one relayed connection may last (0: as long as both ends want).
    circuit_seconds: int = 0
    #: Bytes one relayed connection may carry, both ways together (0: no limit).
    circuit_bytes: int = 0
    #: Seconds a reservation lasts before the peer must renew it (peers renew well before).
    reservation_ttl: int = 3600

    def for_libp2p(self) -> Libp2pRelayLimits:
        return Libp2pRelayLimits(
            duration=self.circuit_seconds,
            data=self.circuit_bytes or _NO_BYTE_LIMIT,
            max_circuit_conns=self.max_circuits,
            max_reservations=self.max_reservations,
            reservation_ttl=self.reservation_ttl,
        )


def is_circuit(addr: Multiaddr | str) -> bool:
    """True for a ``/p2p-circuit`` (relayed) address."""
    return "/p2p-circuit" in str(addr)


def circuit_addr(relay_addr: Multiaddr, relay_id: ID, peer_id: ID | None = None) -> Multiaddr:
    """``<relay addr>/p2p/<relay>/p2p-circuit[/p2p/<peer>]``."""
    text = f"{relay_addr}/p2p/{relay_id}/p2p-circuit"
    return Multiaddr(text + (f"/p2p/{peer_id}" if peer_id is not None else ""))


def relay_of(addr: Multiaddr | str) -> str | None:
    """The relay's peer id in a circuit address (the ``/p2p`` just before ``/p2p-circuit``)."""
    head = str(addr).split("/p2p-circuit", 1)
    if len(head) != 2 or "/p2p/" not in head[0]:
        return None
    return head[0].rsplit("/p2p/", 1)[1].split("/", 1)[0] or None


def _circuit_target(relay_id: ID, peer_id: ID) -> Multiaddr:
    """``/p2p/<relay>/p2p-circuit/p2p/<peer>``: what a relayed dial asks for, and the connection's address."""
    return Multiaddr(f"/p2p/{relay_id}/p2p-circuit/p2p/{peer_id}")


def gated(gate: AuthGate, handler: Callable[[INetStream], Awaitable[None]]) -> Callable[[INetStream], Awaitable[None]]:
    """``handler`` behind the token check: a peer that has not proved the token is reset unread."""

    async def handle(stream: INetStream) -> None:
        if await gate.require(stream):
            await handler(stream)

    handle.__name__ = f"gated_{getattr(handler, '__name__', 'handler')}"
    return handle


class RelayClient:
    """Circuit Relay v2 on one node: stop side always, hop side with ``limits`` (``--p2p-relay``).

    Owns the py-libp2p ``CircuitV2Protocol`` (our circuit-safe subclass; run in the caller's nursery by :meth:`run`),
    a ``CircuitV2Transport`` used for reservations and relayed dials, and the set of
    reservations this node holds (:attr:`reserved`: relay id -> the relay's addresses).
    """

    def __init__(self, node: P2PNode, gate: AuthGate, limits: RelayLimits | None) -> None:
        self.node = node
        self.gate = gate
        self.limits = limits
        self.reserved: dict[ID, list[Multiaddr]] = {}
        self._protocol = CircuitSafeRelayProtocol(
            node.host, (limits or RelayLimits()).for_libp2p(), allow_hop=limits is not None
        )
        # STOP only: relayed dials must not reserve on the way (RelayRole.CLIENT would).
        self._transport = CircuitV2Transport(node.host, self._protocol, RelayConfig(roles=RelayRole.STOP))
        self._nursery: trio.Nursery | None = None

    @property
    def serves(self) -> bool:
        """Whether this node relays for others (``--p2p-relay``)."""
        return self.limits is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the relay protocol until cancelled: hop (if serving) and stop, both token-gated."""
        async with background_trio_service(self._protocol), trio.open_nursery() as nursery:
            await self._protocol.event_started.wait()
            # py-libp2p registered its raw handlers; put ours (guarded, gated) over them.
            if self.serves:
                self.node.set_handler(HOP_PROTOCOL, gated(self.gate, self._protocol._handle_hop_stream), close_on_return=False)
            self.node.set_handler(STOP_PROTOCOL, gated(self.gate, self._protocol._handle_stop_stream), close_on_return=False)
            self._nursery = nursery
            if self.serves:
                _log.info("relay service on", limits=str(self.limits))
            task_status.started()
            await trio.sleep_forever()

    async def ensure_authenticated(self, relay_id: ID, addrs: list[Multiaddr]) -> None:
        """Connect to ``relay_id`` and prove the token to it (a relay serves token holders only).

        :raises Exception: unreachable, or the token proof failed (``AuthError``).
        """
        if not self.node.host.get_network().get_connections(relay_id):
            await self.node.connect(PeerInfo(relay_id, addrs))
        if not self.gate.is_authenticated(relay_id):
            await self.gate.authenticate(self.node, relay_id)

    async def reserve(self, relay_id: ID, addrs: list[Multiaddr]) -> bool:
        """Hold a reservation on ``relay_id`` (renewed by py-libp2p before it expires).

        True when the relay granted it; False when it refused (limits, not a relay for us).
        Raises what :meth:`ensure_authenticated` raises.
        """
        assert self._nursery is not None, "RelayClient.run() is not running"
        with trio.fail_after(RELAY_OP_TIMEOUT):
            await self.ensure_authenticated(relay_id, addrs)
            stream = await self.node.new_stream(relay_id, HOP_PROTOCOL)
            try:
                granted = await self._transport.reserve(stream, relay_id, self._nursery)
            finally:
                with contextlib.suppress(Exception):
                    await stream.close()
        if granted:
            self.reserved[relay_id] = list(addrs)
            self.node.host.get_network().protect(relay_id, "localp2p-relay")
        else:
            self.reserved.pop(relay_id, None)
        return granted

    def drop_reservation(self, relay_id: ID) -> None:
        """Forget a reservation whose relay went away (it is not announced any more)."""
        if self.reserved.pop(relay_id, None) is not None:
            self.node.host.get_network().unprotect(relay_id, "localp2p-relay")

    def circuit_addrs(self) -> list[Multiaddr]:
        """Where others reach this node through its reservations (``.../p2p-circuit``, no own ``/p2p``)."""
        return [circuit_addr(a, relay_id) for relay_id, addrs in self.reserved.items() for a in addrs]

    async def open_circuit(self, peer_id: ID, relay_id: ID, relay_addrs: list[Multiaddr]) -> IRawConnection:
        """A circuit to ``peer_id`` through ``relay_id``, not yet secured (:meth:`dial` upgrades it).

        The caller owns the returned connection and closes it if it does not upgrade it.
        Raises as :meth:`dial` does.
        """
        await self.ensure_authenticated(relay_id, relay_addrs)
        target = _circuit_target(relay_id, peer_id)
        return await self._transport.dial_peer_info(PeerInfo(peer_id, [target]), relay_info=PeerInfo(relay_id, relay_addrs))

    async def dial(self, peer_id: ID, relay_id: ID, relay_addrs: list[Multiaddr]) -> None:
        """Connect to ``peer_id`` through ``relay_id`` (authenticating to the relay first).

        The connection is Noise + Yamux end to end over one relay stream; it joins the
        swarm like any other, marked RELAYED. Raises on failure (no reservation there,
        relay refused or unreachable, handshake failed).
        """
        raw = None
        try:
            with trio.fail_after(RELAY_OP_TIMEOUT):
                raw = await self.open_circuit(peer_id, relay_id, relay_addrs)
                conn = await self.node.host.upgrade_outbound_connection(raw, peer_id)
        except BaseException:
            # A circuit opened but not upgraded (timed out, handshake failed) would stay
            # open at the relay and at the peer, half-made: close it.
            if raw is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(RELAY_CLOSE_TIMEOUT), contextlib.suppress(Exception):
                    await raw.close()
            raise
        with contextlib.suppress(Exception):
            conn.set_transport_info([_circuit_target(relay_id, peer_id)], ConnectionType.RELAYED)  # type: ignore[attr-defined]
        # Never trimmed as a spare connection while it carries tunnels (max one per peer).
        self.node.host.get_network().protect(peer_id, "localp2p-relayed")
