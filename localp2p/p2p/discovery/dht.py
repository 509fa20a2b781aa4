"""The Kademlia DHT of a :class:`~localp2p.p2p.node.P2PNode`, and rendezvous discovery through it.

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

Rendezvous (:func:`run_dht_discovery`): every node provides and/or looks up the
network's rendezvous keys and reports providers as candidates (``source="dht"``).
The DHT cannot know when a provider leaves (records live for 48 h), so it never
reports ``gone``: liveness is the job of the libp2p connection, not of discovery.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.kad_dht.common import ALPHA as KAD_ALPHA
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.common import QUERY_TIMEOUT as KAD_QUERY_TIMEOUT
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import PERMANENT_ADDR_TTL
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from localp2p.logs import get_logger

from ..addresses import advertisable_addrs, strip_p2p
from ..node import P2PNode
from .candidate import Candidate

__all__ = [
    "DHT_INITIAL_INTERVAL",
    "DHT_MAX_INTERVAL",
    "DHT_REEMIT_INTERVAL",
    "DHT_REPROVIDE_INTERVAL",
    "KAD_PROTOCOL_ID",
    "DHTMode",
    "NodeDHT",
    "add_dht_peer",
    "content_key",
    "open_dht",
    "run_dht",
    "run_dht_discovery",
]

_log: Any = get_logger(__name__)

#: First DHT round interval (s): a worker must be found within ~10 s of start,
#: so the first searches (and provide retries) come quickly.
DHT_INITIAL_INTERVAL = 2.0
#: Steady-state interval (s): bounds how late a worker that joins later is
#: noticed; each round costs a few KAD round trips per rendezvous key.
DHT_MAX_INTERVAL = 10.0
#: Interval growth per round from initial to max (2, 3, 4.5, 6.75, 10 s).
DHT_BACKOFF_FACTOR = 1.5
#: Re-provide each rendezvous key this often (s) even after success: provider
#: records live in memory on the DHT servers nearest the key, and one that
#: restarted or joined after we provided would otherwise not know us until
#: KadDHT's own 22 h republish.
DHT_REPROVIDE_INTERVAL = 60.0
#: An unchanged DHT candidate is sent again after this long (s), so a
#: consumer that dropped the peer (e.g. a failed dial) gets another chance.
DHT_REEMIT_INTERVAL = 60.0
#: Longest interval (s) between quick searches (one GET_PROVIDERS per key to each
#: connected DHT peer): how late a worker behind a NAT is seen once it advertised.
DHT_QUICK_INTERVAL = 4.0
#: Upper bound (s) for one provide or one provider lookup; KadDHT's own
#: per-peer timeout is 10 s and a lookup may hop several times.
DHT_OPERATION_TIMEOUT = 20.0
#: Upper bound (s) for dialing one bootstrap (or mDNS-found) peer.
DHT_CONNECT_TIMEOUT = 5.0
#: Providers asked for per key and lookup (KadDHT's k).
DHT_MAX_PROVIDERS = 20

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

    async def advertise_near(self, key: bytes) -> bool:
        """Announce this node as a provider of ``key`` to the DHT peers it is connected to.

        One ADD_PROVIDER to each connected routing-table peer (the bootstrap peers),
        at once, each bounded by KadDHT's query timeout. This is what makes a worker
        behind a NAT findable within seconds through the relay it bootstrapped from;
        :meth:`advertise` then reaches the k closest. Also stores the record locally.

        :return: ``True`` if at least one remote peer was sent the record.
        """
        store = self.kad.provider_store
        ckey = content_key(key)
        own = self.node.peer_id
        connected = set(self.node.connected_peers())
        sent = 0

        async def send(peer_id: ID) -> None:
            nonlocal sent
            with trio.move_on_after(KAD_QUERY_TIMEOUT):
                sent += bool(await store._send_add_provider(peer_id, ckey))

        store.providing_keys.add(ckey)
        store.add_provider(ckey, PeerInfo(own, list(self.node.host.get_addrs())))
        async with trio.open_nursery() as nursery:
            for peer_id in self.routing_table_peers():
                if peer_id in connected and peer_id != own:
                    nursery.start_soon(send, peer_id)
        return sent > 0

    async def advertise(self, key: bytes) -> bool:
        """Announce this node as a provider of ``key`` (ADD_PROVIDER to the k closest).

        The record is also stored locally. Records expire on remote peers after
        48 h; KadDHT's maintenance loop republishes every 22 h while running.
        The walk to the k closest can take long behind a NAT (it waits on peers
        named at addresses nobody can dial): callers bound it.

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


