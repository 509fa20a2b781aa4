"""The worker set: who is live, their tunnel ports and facts — the single source of truth.

Server side of p2p mode. :class:`WorkerSet` holds one :class:`Worker` per peer that
proved the token and said it is a worker; :class:`WorkerAttacher` turns discovery
candidates into attached workers (connect, authenticate, claim by ping, open a
tunnel listener) and detaches them when their pings stop. Everything else — the
supervisor's reloads, ``/api/p2p``, metrics — only reads the set.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from localp2p.llama.burst import RpcBurstFraming
from localp2p.llama.devices import announced_devices
from localp2p.logs import get_logger
from localp2p.p2p.attendance import PeerAttendance
from localp2p.p2p.auth import AuthError, AuthGate
from localp2p.p2p.links import Links
from localp2p.p2p.liveness import MAX_MISSED, PING_INTERVAL, Pinger, PingFailed, PingFailure
from localp2p.p2p.node import P2PNode
from localp2p.p2p.tunnel import REFUSED_BUSY, TunnelStats, serve_tunnel

log = get_logger("workers")

#: Seconds to connect and authenticate a candidate before giving up on this attempt
#: (milliseconds on a LAN; an unplugged peer must not hold the next attempt back long).
ATTACH_TIMEOUT = 5.0
#: Seconds before a peer that failed to attach (or went away) is tried again: short at
#: first (a worker back from a blip returns quickly), doubling up to the max for a peer
#: that stays away. The max bounds how long a worker whose link comes back (nothing is
#: announced then) waits for its next attempt; an attempt costs one dial on the LAN.
RETRY_MIN = 1.0
RETRY_MAX = 2.0
#: Seconds to close a connection that failed an attempt (it may be dead: a link that went
#: down leaves it open, and new attempts would reuse it instead of dialing afresh).
HANG_UP_TIMEOUT = 1.0
#: Seconds before the next ping after one that failed at once (connection refused or
#: reset: the worker process is likely gone), so a stopped worker is dropped in ~2 s.
FAST_FAILURE_RETRY = 0.5
#: Seconds between pings to a worker that is busy with another server.
BUSY_RECHECK = 5.0

ONLINE, BUSY, OFFLINE, CONNECTING = "online", "busy", "offline", "connecting"


@dataclass
class Worker:
    """What the server knows about one worker."""

    peer_id: str
    name: str = ""
    addrs: list[str] = field(default_factory=list)
    source: str = ""
    state: str = CONNECTING
    last_seen: float | None = None  # wall clock, for people
    tunnel_port: int | None = None
    memory_free: int = 0
    memory_total: int = 0
    rpc_protocol: str = ""
    #: The ggml devices its rpc-server serves, as it announced them (Device.as_dict()).
    devices: list[dict[str, Any]] = field(default_factory=list)
    #: The models whose GGUF files it holds, as it announced them (``{"id": content id, "file": name}``).
    models: list[dict[str, str]] = field(default_factory=list)
    #: Whether it fills a tensor cache before a load when told which tensors (localp2p.worker.weight_fetch).
    fills_cache: bool = False
    rtt_ms: float | None = None
    #: How the server is connected to it: "direct", "hole-punched" or "relayed" (None: not connected).
    link: str | None = None
    #: The relay's peer id while a relayed connection to it is open: :attr:`link` is
    #: "relayed", or "hole-punched" while streams opened before the punch still use it.
    relay: str | None = None
    stats: TunnelStats = field(default_factory=TunnelStats)

    @property
    def endpoint(self) -> str | None:
        return f"127.0.0.1:{self.tunnel_port}" if self.state == ONLINE and self.tunnel_port else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "name": self.name,
            "addrs": list(self.addrs),
            "source": self.source,
            "state": self.state,
            "online": self.state == ONLINE,
            "last_seen": self.last_seen,
            "tunnel_port": self.tunnel_port if self.state == ONLINE else None,
            "memory_free": self.memory_free,
            "memory_total": self.memory_total,
            "rpc_protocol": self.rpc_protocol,
            "devices": [dict(d) for d in self.devices],
            "models": [dict(m) for m in self.models],
            "rtt_ms": self.rtt_ms,
            "link": self.link,
            "relay": self.relay,
            "bytes_sent": self.stats.bytes_sent,
            "bytes_received": self.stats.bytes_received,
            "connections_open": self.stats.connections_open,
        }


class WorkerSet:
    """The live workers and a change signal. Owned by the server; read by everyone else."""

    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}
        self._changed = trio.Event()
        self.version = 0
        #: Times a live worker's link moved from a relay to a direct path (see :meth:`note_upgrade`).
        self.upgrades = 0
        #: Peers not in the set yet whose first attach is under way (see :meth:`attaching`).
        self._attaching: set[str] = set()

    def get(self, peer_id: str) -> Worker | None:
        return self._workers.get(peer_id)

    def upsert(self, worker: Worker) -> Worker:
        existing = self._workers.setdefault(worker.peer_id, worker)
        return existing

    def all(self) -> list[Worker]:
        return sorted(self._workers.values(), key=lambda w: w.peer_id)

    def live(self) -> list[Worker]:
        return [w for w in self.all() if w.state == ONLINE]

    def bytes_sent(self) -> int:
        """Bytes sent to all workers through their tunnels so far (server → workers)."""
        return sum(w.stats.bytes_sent for w in self._workers.values())

    def settled(self) -> bool:
        """Whether nothing is on its way: every known worker is online (or busy with another
        server) and no new peer is attaching. A reload need not wait for anyone then."""
        return not self._attaching and all(w.state in (ONLINE, BUSY) for w in self._workers.values())

    @contextlib.contextmanager
    def attaching(self, peer_id: str) -> Iterator[None]:
        """Count ``peer_id`` as attaching while the block runs: a peer not in the set yet
        whose first attach is under way (the set is not :meth:`settled` meanwhile)."""
        self._attaching.add(peer_id)
        try:
            yield
        finally:
            self._attaching.discard(peer_id)

    def endpoints(self) -> tuple[str, ...]:
        """``LLAMACPP_GRPC_SERVERS`` for the backend: the live workers' tunnel ends, stable order."""
        return tuple(w.endpoint for w in self.live() if w.endpoint)

    def set_state(self, worker: Worker, state: str) -> None:
        if worker.state != state:
            log.info("worker " + state, peer_id=worker.peer_id, name=worker.name, tunnel_port=worker.tunnel_port)
            worker.state = state
            self.notify()

    def notify(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    def note_upgrade(self, worker: Worker) -> None:
        """``worker``'s link moved from a relay to a direct path: its tunnel's open connections
        stay on the relay until the backend reopens them (follow_worker_set asks for that)."""
        if worker.state == ONLINE:
            self.upgrades += 1
            self.notify()

    async def wait_changed(self, seen_version: int) -> int:
        """Return the version once it differs from ``seen_version``."""
        while self.version == seen_version:
            await self._changed.wait()
        return self.version

    async def wait_for(self, count: int) -> None:
        """Return once at least ``count`` workers are online."""
        while len(self.live()) < count:
            await self.wait_changed(self.version)


class WorkerAttacher(PeerAttendance):
    """Turns candidates into attached workers and keeps each one's tunnel and pings running.

    One task per peer (in the attacher's nursery) owns that peer's connection
    attempts, tunnel listener and liveness; the set only stores the results.
    """

    role = "worker"

    def __init__(self, node: P2PNode, gate: AuthGate, workers: WorkerSet, links: Links | None = None) -> None:
        super().__init__(node)
        self.gate = gate
        self.workers = workers
        #: Dials through relays when direct fails, and says how each worker is connected.
        self.links = links
        #: Peers that proved the token with another role: not attended again.
        self._non_workers: set[str] = set()

    def _skip(self, key: str) -> bool:
        return key in self._non_workers

    async def _attend(self, peer_id: ID, source: str, name: str | None) -> None:
        """Own one peer for as long as the server runs: attach, watch, re-attach.

        Failed attempts start at most every RETRY_MIN seconds, doubling to RETRY_MAX
        (an attempt that ran into a timeout has waited already: the time it took counts),
        and at once when discovery announces the peer again (see :meth:`run`).
        """
        key = str(peer_id)
        delay = RETRY_MIN
        try:
            while True:
                self._announced[key] = trio.Event()
                started = trio.current_time()
                worker = await self._attach(peer_id, source, name)
                if worker is None:
                    if key in self._non_workers:
                        return
                    await self._back_off(key, delay - (trio.current_time() - started))
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                delay = RETRY_MIN
                await self._serve(peer_id, worker)
                await self._hang_up(peer_id)  # it stopped answering: its connection may be dead
                self._announced[key] = trio.Event()  # an announcement while it was served is old news
                await self._back_off(key, delay)
        finally:
            self._attending.discard(key)
            self._announced.pop(key, None)

    async def _back_off(self, key: str, delay: float) -> None:
        """Sleep ``delay`` seconds (none if negative), or less when the peer is announced again meanwhile."""
        with trio.move_on_after(max(0.0, delay)):
            await self._announced[key].wait()

    async def _attach(self, peer_id: ID, source: str, name: str | None) -> Worker | None:
        """One attempt to connect, authenticate and describe ``peer_id``; None when it failed.

        Attempts are paced by :meth:`_attend`, so py-libp2p's own refusal to re-dial a
        peer whose last dial failed (its negative cache, 60 s) is lifted first: a
        worker back from a restart or an unplugged cable is dialed at once. A failed
        attempt closes the connection it went over, which may be dead. A peer's first
        attempts count in the set's ``attaching`` while they run.
        """
        key = str(peer_id)
        if self.workers.get(key) is not None:
            return await self._attempt(peer_id, source, name)
        with self.workers.attaching(key):
            return await self._attempt(peer_id, source, name)

    async def _attempt(self, peer_id: ID, source: str, name: str | None) -> Worker | None:
        key = str(peer_id)
        addrs = self._addrs.get(key, [])
        self._forget_dial_failure(peer_id)
        try:
            with trio.fail_after(ATTACH_TIMEOUT):
                if self.links is not None:
                    await self.links.connect(peer_id, addrs)
                else:
                    await self.node.connect(PeerInfo(peer_id, addrs))
                hello = await self.gate.authenticate(self.node, peer_id)
        except AuthError as exc:
            log.warning("peer refused: token proof failed", peer_id=key, reason=str(exc))
            await self._hang_up(peer_id)
            return None
        except Exception as exc:  # unreachable, timed out, connection reset ...
            log.debug("cannot reach peer", peer_id=key, error=f"{type(exc).__name__}: {exc}")
            worker = self.workers.get(key)
            if worker is not None:
                self.workers.set_state(worker, OFFLINE)
            await self._hang_up(peer_id)
            return None
        if hello.role != "worker":
            self._non_workers.add(key)
            return None
        worker = self.workers.upsert(Worker(peer_id=key))
        worker.name = hello.name or name or key[-8:]
        worker.addrs = [str(a) for a in addrs]
        worker.source = worker.source or source
        worker.memory_free = int(hello.extra.get("memory_free", 0) or 0)
        worker.memory_total = int(hello.extra.get("memory_total", 0) or 0)
        worker.rpc_protocol = str(hello.extra.get("rpc_protocol", ""))
        worker.devices = announced_devices(hello.extra.get("devices"))
        worker.models = _announced_models(hello.extra.get("models"))
        worker.fills_cache = hello.extra.get("fills_cache") is True
        worker.last_seen = time.time()
        return worker

    def _forget_dial_failure(self, peer_id: ID) -> None:
        """Let the next dial to ``peer_id`` happen even if the last one failed (py-libp2p's negative cache)."""
        unblock = getattr(self.node.host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(peer_id)

    async def _hang_up(self, peer_id: ID) -> None:
        """Close our connections to ``peer_id`` (bounded; a failure to close is ignored)."""
        with trio.move_on_after(HANG_UP_TIMEOUT):
            try:
                await self.node.disconnect(peer_id)
            except Exception as exc:  # already closed, reset under us ...
                log.debug("cannot close connection", peer_id=str(peer_id), error=f"{type(exc).__name__}: {exc}")

    async def _serve(self, peer_id: ID, worker: Worker) -> None:
        """Tunnel and ping one attached worker until it stops answering."""
        pinger = Pinger(self.node, peer_id)
        try:
            async with trio.open_nursery() as nursery:

                def on_refused(reason: str) -> None:
                    if reason == REFUSED_BUSY:
                        self.workers.set_state(worker, BUSY)

                worker.tunnel_port = await nursery.start(
                    lambda task_status: serve_tunnel(
                        self.node, peer_id, worker.stats, on_refused=on_refused, framing=RpcBurstFraming, task_status=task_status
                    )
                )
                await self._watch(pinger, worker)
                nursery.cancel_scope.cancel()  # closes the listener and every open relay
        finally:
            await pinger.aclose()
            worker.tunnel_port = None
            self.workers.set_state(worker, OFFLINE)

    def _note_link(self, worker: Worker) -> bool:
        """Record how the worker is connected now; True when that changed since the last look."""
        link = self.links.link_of(ID.from_base58(worker.peer_id)) if self.links is not None else None
        kind = link.kind.value if link is not None else None
        relay = link.relay if link is not None else None
        if (kind, relay) == (worker.link, worker.relay):
            return False
        was = worker.link
        worker.link, worker.relay = kind, relay
        if was is None:
            return False
        log.info("worker link changed", peer_id=worker.peer_id, name=worker.name, link=kind, relay=relay, was=was)
        if was == "relayed" and kind in ("direct", "hole-punched"):
            self.workers.note_upgrade(worker)
        return True

    async def _watch(self, pinger: Pinger, worker: Worker) -> None:
        """Ping until MAX_MISSED answers in a row are missing; keep the state current."""
        missed = 0
        while missed < MAX_MISSED:
            try:
                owned = await pinger.ping()
            except PingFailed as exc:
                missed += 1
                log.debug("ping missed", peer_id=worker.peer_id, missed=missed, error=str(exc))
                if exc.kind is not PingFailure.TIMED_OUT:
                    await trio.sleep(FAST_FAILURE_RETRY)  # failed fast (refused, reset, malformed): do not spin
                continue  # a timeout already waited
            missed = 0
            worker.last_seen = time.time()
            worker.rtt_ms = round((pinger.rtt or 0) * 1000, 2)
            if self._note_link(worker):
                await pinger.aclose()  # the next ping opens its stream on the new path: its RTT is that path's
            self.workers.set_state(worker, ONLINE if owned else BUSY)
            await trio.sleep(PING_INTERVAL if owned else BUSY_RECHECK)
        log.warning("worker stopped answering", peer_id=worker.peer_id, name=worker.name)


def _announced_models(raw: object) -> list[dict[str, str]]:
    """A hello's ``models`` (content ids a worker holds), keeping only well-formed entries."""
    if not isinstance(raw, list):
        return []
    return [
        {"id": m["id"], "file": str(m.get("file", ""))[:80]}
        for m in raw[:64]
        if isinstance(m, dict) and isinstance(m.get("id"), str) and len(m["id"]) <= 64
    ]
