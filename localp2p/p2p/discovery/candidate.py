"""What discovery reports: a :class:`Candidate`, a peer that was announced (or withdrawn).

Shared by :mod:`.mdns` and :mod:`.dht`, read by the worker set and the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

__all__ = ["Candidate", "Source"]

#: Which discovery service reported a candidate.
Source = Literal["mdns", "dht"]


@dataclass(frozen=True)
class Candidate:
    """A peer that was announced (or, with ``gone=True``, withdrawn).

    :ivar peer_id: the announced libp2p peer id. For mDNS this is what the
        announcement *claims*; only the Noise handshake proves it.
    :ivar addrs: dialable multiaddrs without ``/p2p`` (empty when ``gone``).
    :ivar source: ``"mdns"`` or ``"dht"``.
    :ivar role: ``"server"`` / ``"worker"`` if the announcement carries it
        (mDNS TXT ``role``); ``None`` for the DHT.
    :ivar name: human-readable node name from mDNS TXT, else ``None``.
    :ivar gone: the peer withdrew its mDNS announcement (goodbye or expiry).
    """

    peer_id: ID
    addrs: tuple[Multiaddr, ...]
    source: Source
    role: str | None = None
    name: str | None = None
    gone: bool = False

    @property
    def peer_info(self) -> PeerInfo:
        """``PeerInfo(peer_id, addrs)`` for ``node.connect`` / ``dht.add_peer``."""
        return PeerInfo(self.peer_id, list(self.addrs))
