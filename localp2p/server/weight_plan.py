"""Before a p2p load: tell each worker which tensors its layers need, and serve them.

The server knows, before llama.cpp loads, which layers each worker will hold: it
probes the rpc-servers (through the tunnels) as the backend will a moment later and
applies llama.cpp's split (:func:`localp2p.llama.layers.assign_layers`). From its
index of the model file (:mod:`localp2p.llama.model_index`) it sends every worker the
hashes of the cacheable tensors of its layers, with the token holders that may have
them (itself and the other workers), over ``/localp2p/weights/1.0.0``; the workers
fill their tensor caches (:mod:`localp2p.worker.weight_fetch`), reporting progress.
The backend loads as soon as every worker has said it has its plan: each worker holds
llama.cpp's request for a tensor until its fill has placed it
(:mod:`localp2p.worker.tensor_gate`), so the fills and the load overlap. The server
also serves its model's tensors on ``/localp2p/tensors/1.0.0`` to workers that no
peer can serve.

Nothing here can make a load wrong or fail: a worker that does not answer, a split
that differs from llama.cpp's by a layer, a tensor nobody could send, all end the
same way: llama.cpp sends what the worker's cache lacks through the tunnel, as before.
"""

from __future__ import annotations

import pathlib
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from localp2p.config import ModelConfig
from localp2p.llama import rpc
from localp2p.llama.fnv import FnvUnavailable, Hasher
from localp2p.llama.layers import assign_layers
from localp2p.llama.model_index import IndexedModel, IndexedTensor, ModelIndex, holdings
from localp2p.logs import get_logger
from localp2p.p2p.auth import AuthGate
from localp2p.p2p.network import Network
from localp2p.p2p.node import P2PNode
from localp2p.p2p.streams import close_or_reset, quiet_reset
from localp2p.p2p.tensor_stream import (
    TENSOR_PROTOCOL,
    WEIGHTS_PROTOCOL,
    TensorStreamError,
    read_message,
    tensor_handler,
    write_message,
)
from localp2p.server.load_progress import LoadProgress
from localp2p.server.worker_set import Worker, WorkerSet

log = get_logger("weights")

#: Seconds a worker's fill may go without a progress message before the server stops
#: waiting for it (it sends one every half second while it works).
FILL_STALL_TIMEOUT = 30.0
#: Seconds to open a worker's plan stream.
OPEN_TIMEOUT = 5.0
#: Seconds the load waits for a worker to say it has its plan (its first message, sent as
#: soon as its tensor gate is armed). Past it the load starts anyway: that worker's
#: requests are not held, and what its cache lacks by then goes through the tunnel.
ACK_TIMEOUT = 5.0
#: Seconds for the probe of an rpc-server's free memory (the split): a HELLO round trip
#: on a LAN; an rpc-server busy with a running backend never answers, and must not hold the load.
PROBE_TIMEOUT = 2.0


#: Characters of a peer id's end that tell apart workers with the same name.
PEER_ID_TAIL = 6


def worker_labels(workers: Iterable[Worker]) -> dict[str, str]:
    """Each worker's label by peer id: its name, or ``name@<peer id end>`` when another
    worker has the same name (two workers started on one machine both take its host name):
    the keys of ``load_progress.weights`` and the names in plans and logs."""
    workers = list(workers)
    counts = Counter(w.name for w in workers)
    return {w.peer_id: w.name if counts[w.name] == 1 else f"{w.name}@{w.peer_id[-PEER_ID_TAIL:]}" for w in workers}


