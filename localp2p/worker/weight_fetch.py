"""A worker fills its tensor cache as a load starts: from its own model files, from peers, from the server.

The server sends a plan (``/localp2p/weights/1.0.0``, :mod:`localp2p.p2p.tensor_stream`):
the tensors (by llama.cpp hash) this worker's layers need, and the token holders
that may have them. :func:`fill_cache` then, for each tensor not in the cache yet:

1. copies it from a local GGUF file that the model index says holds it (``--models-path``);
2. else fetches it over tensor streams from the peers that have it (asked first with
   one "have" request each), several tensors at once from several peers: each peer
   has SLOTS_PER_SOURCE fetches running and takes the next tensor as soon as one
   ends, so faster peers send more. The server sends at most SERVER_SHARE of what a
   worker fetches while worker peers can send the rest (its uplink is the one every
   worker shares), and everything no worker peer can send.

The fill runs while llama.cpp loads: the worker's tensor gate (:mod:`localp2p.worker.tensor_gate`)
holds llama.cpp's request for a tensor until the fill has placed it, and both go in file
order, so llama.cpp takes each tensor from the cache right behind the fill.

Every tensor is checked against its hash before it enters the cache (TensorStore).
One that fails is fetched again from another source, and the peer that sent it is
logged and not asked for that tensor again. A tensor no source could deliver is left
to llama.cpp, which sends it through the tunnel as before: the plan only ever saves
bytes, it never decides what the model holds. A fill that is interrupted (the worker
killed, the server gone) resumes at the next plan with what the cache holds by then.
"""

from __future__ import annotations

import functools
import os
import pathlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from localp2p.llama.fnv import FnvUnavailable, Hasher
from localp2p.llama.model_index import IndexedTensor, ModelIndex, holdings
from localp2p.logs import get_logger
from localp2p.p2p.auth import AuthGate
from localp2p.p2p.node import P2PNode
from localp2p.p2p.streams import remote_peer_id
from localp2p.p2p.tensor_stream import (
    Locate,
    TensorStreamError,
    ask_have,
    get_tensor,
    parse_hash,
    read_message,
    write_message,
)
from localp2p.worker.tensor_cache import CacheGuard, cache_min_free
from localp2p.worker.tensor_gate import TensorGate
from localp2p.worker.tensor_store import NoRoom, PartialTensor, TensorMismatch, TensorStore

log = get_logger("weights")

#: Fetches running at once per source: two keep a peer's pipe busy while the other's
#: request is on its way; more would only split its bandwidth.
SLOTS_PER_SOURCE = 2
#: Most of a worker's fetched bytes the server sends while worker peers have the tensors:
#: its uplink adds bandwidth to theirs (it is often the fastest source), but it is shared by
#: every worker, and the point of the swarm is to spare it (issue 16's goal: ≤ 40 %).
SERVER_SHARE = 0.3
#: Local copies (copy, then hash check) running at once: the hash is one core's work per tensor.
LOCAL_COPIES = max(1, min(4, os.cpu_count() or 1))
#: Seconds to dial and authenticate a peer named in a plan before doing without it.
CONNECT_TIMEOUT = 5.0
#: Seconds between progress messages to the server.
PROGRESS_INTERVAL = 0.5
#: Peers named in a plan, at most (a plan is the server's word, but bounded all the same).
MAX_SOURCES = 64


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    hash: int
    size: int


@dataclass
class Source:
    peer_id: ID
    name: str
    role: str  # "server" | "worker"
    addrs: list[Multiaddr]
    has: set[int] = field(default_factory=set)
    alive: bool = True