# --------------------------------------------------------------------------
# Rendezvous
# --------------------------------------------------------------------------


def _as_peer_info(entry: Multiaddr | PeerInfo | str) -> PeerInfo:
    """A bootstrap entry as ``PeerInfo`` (``/p2p/<id>`` is required in multiaddrs)."""
    if isinstance(entry, PeerInfo):
        return PeerInfo(entry.peer_id, [strip_p2p(a) for a in entry.addrs])
    addr = entry if isinstance(entry, Multiaddr) else Multiaddr(entry)
    try:
        info = info_from_p2p_addr(addr)
    except Exception as exc:
        raise ValueError(f"bootstrap address {addr} must end in /p2p/<peer id>: {exc}") from exc
    return PeerInfo(info.peer_id, [strip_p2p(a) for a in info.addrs])


async def add_dht_peer(dht: NodeDHT, candidate: Candidate | PeerInfo) -> bool:
    """Dial a discovered peer and put it in the DHT routing table.

    Meant for mDNS candidates: a LAN peer found by mDNS becomes a DHT
    neighbour, so DHT lookups work even with no bootstrap list. Bounded by
    :data:`DHT_CONNECT_TIMEOUT`; never raises (errors are logged).

    :return: ``True`` if the peer is now in the routing table.
    """
    if isinstance(candidate, Candidate):
        if candidate.gone or not candidate.addrs:
            return False
        info = candidate.peer_info
    else:
        info = candidate
    if info.peer_id == dht.node.peer_id:
        return False
    try:
        with trio.move_on_after(DHT_CONNECT_TIMEOUT):
            return bool(await dht.add_peer(info))
        _log.info("dht: adding peer timed out", peer_id=str(info.peer_id))
    except Exception as exc:
        _log.info("dht: could not add peer", peer_id=str(info.peer_id), error=repr(exc))
    _forget_addrs(dht, info.peer_id)
    return False


def _forget_addrs(dht: NodeDHT, peer_id: ID) -> None:
    """Drop the peerstore addresses of a peer we just failed to dial.

    ``host.connect`` stores them before dialing, and while the routing table
    is small KadDHT's lookups query *every* peer in the peerstore: each
    lookup would wait on the dead peer's dial retries again. Not done for a
    peer we are still connected to. Our own copy (e.g. the bootstrap list)
    is kept, so a later retry still knows where to dial.
    """
    if peer_id in dht.node.connected_peers():
        return
    try:
        dht.node.host.get_peerstore().clear_addrs(peer_id)
    except Exception:
        pass


def _merge_provider(found: dict[ID, list[Multiaddr]], info: PeerInfo) -> None:
    addrs = found.setdefault(info.peer_id, [])
    for raw in info.addrs:
        addr = strip_p2p(raw)
        if addr not in addrs:
            addrs.append(addr)


