"""How this node reaches its peers: directly, through a relay, or hole-punched.

:class:`Links` (one per node, run by :func:`~localp2p.p2p.network.run_network`):

* **Learns relays** from the peers it is connected to (bootstrap peers, DHT and mDNS
  neighbours): a peer whose identify lists the Circuit Relay v2 hop protocol, and that
  proves the network token, is a relay. Until one is known nothing here runs, so a
  network without ``--p2p-relay`` nodes behaves as before.
* **Reachability**: asks the first relay to dial it back
  (:mod:`~localp2p.p2p.reachability`); an unreachable node keeps reservations on up to
  :data:`MAX_RESERVATIONS` relays (renewed, and redone when a relay connection drops)
  and announces their ``/p2p-circuit`` addresses (DHT provider records, ``/api/p2p``).
* **Dialing** (:meth:`Links.connect`): directly first; when that fails and relays are
  known, through a relay (the peer's announced ones, then every relay this node knows).
* **Hole punching**: DCUtR runs once a relay is known; a relayed connection upgraded to
  a direct one is a "hole-punched" link (:meth:`Links.link_of`). Streams opened after the
  upgrade use the direct connection; streams already open (a tunnel's rpc connections)
  stay on the relayed one until they end: the server's worker set sees the upgrade and
  asks for a backend reload (drained first), whose rpc connections open on the direct
  path; the relayed connection is closed once idle
  (:class:`~localp2p.p2p._libp2p.dcutr.TunnelSafeDCUtR`).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from localp2p.logs import get_logger

from ._libp2p.dcutr import TunnelSafeDCUtR
from .addresses import strip_p2p
from .auth import AuthError, AuthGate
from .node import P2PNode
from .reachability import REACHABILITY_PROTOCOL, Reachability, ask_reachability, reachability_handler
from .relay import HOP_PROTOCOL, RelayClient, RelayLimits, gated, is_circuit, relay_of

__all__ = ["Link", "LinkKind", "Links"]

#: Seconds between looks for new relays and dropped reservations.
SCAN_INTERVAL = 2.0
#: Relays an unreachable node holds a reservation on.
MAX_RESERVATIONS = 2
#: Seconds a direct dial may take before a relay is tried (when one is known). A NAT
#: drops the SYN silently, so this is what an unreachable peer costs before the relay.
DIRECT_DIAL_TIMEOUT = 2.0
#: Seconds a direct dial runs alone before the relays race it, for a peer that announces
#: relayed addresses (it is behind a NAT, but may share a LAN with us).
DIRECT_HEAD_START = 0.5
#: Seconds before a peer that failed to be our relay (refused the token, no reservation) is tried again.
RELAY_RETRY = 30.0
#: Seconds a hole-punch dial may take (py-libp2p: 10 s, also spent on each dead address first).
PUNCH_DIAL_TIMEOUT = 3

log = get_logger("p2p.links")


class LinkKind(enum.Enum):
    DIRECT = "direct"
    HOLE_PUNCHED = "hole-punched"
    RELAYED = "relayed"


@dataclass(frozen=True)
class Link:
    """How this node is connected to one peer now."""

    kind: LinkKind
    #: The relay's peer id while a relayed connection is open: the only one (RELAYED), or
    #: the one a punched link still keeps for streams opened before the punch.
    relay: str | None = None


def _is_relayed(conn: Any) -> bool:
    try:
        addrs = conn.get_transport_addresses()
    except Exception:
        return False
    return bool(addrs) and all(is_circuit(a) for a in addrs)


class Links:
    """Relays, reachability and hole punching for one node (see the module docstring)."""

    def __init__(self, node: P2PNode, gate: AuthGate, relay_limits: RelayLimits | None = None) -> None:
        self.node = node
        self.gate = gate
        self.relays = RelayClient(node, gate, relay_limits)
        self.reachability = Reachability.UNKNOWN
        #: Relays that proved the token to us: peer id -> addresses.
        self.known_relays: dict[ID, list[Multiaddr]] = {}
        #: Peers first reached through a relay (a direct link to them later is a punched one).
        self._relayed_first: set[ID] = set()
        #: Peers that failed as relays, and when.
        self._not_relays: dict[ID, float] = {}
        self._active = trio.Event()
        self._nursery: trio.Nursery | None = None

    # -- running -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled: serve as a relay if asked, and look for relays to use."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.relays.serves:
                await self._activate()
                self.node.set_handler(REACHABILITY_PROTOCOL, reachability_handler(self.gate))
            task_status.started()
            while True:
                await self._scan()
                await trio.sleep(SCAN_INTERVAL)

    async def _activate(self) -> None:
        """Start the relay protocol (stop side, hop when serving) and hole punching, once."""
        if self._active.is_set():
            return
        assert self._nursery is not None
        self._active.set()
        await self._nursery.start(self.relays.run)
        await self._nursery.start(self._run_dcutr)

    async def _run_dcutr(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        dcutr = TunnelSafeDCUtR(self.node.host, dial_timeout=PUNCH_DIAL_TIMEOUT)
        async with background_trio_service(dcutr):
            await dcutr.event_started.wait()
            # Only token holders may make us dial addresses they name.
            self.node.set_handler(DCUTR_PROTOCOL, gated(self.gate, dcutr._handle_dcutr_stream), close_on_return=False)
            task_status.started()
            await trio.sleep_forever()

    async def _scan(self) -> None:
        """Learn relays among connected peers; keep reservations while unreachable."""
        for peer_id in self._relay_candidates():
            try:
                await self.relays.ensure_authenticated(peer_id, self._addrs_of(peer_id))
            except (AuthError, Exception) as exc:
                log.info("peer offers relaying but cannot be our relay", peer_id=str(peer_id), error=str(exc))
                self._not_relays[peer_id] = time.monotonic()
                continue
            self.known_relays[peer_id] = [a for a in self._addrs_of(peer_id) if not is_circuit(a)]
            log.info("relay found", relay=str(peer_id), addrs=[str(a) for a in self.known_relays[peer_id]])
            await self._activate()
        if self.reachability is Reachability.UNKNOWN:
            await self._check_reachability()
        if self.reachability is Reachability.PRIVATE:
            await self._keep_reservations()

    def _relay_candidates(self) -> list[ID]:
        now = time.monotonic()
        peerstore = self.node.host.get_peerstore()
        out = []
        for peer_id in self.node.connected_peers():
            if peer_id in self.known_relays or now - self._not_relays.get(peer_id, -RELAY_RETRY) < RELAY_RETRY:
                continue
            try:
                if peerstore.supports_protocols(peer_id, [str(HOP_PROTOCOL)]):
                    out.append(peer_id)
            except Exception:
                continue
        return out

    def _addrs_of(self, peer_id: ID) -> list[Multiaddr]:
        try:
            return [strip_p2p(a) for a in self.node.host.get_peerstore().addrs(peer_id)]
        except Exception:
            return []

    async def _check_reachability(self) -> None:
        for relay_id in list(self.known_relays):
            if relay_id == self.node.peer_id:
                continue
            try:
                state, answer = await ask_reachability(self.node, relay_id)
            except Exception as exc:
                log.debug("reachability question failed", relay=str(relay_id), error=f"{type(exc).__name__}: {exc}")
                continue
            self.reachability = state
            log.info("reachability", state=state.value, asked=str(relay_id), observed=answer.get("observed"))
            return

    async def _keep_reservations(self) -> None:
        for relay_id in list(self.relays.reserved):
            if not self.node.host.get_network().get_connections(relay_id):
                log.warning("relay connection lost; reserving again", relay=str(relay_id))
                self.relays.drop_reservation(relay_id)
        for relay_id, addrs in self.known_relays.items():
            if len(self.relays.reserved) >= MAX_RESERVATIONS:
                break
            if relay_id in self.relays.reserved:
                continue
            try:
                granted = await self.relays.reserve(relay_id, addrs)
            except Exception as exc:
                log.warning("reservation failed", relay=str(relay_id), error=f"{type(exc).__name__}: {exc}")
                continue
            if granted:
                log.info("reserved on relay", relay=str(relay_id), addrs=[str(a) for a in self.relays.circuit_addrs()])
        self.node.announce_extra(self.relays.circuit_addrs())

    # -- dialing and links -----------------------------------------------------------

    async def connect(self, peer_id: ID, addrs: list[Multiaddr]) -> None:
        """Connect to ``peer_id``: directly, else through a relay (when any is known).

        A peer that announces relayed addresses found itself unreachable from outside:
        its direct addresses get a head start of :data:`DIRECT_HEAD_START` s, then its
        relays race them (the first connection wins; the others are cancelled, a
        half-made circuit closed). Otherwise the direct dial has
        :data:`DIRECT_DIAL_TIMEOUT` s before the relays are tried in turn.

        :raises Exception: no way worked (the last error).
        """
        direct = [strip_p2p(a) for a in addrs if not is_circuit(a)]
        announced = self._announced_relays(addrs)
        if not self.known_relays and not announced:
            await self.node.connect(PeerInfo(peer_id, direct))
            return
        if self.node.host.get_network().get_connections(peer_id):
            return
        relays = [(r, a) for r, a in {**announced, **self.known_relays}.items() if r != peer_id]
        errors: list[BaseException] = []
        if announced:
            if await self._race(peer_id, direct, relays, errors):
                return
        else:
            if direct:
                try:
                    with trio.fail_after(DIRECT_DIAL_TIMEOUT):
                        await self.node.connect(PeerInfo(peer_id, direct))
                    return
                except Exception as exc:
                    errors.append(exc)
            for relay_id, relay_addrs in relays:
                if await self._dial_relayed(peer_id, relay_id, relay_addrs, errors):
                    return
        raise errors[-1] if errors else ConnectionError(f"no address or relay for {peer_id}")

    async def _race(
        self, peer_id: ID, direct: list[Multiaddr], relays: list[tuple[ID, list[Multiaddr]]], errors: list[BaseException]
    ) -> bool:
        """Direct dial first, each relay :data:`DIRECT_HEAD_START` s later; True once one connected."""
        won = False

        async def direct_dial(cancel: trio.CancelScope) -> None:
            nonlocal won
            try:
                with trio.fail_after(DIRECT_DIAL_TIMEOUT):
                    await self.node.connect(PeerInfo(peer_id, direct))
            except Exception as exc:
                errors.append(exc)
                return
            won = True
            cancel.cancel()

        async def relayed_dial(cancel: trio.CancelScope, relay_id: ID, relay_addrs: list[Multiaddr]) -> None:
            nonlocal won
            await trio.sleep(DIRECT_HEAD_START if direct else 0)
            if await self._dial_relayed(peer_id, relay_id, relay_addrs, errors):
                won = True
                cancel.cancel()

        async with trio.open_nursery() as nursery:
            if direct:
                nursery.start_soon(direct_dial, nursery.cancel_scope)
            for relay_id, relay_addrs in relays:
                nursery.start_soon(relayed_dial, nursery.cancel_scope, relay_id, relay_addrs)
        return won

    async def _dial_relayed(self, peer_id: ID, relay_id: ID, relay_addrs: list[Multiaddr], errors: list[BaseException]) -> bool:
        """One relayed dial; True when it connected (its error goes to ``errors`` otherwise)."""
        try:
            await self.relays.dial(peer_id, relay_id, relay_addrs)
        except Exception as exc:
            log.debug("relayed dial failed", peer_id=str(peer_id), relay=str(relay_id), error=f"{type(exc).__name__}: {exc}")
            errors.append(exc)
            return False
        self._relayed_first.add(peer_id)
        log.info("connected through relay", peer_id=str(peer_id), relay=str(relay_id))
        await self._activate()
        return True

    @staticmethod
    def _announced_relays(addrs: list[Multiaddr]) -> dict[ID, list[Multiaddr]]:
        """The relays named in a peer's ``/p2p-circuit`` addresses, with the addresses given for them."""
        out: dict[ID, list[Multiaddr]] = {}
        for addr in addrs:
            relay = relay_of(addr) if is_circuit(addr) else None
            if relay is None:
                continue
            head = str(addr).split(f"/p2p/{relay}/p2p-circuit", 1)[0]
            try:
                out.setdefault(ID.from_base58(relay), []).extend([Multiaddr(head)] if head else [])
            except Exception:
                continue
        return out

    def link_of(self, peer_id: ID) -> Link | None:
        """How we are connected to ``peer_id`` now (None: not connected)."""
        conns = self.node.host.get_network().get_connections(peer_id)
        if not conns:
            return None
        relays = [relay_of(a) for c in conns if _is_relayed(c) for a in c.get_transport_addresses()]
        relay = next((r for r in relays if r), None)
        if any(not _is_relayed(c) for c in conns):
            return Link(LinkKind.HOLE_PUNCHED if peer_id in self._relayed_first else LinkKind.DIRECT, relay)
        return Link(LinkKind.RELAYED, relay)

    def describe(self) -> dict[str, Any]:
        """This node's side: relay service, reachability, relays known and reserved on."""
        return {
            "relay_service": self.relays.serves,
            "reachability": self.reachability.value,
            "relays": sorted(str(r) for r in self.known_relays),
            "relay_addrs": [f"{a}/p2p/{self.node.peer_id}" for a in self.relays.circuit_addrs()],
        }
