"""py-libp2p's DCUtR (hole punching), fitted to localp2p's hosts and tunnels.

Patches (process-wide source choice in :func:`install`; the rest in the subclass
:class:`TunnelSafeDCUtR`, which localp2p runs instead of ``DCUtRProtocol``).
Upstream behaviour they fix (notes/libp2p.md, "Relays and hole punching"):

* **The hole-punch source address.** ``_perform_hole_punch`` binds its dials to the
  first TCP address of ``host.get_addrs()`` (``dcutr._local_tcp_listen_addrs``). Our
  hosts listen on ``0.0.0.0`` and advertise every interface's address, loopback
  included, so the first one may be ``127.0.0.1`` (a SYN from it never leaves) or an
  address another host observed. The patched function answers the bound listen
  addresses instead (``0.0.0.0:<port>``): the kernel picks the outgoing interface, the
  port is the listen port the NAT keeps (the punch relies on that; see below).
* **Closing the relayed connection under the tunnel.** After a punch upstream closes the
  relayed connection once a 60 s grace is over, streams or not. A tunnel's streams live
  as long as the backend keeps its rpc connections open (until the next reload), and
  closing them fails requests. :class:`TunnelSafeDCUtR` closes it only once it carries
  no stream, checked every :data:`IDLE_CHECK_INTERVAL` s from the punch on (no grace:
  streams opened after the punch go to the direct connection already, and the stream
  check keeps the old ones), so a relay can go away soon after a tunnel left it.

Relies on ``dcutr._local_tcp_listen_addrs(host)`` returning ``(family, ip, port)``
tuples, and on ``DCUtRProtocol._close_relayed_conns_after_grace(peer_id, grace)``
being what ``_schedule_relay_close`` starts.

The punch itself predicts the peer's public address as the relay observed its IP
with its listen port: it works through NATs that keep the source port (Linux
masquerade does when it can), not through ones that pick random ports; those links
stay relayed.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2 import dcutr
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

__all__ = ["IDLE_CHECK_INTERVAL", "TunnelSafeDCUtR", "install"]

#: Seconds between checks whether an upgraded peer's relayed connection is idle yet.
IDLE_CHECK_INTERVAL = 5.0


def _bound_tcp_listen_addrs(host: Any) -> list[tuple[int, str, int]]:
    """The TCP addresses the host's listeners are bound to, as ``(family, ip, port)``."""
    out: list[tuple[int, str, int]] = []
    for addr in host.get_transport_addrs():
        parsed = dcutr._tcp_ip_port(addr)
        if parsed is not None and "/p2p-circuit" not in str(addr):
            out.append(parsed)
    return out


def install() -> None:
    """Hole-punch dials leave from the bound listen address (see the module docstring)."""
    if not hasattr(dcutr, "_local_tcp_listen_addrs") or not hasattr(dcutr, "_tcp_ip_port"):
        raise AttributeError("libp2p.relay.circuit_v2.dcutr has no _local_tcp_listen_addrs/_tcp_ip_port")
    dcutr._local_tcp_listen_addrs = _bound_tcp_listen_addrs


def _is_relayed(conn: Any) -> bool:
    try:
        addrs = conn.get_transport_addresses()
    except Exception:
        return False
    return bool(addrs) and all("/p2p-circuit" in str(a) for a in addrs)


class TunnelSafeDCUtR(DCUtRProtocol):
    """DCUtR that closes a peer's relayed connection only once no stream uses it."""

    async def _close_relayed_conns_after_grace(self, peer_id: ID, grace: float = IDLE_CHECK_INTERVAL) -> None:
        await trio.sleep(grace)
        while True:
            if not await self._verify_direct_connection(peer_id):
                return  # never strand the peer
            relayed = [c for c in self.host.get_network().get_connections(peer_id) if _is_relayed(c)]
            if not relayed:
                return
            for conn in relayed:
                if not conn.get_streams():
                    try:
                        await conn.close()
                    except Exception:
                        pass
            await trio.sleep(IDLE_CHECK_INTERVAL)