async def _lookup_providers(
    dht: NodeDHT, raw_key: bytes, count: int, found: dict[ID, list[Multiaddr]], *, walk: bool
) -> None:
    """Add the providers of ``raw_key`` to ``found``: our own store plus a fresh network lookup.

    ``ProviderStore.find_providers`` returns the local cache as soon as it
    has *any* record for the key (including our own record when we also
    provide the key, and records cached by earlier lookups) and only asks the
    network when it has none - a searcher would never see a second worker.
    This is the same iterative GET_PROVIDERS walk without that short cut,
    and it does not add what it finds to the local store. Includes self.

    Without ``walk``: only our store and the routing-table peers this node is
    connected to (one round trip each; the bootstrap peers). With ``walk``: the
    walk from the closest peers the network names as well. ``found`` is filled
    as answers come, so a caller's time bound keeps what was found before it:
    behind a NAT the walk meets peers it cannot dial (their private addresses)
    and can outlast any bound, while the connected peers answer at once.
    """
    kad = dht.kad
    store = kad.provider_store
    key = content_key(raw_key)
    own = dht.node.peer_id
    for info in store.get_providers(key):
        _merge_provider(found, info)

    queried: set[ID] = set()

    async def ask_all(batch: list[ID]) -> list[ID]:
        """GET_PROVIDERS to each of ``batch`` at once; the closer peers they name."""
        closer: list[ID] = []

        async def ask(peer: ID) -> None:
            queried.add(peer)
            try:
                with trio.move_on_after(KAD_QUERY_TIMEOUT):
                    providers, closer_peers = await store._get_providers_from_peer_with_closers(peer, key)
                    for info in providers:
                        _merge_provider(found, info)
                    closer.extend(closer_peers)
            except Exception as exc:
                _log.debug("dht: GET_PROVIDERS failed", peer_id=str(peer), error=repr(exc))

        async with trio.open_nursery() as nursery:
            for peer in batch:
                if peer not in queried:
                    nursery.start_soon(ask, peer)
        return closer

    connected = set(dht.node.connected_peers())
    candidates = await ask_all([p for p in dht.routing_table_peers() if p in connected and p != own])
    if not walk:
        return
    with trio.move_on_after(KAD_QUERY_TIMEOUT):
        candidates += await kad.peer_routing.find_closest_peers_network(key)
    candidates = list(dict.fromkeys(p for p in candidates if p != own and p not in queried))
    while candidates and len(found) < count + 1:
        batch, candidates = candidates[:KAD_ALPHA], candidates[KAD_ALPHA:]
        for peer in await ask_all(batch):
            if peer != own and peer not in queried and peer not in candidates:
                candidates.append(peer)
    # Providers that sent no addresses: try what the peerstore knows.
    peerstore = dht.node.host.get_peerstore()
    for peer, addrs in found.items():
        if not addrs:
            try:
                addrs.extend(strip_p2p(a) for a in peerstore.addrs(peer))
            except Exception:
                pass


@dataclass
class _DhtState:
    """Per-:func:`run_dht_discovery` bookkeeping (owned by its trio tasks)."""

    bootstrap: list[PeerInfo]
    #: raw key -> monotonic time of the last provide that reached a connected peer
    provided: dict[bytes, float] = field(default_factory=dict)
    #: raw key -> monotonic time of the last provide that walked to the k closest
    walked: dict[bytes, float] = field(default_factory=dict)
    #: peer id -> (addresses, monotonic time) of the last candidate sent
    emitted: dict[ID, tuple[tuple[str, ...], float]] = field(default_factory=dict)
    #: bootstrap peers whose last dial failed (to log each outage once)
    unreachable: set[ID] = field(default_factory=set)
    #: the raw rendezvous keys of the last round
    keys: list[bytes] = field(default_factory=list)
    #: set by the bootstrap task when a bootstrap peer was (re)added: the
    #: discovery loop then runs a round at once, re-provides everything
    #: (that peer may have lost our records) and restarts its backoff
    kick: trio.Event = field(default_factory=trio.Event)


