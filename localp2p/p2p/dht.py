"""Kademlia DHT (provider records) on top of a :class:`~localp2p.p2p.node.P2PNode`.

py-libp2p 0.8.1's ``KadDHT`` is a ``Service`` (libp2p's own anyio/trio
service framework). It is constructed with the host and a ``DHTMode``; in
``SERVER`` mode it registers ``/ipfs/kad/1.0.0`` on the host, in ``CLIENT``
mode it only queries. It must be *run* (``background_trio_service(dht)``) for
its maintenance loop (routing-table refresh, provider republish, expiry), but
``provide``/``find_providers`` are plain coroutines that work as long as the
host is running.

There is no bootstrap list in ``KadDHT`` itself: the routing table starts
empty and is filled by (a) :meth:`NodeDHT.add_peer`, (b) peers that open KAD
streams to us (added unconditionally), and (c) peers learned from query
responses. When the table is nearly empty, lookups also fall back to
currently-connected peers and then *every* peer in the peerstore.

Content keys: ``KadDHT.provide(str)`` guesses how to encode its ``str``
argument (CID -> multihash, else hex, else UTF-8), which is ambiguous for
arbitrary keys. We bypass it and call ``dht.provider_store.provide(bytes)``
with a sha2-256 multihash of the caller's key (:func:`content_key`), which is
what go/rust peers expect a provider key to be.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator

import trio
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PERMANENT_ADDR_TTL
from libp2p.tools.anyio_service import background_trio_service

from localp2p.logs import get_logger

from .addresses import strip_p2p
from .node import P2PNode

__all__ = [
    "DHTMode",
    "KAD_PROTOCOL_ID",
    "NodeDHT",
    "content_key",
    "open_dht",
    "run_dht",
]

_log = get_logger(__name__)

#: multihash prefix: sha2-256 (0x12), 32-byte digest (0x20)
_SHA256_MULTIHASH_PREFIX = b"\x12\x20"


def content_key(key: bytes) -> bytes:
    """The DHT key used for ``key``: a sha2-256 multihash of the raw bytes."""
    return _SHA256_MULTIHASH_PREFIX + hashlib.sha256(key).digest()


class NodeDHT:
    """Provider-record helpers bound to one node and one running ``KadDHT``."""

    def __init__(self, node: P2PNode, kad: KadDHT) -> None:
        self.node = node
        self.kad = kad

    async def add_peer(self, peer_info: PeerInfo, *, connect: bool = True) -> bool:
        """Put a peer we already know (e.g. a bootstrap node) in the routing table.

        Its addresses are stored in the peerstore with a permanent TTL
        (``host.connect`` would store them with a 120 s TTL, after which
        py-libp2p silently drops them). With ``connect=True`` we dial it first
        so a bad address fails loudly here rather than inside a later query.

        :return: ``True`` if the peer is now in the routing table. ``False``
            if the table refused it (e.g. identify already showed the peer does
            not speak ``/ipfs/kad/1.0.0``, i.e. it is a DHT client).
        """
        addrs = [strip_p2p(a) for a in peer_info.addrs]
        info = PeerInfo(peer_info.peer_id, addrs)
        if connect:
            await self.node.connect(info)
        self.node.host.get_peerstore().add_addrs(
            info.peer_id, addrs, PERMANENT_ADDR_TTL
        )
        return await self.kad.routing_table.add_peer(info)

    async def advertise(self, key: bytes) -> bool:
        """Announce this node as a provider of ``key`` (ADD_PROVIDER to the k closest).

        The record is also stored locally. Records expire on remote peers after
        48 h; KadDHT's maintenance loop republishes every 22 h while running.

        :return: ``True`` if at least one remote peer was sent the record.
        """
        return await self.kad.provider_store.provide(content_key(key))

    async def find(
        self, key: bytes, *, count: int = 20, include_self: bool = False
    ) -> list[PeerInfo]:
        """Peers that advertised ``key``, with addresses (no ``/p2p`` suffix).

        Note that py-libp2p answers from its local provider cache first (which
        includes records learned by earlier lookups) and only queries the
        network when the cache is empty for that key.
        """
        providers = await self.kad.provider_store.find_providers(
            content_key(key), count
        )
        out: dict[ID, PeerInfo] = {}
        for info in providers:
            if info.peer_id == self.node.peer_id and not include_self:
                continue
            addrs = [strip_p2p(a) for a in info.addrs]
            prev = out.get(info.peer_id)
            if prev is not None:
                addrs = list(dict.fromkeys([*prev.addrs, *addrs]))
            out[info.peer_id] = PeerInfo(info.peer_id, addrs)
        return list(out.values())

    def routing_table_peers(self) -> list[ID]:
        """Peer ids currently in the routing table."""
        return list(self.kad.routing_table.get_peer_ids())


@contextlib.asynccontextmanager
async def open_dht(
    node: P2PNode, *, mode: DHTMode = DHTMode.SERVER
) -> AsyncIterator[NodeDHT]:
    """Create and run a ``KadDHT`` on ``node`` for the duration of the block.

    In ``SERVER`` mode the KAD stream handler is re-registered through
    :meth:`P2PNode.set_handler` so an exception in it cannot kill the host.
    Must be entered inside the node's ``open_node`` block.
    """
    kad = KadDHT(node.host, mode)
    if mode == DHTMode.SERVER:
        node.set_handler(KAD_PROTOCOL_ID, kad.handle_stream, close_on_return=False)
    async with background_trio_service(kad):
        _log.info("kad dht started", peer_id=str(node.peer_id), mode=mode.value)
        try:
            yield NodeDHT(node, kad)
        finally:
            if mode == DHTMode.SERVER:
                node.remove_handler(KAD_PROTOCOL_ID)


async def run_dht(
    node: P2PNode,
    *,
    mode: DHTMode = DHTMode.SERVER,
    task_status: trio.TaskStatus[NodeDHT] = trio.TASK_STATUS_IGNORED,
) -> None:
    """:func:`open_dht` shaped for ``dht = await nursery.start(run_dht, node)``."""
    async with open_dht(node, mode=mode) as dht:
        task_status.started(dht)
        await trio.sleep_forever()