@dataclass
class FillReport:
    """What a fill did, in bytes; sent to the server as progress and in the end."""

    total: int = 0
    cached: int = 0  # already in the cache
    local: int = 0  # copied from this worker's own model files
    peers: int = 0  # from other workers
    server: int = 0  # from the server
    corrupt: int = 0  # tensors whose bytes failed the hash check (fetched again elsewhere)
    held: int = 0  # llama.cpp requests the tensor gate held until their tensor was in place
    bad_peers: set[str] = field(default_factory=set)
    done: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def missing(self) -> int:
        """Bytes not in the cache: llama.cpp sends them through the tunnel."""
        return max(0, self.total - self.cached - self.local - self.peers - self.server)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "cached": self.cached,
            "local": self.local,
            "peers": self.peers,
            "server": self.server,
            "missing": self.missing,
            "corrupt": self.corrupt,
            "held": self.held,
            "bad_peers": sorted(self.bad_peers),
            "seconds": round(time.monotonic() - self.started, 2),
            "done": self.done,
        }


def parse_plan(plan: dict[str, Any]) -> tuple[list[PlannedTensor], list[Source]]:
    """The tensors and sources of a plan message. :raises TensorStreamError: malformed."""
    try:
        tensors = [PlannedTensor(str(n), parse_hash(h), int(s)) for n, h, s in plan["tensors"]]
        sources = [
            Source(ID.from_base58(str(s["peer_id"])), str(s.get("name", "")), str(s["role"]), [Multiaddr(a) for a in s.get("addrs", [])])
            for s in plan.get("sources", [])[:MAX_SOURCES]
        ]
    except TensorStreamError:
        raise
    except Exception as exc:  # KeyError, ValueError, multiaddr errors ...
        raise TensorStreamError(f"malformed plan ({type(exc).__name__}: {exc})") from None
    return tensors, sources


async def _place_local(store: TensorStore, local: dict[int, tuple[str, IndexedTensor]], t: PlannedTensor, report: FillReport) -> bool:
    held = local.get(t.hash)
    if held is None or held[1].size != t.size:
        return False
    path, indexed = held
    try:
        await trio.to_thread.run_sync(store.place_from_file, t.hash, t.size, path, indexed.offset)
    except TensorMismatch as exc:
        log.warning(
            "local model file does not match its index (changed on disk?); fetching the tensor instead",
            path=path,
            tensor=t.name,
            error=str(exc),
        )
        return False
    except OSError as exc:
        log.warning("cannot copy a tensor from the local model file", path=path, tensor=t.name, error=str(exc))
        return False
    report.local += t.size
    return True