async def run_dht_discovery(
    node: P2PNode,
    dht: NodeDHT,
    rendezvous_keys: Callable[[], list[bytes]],
    *,
    advertise: bool,
    search: bool,
    send_channel: trio.MemorySendChannel[Candidate],
    bootstrap: Sequence[Multiaddr | PeerInfo | str] = (),
    interval: float = DHT_MAX_INTERVAL,
    initial_interval: float = DHT_INITIAL_INTERVAL,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Rendezvous through the Kademlia DHT: provide and/or look up our keys.

    Owns two tasks, both running until cancelled:

    * a bootstrap task that dials every bootstrap peer that is not connected
      (or not in the routing table) and adds it to the DHT
      (:meth:`NodeDHT.add_peer`), concurrently and each bounded by
      :data:`DHT_CONNECT_TIMEOUT`, then re-checks on the same backoff as
      below (an unreachable bootstrap peer never delays a round);
    * a loop of rounds. Each round calls ``rendezvous_keys()`` (current and
      previous epoch key: keys rotate, so they are re-read every round);
      if ``advertise``, provides every key that was never provided, whose
      last provide reached no remote peer, or that is older than
      :data:`DHT_REPROVIDE_INTERVAL`; if ``search`` (side by side with the
      provides), looks up the providers of every key (our store and connected
      peers first, then a fresh network walk, see :func:`_dht_search`) and sends a :class:`Candidate`
      (``source="dht"``, no role/name, never ``gone``) for every provider
      other than us whose addresses are new or changed, or that was last
      sent more than :data:`DHT_REEMIT_INTERVAL` ago.

    Rounds start ``initial_interval`` apart and back off by
    :data:`DHT_BACKOFF_FACTOR` to ``interval`` (the network walks) or to
    :data:`DHT_QUICK_INTERVAL` (the quick searches of connected peers); the
    provides and the walks run in the background, one of each at a time, so
    neither holds back a quick search. The backoff restarts (and a round runs
    at once) when the key set changes or a bootstrap peer is (re)added. Every step is time-bounded and its errors are logged, never
    raised. ``send_channel`` is not closed here; if its receiver is closed,
    this logs and returns.

    :param rendezvous_keys: returns raw rendezvous keys (hashed with
        :func:`content_key` before use).
    :param bootstrap: multiaddrs ending in ``/p2p/<id>`` (or ``PeerInfo``s);
        our own id is skipped.
    :raises ValueError: a bootstrap entry has no peer id (before ``started``).
    """
    state = _DhtState(
        bootstrap=[
            info for info in map(_as_peer_info, bootstrap) if info.peer_id != node.peer_id
        ]
    )
    initial_interval = min(initial_interval, interval)
    async with trio.open_nursery() as nursery:
        if state.bootstrap:
            nursery.start_soon(_dht_bootstrap_loop, dht, state, initial_interval, interval)
        task_status.started()
        _log.info(
            "dht discovery started",
            advertise=advertise,
            search=search,
            bootstrap=[str(i.peer_id) for i in state.bootstrap],
        )
        delay = initial_interval
        background = _Once(nursery)
        walks = _Backoff(initial_interval, interval)
        while True:
            round_started = trio.current_time()
            speed_up = False
            if state.kick.is_set():
                state.kick = trio.Event()
                state.provided.clear()
                state.walked.clear()
                speed_up = True
            try:
                keys = [bytes(k) for k in rendezvous_keys()]
            except Exception as exc:
                _log.warning("dht: rendezvous_keys() failed; reusing last keys", error=repr(exc))
                keys = state.keys
            if keys != state.keys:
                speed_up = speed_up or bool(state.keys)  # a rotation, not the first round
                _forget_old_keys(dht, state, keys)
                state.keys = keys
            if speed_up:
                delay = initial_interval
                walks.restart()
            # The provide and the walk go on in the background (one of each at a time): either
            # can wait on peers it cannot dial, and must not hold back the next quick search.
            if advertise:
                await _dht_provide(dht, state, walk=False)
                background.start_once("provide", functools.partial(_dht_provide, walk=True), dht, state)
            if search:
                if not await _dht_search(dht, state, send_channel, walk=False):
                    nursery.cancel_scope.cancel()
                    return
                if walks.due():
                    background.start_once("walk", _dht_walk, dht, state, send_channel, nursery.cancel_scope)
            with trio.move_on_at(round_started + min(delay, DHT_QUICK_INTERVAL)):
                await state.kick.wait()
            delay = min(delay * DHT_BACKOFF_FACTOR, interval)


class _Once:
    """Background tasks in one nursery, at most one of each name running at a time."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._running: set[str] = set()

    def start_once(self, name: str, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        if name in self._running:
            return
        self._running.add(name)

        async def run() -> None:
            try:
                await fn(*args)
            finally:
                self._running.discard(name)

        self._nursery.start_soon(run)


class _Backoff:
    """When the next network walk is due: ``initial`` s apart, growing to ``interval``."""

    def __init__(self, initial: float, interval: float) -> None:
        self._initial, self._interval = initial, interval
        self._delay = initial
        self._next = 0.0

    def restart(self) -> None:
        self._delay, self._next = self._initial, 0.0

    def due(self) -> bool:
        now = trio.current_time()
        if now < self._next:
            return False
        self._next = now + self._delay
        self._delay = min(self._delay * DHT_BACKOFF_FACTOR, self._interval)
        return True


async def _dht_walk(
    dht: NodeDHT, state: _DhtState, send_channel: trio.MemorySendChannel[Candidate], stop: trio.CancelScope
) -> None:
    """One network walk for every key (see :func:`_dht_search`); ``stop`` if the receiver is gone."""
    if not await _dht_search(dht, state, send_channel, walk=True):
        stop.cancel()


async def _dht_bootstrap_loop(
    dht: NodeDHT, state: _DhtState, initial_interval: float, interval: float
) -> None:
    """Keep the bootstrap peers connected and in the routing table (forever)."""
    delay = initial_interval
    while True:
        if await _dht_bootstrap(dht, state):
            delay = initial_interval
        await trio.sleep(delay)
        delay = min(delay * DHT_BACKOFF_FACTOR, interval)


async def _dht_bootstrap(dht: NodeDHT, state: _DhtState) -> bool:
    """Dial bootstrap peers that are not connected or not in the routing table.

    Dials run concurrently; each success sets ``state.kick`` at once (a slow
    or dead bootstrap peer does not hold back the others).

    :return: ``True`` if at least one of them was (re)added.
    """
    connected = set(dht.node.connected_peers())
    in_table = set(dht.routing_table_peers())
    added = False

    async def one(info: PeerInfo) -> None:
        nonlocal added
        try:
            with trio.move_on_after(DHT_CONNECT_TIMEOUT):
                if await dht.add_peer(info):
                    _log.info("dht: bootstrap peer added", peer_id=str(info.peer_id))
                    state.unreachable.discard(info.peer_id)
                    state.kick.set()
                    added = True
                return
            raise TimeoutError(f"no connection within {DHT_CONNECT_TIMEOUT} s")
        except Exception as exc:
            _forget_addrs(dht, info.peer_id)
            if info.peer_id not in state.unreachable:
                _log.warning(
                    "dht: bootstrap peer unreachable; will retry",
                    peer_id=str(info.peer_id),
                    addrs=[str(a) for a in info.addrs],
                    error=repr(exc),
                )
            state.unreachable.add(info.peer_id)

    async with trio.open_nursery() as nursery:
        for info in state.bootstrap:
            if info.peer_id not in connected or info.peer_id not in in_table:
                nursery.start_soon(one, info)
    return added


def _forget_old_keys(dht: NodeDHT, state: _DhtState, keys: list[bytes]) -> None:
    """Stop tracking keys of past epochs (ours, and KadDHT's 22 h republisher's)."""
    current = set(keys)
    for provided in (state.provided, state.walked):
        for old in [k for k in provided if k not in current]:
            del provided[old]
    if state.keys:
        providing = dht.kad.provider_store.providing_keys
        for old in set(state.keys) - current:
            providing.discard(content_key(old))


async def _dht_provide(dht: NodeDHT, state: _DhtState, *, walk: bool) -> None:
    """Provide every key that is due (see :func:`run_dht_discovery`), all keys at once.

    Without ``walk`` (every round, quick): to the connected DHT peers
    (:meth:`NodeDHT.advertise_near`). With ``walk`` (in the background): to the k
    closest (:meth:`NodeDHT.advertise`), bounded by :data:`DHT_OPERATION_TIMEOUT`.
    Each kind keeps its own record of when it last reached a peer.
    """
    provided = state.walked if walk else state.provided
    now = time.monotonic()

    async def provide(key: bytes, last: float | None) -> None:
        ok = False
        try:
            with trio.move_on_after(DHT_OPERATION_TIMEOUT):
                ok = await (dht.advertise(key) if walk else dht.advertise_near(key))
        except Exception as exc:
            _log.warning("dht: provide failed", error=repr(exc))
        if ok:
            if last is None and not walk:
                _log.info("dht: advertised rendezvous key", key=content_key(key).hex()[:16])
            provided[key] = time.monotonic()
        else:
            _log.debug("dht: provide reached no peer yet", key=content_key(key).hex()[:16], walk=walk)

    async with trio.open_nursery() as nursery:
        for key in list(state.keys):
            last = provided.get(key)
            if last is None or now - last >= DHT_REPROVIDE_INTERVAL:
                nursery.start_soon(provide, key, last)


async def _dht_search(
    dht: NodeDHT, state: _DhtState, send_channel: trio.MemorySendChannel[Candidate], *, walk: bool
) -> bool:
    """Look up providers of every key (all at once) and send new/changed/stale candidates.

    Without ``walk`` (every round): our store and the routing-table peers this node is
    connected to, bounded by one query's timeout. A worker behind a NAT is found this
    way, through the relay it bootstrapped from. With ``walk`` (in the background,
    on the round backoff): the network walk too, bounded by :data:`DHT_OPERATION_TIMEOUT`;
    it can spend all of it on peers nobody can dial (private addresses behind NATs).

    :return: ``False`` if the candidate receiver is gone (stop the loop).
    """
    found: dict[ID, list[Multiaddr]] = {}

    async def lookup(key: bytes) -> None:
        try:
            await _lookup_providers(dht, key, DHT_MAX_PROVIDERS, found, walk=walk)
        except Exception as exc:
            _log.warning("dht: provider lookup failed", error=repr(exc))

    with trio.move_on_after(DHT_OPERATION_TIMEOUT if walk else KAD_QUERY_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for key in list(state.keys):
                nursery.start_soon(lookup, key)
    return await _send_candidates(dht, state, found, send_channel)


async def _send_candidates(
    dht: NodeDHT,
    state: _DhtState,
    found: dict[ID, list[Multiaddr]],
    send_channel: trio.MemorySendChannel[Candidate],
) -> bool:
    """Send the providers in ``found`` that are new, changed, or last sent long ago.

    :return: ``False`` if the candidate receiver is gone.
    """
    now = time.monotonic()
    for peer, candidates in found.items():
        addrs = advertisable_addrs(candidates)
        if peer == dht.node.peer_id or not addrs:
            continue
        signature = tuple(sorted(str(a) for a in addrs))
        previous = state.emitted.get(peer)
        if previous is not None and previous[0] == signature and now - previous[1] < DHT_REEMIT_INTERVAL:
            continue
        state.emitted[peer] = (signature, now)
        candidate = Candidate(peer_id=peer, addrs=tuple(addrs), source="dht")
        if previous is None:
            _log.info("dht: found provider", peer_id=str(peer), addrs=list(signature))
        try:
            await send_channel.send(candidate)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            _log.warning("dht: candidate receiver closed; stopping dht discovery")
            return False
    return True