class WeightPlanner:
    """The server's part of weight distribution. Owns the server's model index and the
    counters of tensor bytes it served; :meth:`install` registers the tensor handler."""

    def __init__(self, workers: WorkerSet, state_dir: pathlib.Path, network_of: Callable[[], Network | None]) -> None:
        """``network_of``: the server's network once it runs (None before); the tensor
        handler is installed on its node at the first :meth:`prepare`, before any plan
        is sent (so before any worker can ask)."""
        self.workers = workers
        self.state_dir = state_dir
        self._network_of = network_of
        self.node: P2PNode | None = None
        self.gate: AuthGate | None = None
        self._index: ModelIndex | None = None
        self._index_failed = False
        self._held: dict[int, tuple[str, IndexedTensor]] = {}
        #: Tensor bytes this server sent to workers over tensor streams (not the tunnels).
        self.bytes_served = 0

    def install(self, node: P2PNode, gate: AuthGate) -> None:
        """Serve the tensors of indexed models on ``node`` (token holders only)."""
        self.node, self.gate = node, gate
        node.set_handler(TENSOR_PROTOCOL, tensor_handler(gate, self._locate, self._served))

    def _served(self, peer: ID, n: int) -> None:
        self.bytes_served += n

    def _locate(self, hash_: int) -> tuple[str, int, int] | None:
        held = self._held.get(hash_)
        return None if held is None else (held[0], held[1].offset, held[1].size)

    def _model_index(self) -> ModelIndex | None:
        if self._index is None and not self._index_failed:
            try:
                self._index = ModelIndex(self.state_dir / "model-index", Hasher(self.state_dir / "native"))
            except FnvUnavailable as exc:
                self._index_failed = True
                log.warning("weights go the old way (through the tunnels only)", reason=str(exc))
        return self._index

    async def index(self, model_file: pathlib.Path) -> IndexedModel | None:
        """The server's index of ``model_file`` (hashed once, then read from disk); None when it cannot be had."""
        index = self._model_index()
        if index is None:
            return None
        try:
            model = await trio.to_thread.run_sync(index.entry, model_file)
        except (OSError, ValueError) as exc:
            log.warning("cannot index the model; weights go the old way", path=str(model_file), error=str(exc))
            return None
        self._held.update(holdings([model]))
        return model

    async def prepare(
        self,
        model: ModelConfig,
        endpoints: tuple[str, ...],
        progress: LoadProgress,
        *,
        task_status: trio.TaskStatus[trio.Event] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Have the workers among ``endpoints`` fill their caches for ``model``.

        Started with ``nursery.start``: ``started(done)`` once every worker has its plan
        (or ACK_TIMEOUT passed), so the load can begin; the fills go on in this task and
        ``done`` is set when they have all ended. Progress goes to ``progress.weights``
        (per worker label, :func:`worker_labels`). Never raises for a worker's failure (logged; llama.cpp sends
        what is missing); Cancelled propagates.
        """
        done = trio.Event()
        try:
            plans = await self._plans_for(model, endpoints)
            if not plans:
                task_status.started(done)
                return
            started = time.monotonic()
            acked = trio.Semaphore(0)
            labels = worker_labels(self.workers.live())
            async with trio.open_nursery() as nursery:
                for worker, tensors in plans:
                    label = labels.get(worker.peer_id, worker.name)
                    nursery.start_soon(self._run_plan, worker, label, tensors, progress, acked)
                with trio.move_on_after(ACK_TIMEOUT):
                    for _ in plans:
                        await acked.acquire()
                task_status.started(done)
            log.info("workers' weights ready", model=model.name, workers=len(plans), seconds=round(time.monotonic() - started, 2))
        finally:
            done.set()

    async def _plans_for(self, model: ModelConfig, endpoints: tuple[str, ...]) -> list[tuple[Worker, list[IndexedTensor]]]:
        by_endpoint = {w.endpoint: w for w in self.workers.live() if w.endpoint}
        network = self._network_of()
        if self.node is None and network is not None:
            self.install(network.node, network.gate)
        if self.node is None or not any(ep in by_endpoint and by_endpoint[ep].fills_cache for ep in endpoints):
            return []  # no worker here keeps a tensor cache: nothing to plan (and no file to hash)
        indexed = await self.index(model.model_file)
        if indexed is None:
            return []
        return await self._plans(indexed, model, endpoints, by_endpoint)

    async def _plans(
        self, indexed: IndexedModel, model: ModelConfig, endpoints: tuple[str, ...], by_endpoint: dict[str, Worker]
    ) -> list[tuple[Worker, list[IndexedTensor]]]:
        """Each worker's tensors, from llama.cpp's split over the rpc-servers that answer now."""
        free: dict[str, int | None] = {}

        async def probe(endpoint: str) -> None:
            try:
                info = await trio.to_thread.run_sync(rpc.probe, endpoint, PROBE_TIMEOUT)
            except rpc.RPCError:
                # Down (the backend will skip it too), or busy with the running backend's
                # connection (a model switched in place): a worker's announced memory stands in.
                worker = by_endpoint.get(endpoint)
                free[endpoint] = worker.memory_free if worker is not None else None
            else:
                free[endpoint] = info.memory_free

        async with trio.open_nursery() as nursery:
            for endpoint in endpoints:
                nursery.start_soon(probe, endpoint)
        used = [(endpoint, m) for endpoint in endpoints if (m := free.get(endpoint)) is not None]
        layers = {t.layer for t in indexed.tensors if t.layer is not None}
        if not used or not layers:
            return []
        n_layer = max(layers) + 1
        split = list(model.tensor_split) if len(model.tensor_split) == len(used) else [float(free) for _, free in used]
        counts = assign_layers(n_layer, split)
        plans = []
        first = 0
        for (endpoint, _), count in zip(used, counts, strict=True):
            mine = range(first, first + count)
            first += count
            worker = by_endpoint.get(endpoint)
            if worker is None or not worker.fills_cache or not count:
                continue
            tensors = [t for t in indexed.cacheable() if t.layer in mine]
            if tensors:
                plans.append((worker, tensors))
        return plans

    def _sources(self) -> list[dict[str, Any]]:
        assert self.node is not None
        sources: list[dict[str, Any]] = [
            {"peer_id": str(self.node.peer_id), "role": "server", "name": "server", "addrs": [str(a) for a in self.node.p2p_addrs()]}
        ]
        live = self.workers.live()
        labels = worker_labels(live)
        for w in live:
            sources.append({"peer_id": w.peer_id, "role": "worker", "name": labels[w.peer_id], "addrs": list(w.addrs)})
        return sources

    async def _run_plan(
        self, worker: Worker, label: str, tensors: list[IndexedTensor], progress: LoadProgress, acked: trio.Semaphore
    ) -> None:
        """Send ``worker`` its plan and follow its fill until it ends (its progress under
        ``label``); ``acked`` is released once: at the worker's first message, or when the
        plan fails before it."""
        assert self.node is not None
        answered = False
        plan = {
            "tensors": [[t.name, f"{t.hash:016x}", t.size] for t in tensors],
            "sources": [s for s in self._sources() if s["peer_id"] != worker.peer_id],
        }
        entry: dict[str, Any] = {"total": sum(t.size for t in tensors), "done": False}
        progress.weights[label] = entry
        stream: INetStream | None = None
        ok = False
        try:
            with trio.fail_after(OPEN_TIMEOUT):
                stream = await self.node.new_stream(ID.from_base58(worker.peer_id), WEIGHTS_PROTOCOL)
            await write_message(stream, plan)
            while True:
                with trio.fail_after(FILL_STALL_TIMEOUT):
                    message = await read_message(stream)
                entry.update({k: v for k, v in message.items() if k in _FIELDS})
                if not answered:
                    answered = True
                    acked.release()
                if message.get("done"):
                    ok = True
                    break
        except (TensorStreamError, trio.TooSlowError, Exception) as exc:  # StreamFailure: an older worker
            entry["error"] = f"{type(exc).__name__}: {exc}"
            log.info("worker did not fill its cache; llama.cpp sends its weights", worker=label, error=entry["error"])
        finally:
            if not answered:
                acked.release()
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await (close_or_reset(stream) if ok else quiet_reset(stream))
        entry["done"] = True
        if ok:
            mib = {k: round(int(entry.get(k, 0)) / 2**20, 1) for k in ("local", "peers", "server", "cached", "missing")}
            log.info(
                "worker weights in place",
                worker=label,
                local_mib=mib["local"],
                peers_mib=mib["peers"],
                server_mib=mib["server"],
                cached_mib=mib["cached"],
                left_to_llama_mib=mib["missing"],
                corrupt=entry.get("corrupt", 0),
                held_requests=entry.get("held"),
                bad_peers=entry.get("bad_peers") or None,
                seconds=entry.get("seconds"),
            )


_FIELDS = frozenset({"total", "cached", "local", "peers", "server", "missing", "corrupt", "held", "bad_peers", "seconds", "done"})