async def _connect(node: P2PNode, gate: AuthGate, source: Source) -> bool:
    """Dial and authenticate ``source`` (bounded); False, logged, when it cannot be reached."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            if not node.host.get_network().get_connections(source.peer_id):
                await node.connect(PeerInfo(source.peer_id, source.addrs))
            if not gate.is_authenticated(source.peer_id):
                await gate.authenticate(node, source.peer_id)
    except Exception as exc:
        log.info(
            "weight source unreachable; doing without it", peer=source.name or str(source.peer_id), error=f"{type(exc).__name__}: {exc}"
        )
        return False
    return True


async def _fetch_one(node: P2PNode, store: TensorStore, source: Source, t: PlannedTensor, gate: TensorGate) -> None:
    """One tensor from ``source`` into the cache, checked. Raises TensorStreamError, TensorMismatch, NoRoom, OSError."""
    part: PartialTensor = await trio.to_thread.run_sync(store.begin, t.hash, t.size)
    try:

        async def sink(offset: int, chunk: bytes) -> None:
            await trio.to_thread.run_sync(part.write_at, offset, chunk)
            gate.progressed()

        await get_tensor(node, source.peer_id, t.hash, t.size, sink)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(part.abort)
        raise
    await trio.to_thread.run_sync(part.commit)


async def _fetch_remote(
    node: P2PNode,
    gate: AuthGate,
    store: TensorStore,
    todo: list[PlannedTensor],
    sources: list[Source],
    report: FillReport,
    tensor_gate: TensorGate,
) -> None:
    """Fetch ``todo`` from ``sources`` (see the module doc); returns when nothing more can be fetched."""
    async with trio.open_nursery() as nursery:
        for source in sources:
            nursery.start_soon(_learn_holdings, node, gate, source, todo)
    pending = {t.hash: t for t in todo}
    remote_total = sum(t.size for t in todo)
    server_in_flight = 0  # bytes the server is sending now
    in_flight: set[int] = set()
    failed_from: dict[int, set[ID]] = {}
    changed = trio.Event()

    def wake() -> None:
        nonlocal changed
        changed.set()
        changed = trio.Event()

    def can_send(source: Source, h: int) -> bool:
        return source.alive and h in source.has and source.peer_id not in failed_from.get(h, set())

    def pick(source: Source) -> PlannedTensor | None:
        for h, t in pending.items():
            if h in in_flight or not can_send(source, h):
                continue
            if (
                source.role == "server"
                and any(can_send(s, h) for s in sources if s.role != "server")
                and report.server + server_in_flight + t.size > SERVER_SHARE * remote_total
            ):
                continue  # a worker peer has it, and the server has sent its share: spare its uplink
            return t
        return None

    def hopeless(source: Source) -> bool:
        """Nothing pending that this source could ever send, and nothing in flight that might come back."""
        return not in_flight and not any(can_send(source, h) for h in pending)

    async def slot(source: Source) -> None:
        nonlocal server_in_flight
        while source.alive and pending:
            t = pick(source)
            if t is None:
                if hopeless(source):
                    return
                await changed.wait()
                continue
            in_flight.add(t.hash)
            from_server = t.size if source.role == "server" else 0
            server_in_flight += from_server
            try:
                await _fetch_one(node, store, source, t, tensor_gate)
            except TensorMismatch as exc:
                report.corrupt += 1
                report.bad_peers.add(source.name or str(source.peer_id))
                failed_from.setdefault(t.hash, set()).add(source.peer_id)
                log.warning(
                    "a peer sent a tensor that fails its hash check; fetching it elsewhere",
                    peer=source.name,
                    peer_id=str(source.peer_id),
                    tensor=t.name,
                    error=str(exc),
                )
            except NoRoom as exc:
                log.warning("tensor cache disk has no room; the rest of the weights come the old way", error=str(exc))
                pending.clear()
            except (TensorStreamError, OSError) as exc:
                failed_from.setdefault(t.hash, set()).add(source.peer_id)
                log.info("tensor fetch failed; trying another source", peer=source.name, tensor=t.name, error=str(exc))
                if "does not have" not in str(exc):
                    source.alive = False  # a broken stream or a stall: this peer is gone for this fill
            else:
                pending.pop(t.hash, None)
                tensor_gate.release(t.hash)
                if source.role == "server":
                    report.server += t.size
                else:
                    report.peers += t.size
            finally:
                in_flight.discard(t.hash)
                server_in_flight -= from_server
                wake()

    async with trio.open_nursery() as nursery:
        for source in sources:
            if source.has:
                for _ in range(SLOTS_PER_SOURCE):
                    nursery.start_soon(slot, source)


async def _learn_holdings(node: P2PNode, gate: AuthGate, source: Source, todo: list[PlannedTensor]) -> None:
    if not await _connect(node, gate, source):
        source.alive = False
        return
    try:
        source.has = await ask_have(node, source.peer_id, [t.hash for t in todo])
    except TensorStreamError as exc:
        log.info("weight source did not say what it has; doing without it", peer=source.name, error=str(exc))
        source.alive = False


async def fill_cache(
    node: P2PNode,
    gate: AuthGate,
    store: TensorStore,
    local: dict[int, tuple[str, IndexedTensor]],
    tensors: list[PlannedTensor],
    sources: list[Source],
    report: FillReport,
    tensor_gate: TensorGate | None = None,
) -> None:
    """Put ``tensors`` into the cache (see the module doc); ``report`` counts as it goes.

    ``tensor_gate``: the worker's tensor gate, armed with ``tensors`` by the caller (who
    releases what is left when this returns); each is released here as it is placed, so a
    request llama.cpp makes meanwhile waits for its tensor, never for the whole fill.
    Never raises for a source's failure or a bad tensor (those are logged and the
    tensor left to llama.cpp); Cancelled propagates, leaving no partial file behind.
    """
    gate_ = tensor_gate if tensor_gate is not None else TensorGate()
    report.total = sum(t.size for t in tensors)
    todo: list[PlannedTensor] = []
    in_order = iter(tensors)  # plan order: the order llama.cpp asks for them

    async def place() -> None:
        for t in in_order:
            if await trio.to_thread.run_sync(store.has, t.hash, t.size):
                report.cached += t.size
            elif not await _place_local(store, local, t, report):
                todo.append(t)
                continue
            gate_.release(t.hash)
            gate_.progressed()

    async with trio.open_nursery() as nursery:
        for _ in range(LOCAL_COPIES):
            nursery.start_soon(place)
    order = {t.hash: i for i, t in enumerate(tensors)}
    todo.sort(key=lambda t: order[t.hash])  # plan order: llama.cpp loads in file order
    if todo:
        await _fetch_remote(node, gate, store, todo, [s for s in sources if s.peer_id != node.peer_id], report, gate_)
    report.done = True


async def _fill_and_report(stream: INetStream, report: FillReport, gone: list[str], fill: Callable[[], Awaitable[None]]) -> None:
    """Run ``fill`` while sending ``report`` every PROGRESS_INTERVAL s, the first at once (the
    plan is taken); a server gone (its error appended to ``gone``) cancels the fill."""
    async with trio.open_nursery() as nursery:

        async def progress() -> None:
            try:
                while True:
                    await write_message(stream, report.as_dict())
                    await trio.sleep(PROGRESS_INTERVAL)
            except TensorStreamError as exc:
                gone.append(str(exc))
                nursery.cancel_scope.cancel()

        nursery.start_soon(progress)
        await fill()
        nursery.cancel_scope.cancel()


def weights_handler(
    gate: AuthGate,
    node_of: Callable[[], P2PNode],
    store: TensorStore,
    local: Callable[[], dict[int, tuple[str, IndexedTensor]]],
    on_report: Callable[[FillReport], Awaitable[None]] | None = None,
    tensor_gate: TensorGate | None = None,
) -> Callable[[INetStream], Awaitable[None]]:
    """The worker's :data:`~localp2p.p2p.tensor_stream.WEIGHTS_PROTOCOL` handler (servers only).

    Reads the plan, arms ``tensor_gate`` (the tunnel's, :mod:`localp2p.worker.tensor_gate`) with its tensors and says
    so at once (the first progress message: the server may start llama.cpp's load),
    runs :func:`fill_cache` (one fill at a time), and sends progress every
    PROGRESS_INTERVAL s and a last message with ``done``. Never raises except
    Cancelled; a server that goes away cancels the fill.
    """
    gate_ = tensor_gate if tensor_gate is not None else TensorGate()
    lock = trio.Lock()

    async def handle_weights(stream: INetStream) -> None:
        if not await gate.require(stream, role="server"):
            return
        server = remote_peer_id(stream)
        try:
            tensors, sources = parse_plan(await read_message(stream))
        except TensorStreamError as exc:
            log.warning("bad weight plan from the server", server=str(server), error=str(exc))
            return
        for s in sources:
            if s.peer_id == server:
                s.role = "server"
        report = FillReport()
        async with lock:
            gone: list[str] = []
            gate_.arm(t.hash for t in tensors)
            held_before = gate_.held
            try:
                fill = functools.partial(fill_cache, node_of(), gate, store, local(), tensors, sources, report, gate_)
                await _fill_and_report(stream, report, gone, fill)
            finally:  # requests still held wait no more; later ones find the cache as the fill left it
                gate_.release_all(t.hash for t in tensors)
            report.held = gate_.held - held_before
            if not gone:
                try:
                    await write_message(stream, report.as_dict())
                except TensorStreamError as exc:
                    gone.append(str(exc))
            if gone:
                log.info("weight plan stream ended before the fill did", server=str(server), error=gone[0])
        log.info(
            "weights in place",
            local_mib=round(report.local / 2**20, 1),
            peers_mib=round(report.peers / 2**20, 1),
            server_mib=round(report.server / 2**20, 1),
            cached_mib=round(report.cached / 2**20, 1),
            left_to_llama_mib=round(report.missing / 2**20, 1),
            corrupt=report.corrupt,
            held_requests=report.held,
            seconds=round(time.monotonic() - report.started, 2),
        )
        if on_report is not None:
            await on_report(report)

    return handle_weights


def worker_locate(store: TensorStore, local: Callable[[], dict[int, tuple[str, IndexedTensor]]]) -> Locate:
    """Where this worker can send a tensor from: its model files, else its cache (blocking)."""

    def locate(hash_: int) -> tuple[str, int, int] | None:
        held = local().get(hash_)
        if held is not None:
            return held[0], held[1].offset, held[1].size
        path = store.path_of(hash_)
        try:
            return str(path), 0, path.stat().st_size
        except OSError:
            return None

    return locate


@dataclass
class WorkerWeights:
    """A worker's weight sources: its tensor cache and its indexed model files."""

    store: TensorStore
    models: list[Any]  # IndexedModel
    local: dict[int, tuple[str, IndexedTensor]]
    gate: TensorGate = field(default_factory=TensorGate)

    def announce(self) -> list[dict[str, str]]:
        """The hello's ``models``: content id and file name of each model held (at most MAX_ANNOUNCED)."""
        return [{"id": m.content_id, "file": pathlib.Path(m.path).name[:80]} for m in self.models[:MAX_ANNOUNCED]]

    def locate(self) -> Locate:
        return worker_locate(self.store, lambda: self.local)

    async def place_all(self) -> FillReport:
        """Copy every cacheable tensor of the local model files into the cache (static workers: no plan comes)."""
        report = FillReport()
        tensors = [PlannedTensor(t.name, h, t.size) for h, (_, t) in self.local.items()]
        report.total = sum(t.size for t in tensors)
        for t in tensors:
            if await trio.to_thread.run_sync(self.store.has, t.hash, t.size):
                report.cached += t.size
            elif not await _place_local(self.store, self.local, t, report):
                break  # no room, or a file that changed: the rest loads the old way
        report.done = True
        return report


#: Models listed in a worker's hello (the hello is small; more are still served).
MAX_ANNOUNCED = 16


async def open_worker_weights(
    cache_dir: str, models_path: str | None, state_dir: pathlib.Path, guard: CacheGuard | None
) -> WorkerWeights | None:
    """The worker's weights: the cache dir prepared, ``models_path``'s GGUF files indexed.

    None (with one warning) when the tensor hash cannot be built: the worker then
    loads the old way. Indexing a new file reads it whole (about 1 s per GB); an
    unchanged one is read from the saved index.
    """
    try:
        hasher = Hasher(state_dir / "native")
    except FnvUnavailable as exc:
        log.warning("weights load the old way (no local copies, no fetching)", reason=str(exc))
        return None
    store = TensorStore(cache_dir, hasher, guard, cache_min_free())
    removed = await trio.to_thread.run_sync(store.prepare)
    if removed:
        log.info("removed unfinished tensor files", cache_dir=cache_dir, files=removed)
    models: list[Any] = []
    if models_path:
        index = ModelIndex(state_dir / "model-index", hasher)
        started = time.monotonic()
        models = await trio.to_thread.run_sync(index.scan, models_path)
        log.info(
            "local models",
            models_path=models_path,
            models=[f"{pathlib.Path(m.path).name}={m.content_id}" for m in models],
            seconds=round(time.monotonic() - started, 2),
            hash_seconds=round(index.hash_seconds, 2),
        )
    return WorkerWeights(store, models, holdings(models))
