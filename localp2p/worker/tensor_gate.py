"""Hold llama.cpp's "set this tensor from your cache" until the fill has put it there.

The server no longer waits for the workers' fills before it loads: it sends each worker
its plan, waits for the worker's first answer (the gate is armed), and starts llama.cpp.
llama.cpp then asks each rpc-server for the big tensors by hash (``SET_TENSOR_HASH``), in
file order, while the fills are still copying and fetching them, also in file order. The
worker's tunnel end reads those requests as they pass (:class:`GatedRpcFraming`) and
holds one whose tensor the fill is still placing, until it is in the cache: so the
rpc-server answers from its cache, and the fill and llama.cpp's load overlap instead of
running one after the other. Only delays, never answers for the rpc-server: a tensor the
fill gives up on is released and goes through the tunnel as before.

:class:`TensorGate` owns the pending set of one worker; the fill arms it with a plan's
hashes and releases each as it is placed (or fails), and all of them when it ends.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable

import trio

from localp2p.llama.burst import RpcBurstFraming
from localp2p.llama.rpc import CacheRequests
from localp2p.logs import get_logger
from localp2p.p2p.auth import Role

log = get_logger("weights")

#: Seconds a held request waits without the fill making any progress before it goes on
#: (the rpc-server then answers "not cached" and llama.cpp sends the bytes itself).
GATE_STALL_TIMEOUT = 30.0


class TensorGate:
    """The tensors a running fill is still placing, by hash; and the waits on them."""

    def __init__(self) -> None:
        self._pending: dict[int, trio.Event] = {}
        self._progress = 0
        #: llama.cpp requests held until their tensor was in place, since the worker started.
        self.held = 0

    @property
    def armed(self) -> bool:
        return bool(self._pending)

    def pending(self, hash_: int) -> bool:
        return hash_ in self._pending

    def arm(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self._pending.setdefault(h, trio.Event())

    def release(self, hash_: int) -> None:
        """The fill is done with ``hash_`` (placed, or given up): whoever waits goes on."""
        event = self._pending.pop(hash_, None)
        if event is not None:
            event.set()

    def release_all(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self.release(h)

    def progressed(self) -> None:
        """The fill moved (bytes arrived, a tensor was placed): held requests keep waiting."""
        self._progress += 1

    async def wait(self, hashes: list[int]) -> None:
        """Return once none of ``hashes`` is pending, or the fill stalled for GATE_STALL_TIMEOUT."""
        for h in hashes:
            event = self._pending.get(h)
            if event is None:
                continue
            self.held += 1
            while not event.is_set():
                seen = self._progress
                with trio.move_on_after(GATE_STALL_TIMEOUT):
                    await event.wait()
                if not event.is_set() and self._progress == seen:
                    log.warning("the fill stalled; letting llama.cpp send the tensor itself", hash=f"{h:016x}")
                    self.release(h)

    def framing(self, side: Role) -> GatedRpcFraming:
        """The tunnel framing (:data:`localp2p.p2p.tunnel.Framing`) that holds requests at this gate."""
        return GatedRpcFraming(side, self)


class GatedRpcFraming(RpcBurstFraming):
    """:class:`RpcBurstFraming` that also holds SET_TENSOR_HASH requests at a :class:`TensorGate`.

    Reads a connection's requests only when the gate was armed as it opened (llama.cpp
    opens its connections when the load starts, after the plan armed it), and only until
    the gate is empty; other connections (and the tokens after a load) cost nothing here.
    """

    __slots__ = ("_gate", "_requests")

    def __init__(self, side: Role, gate: TensorGate) -> None:
        super().__init__(side)
        self._gate = gate
        self._requests: CacheRequests | None = CacheRequests() if side == "worker" and gate.armed else None

    def from_peer(self, data: bytes) -> Awaitable[None] | None:
        super().from_peer(data)
        if self._requests is None:
            return None
        if not self._speaks_rpc:
            self._requests = None
            return None
        try:
            hashes = self._requests.feed(data)
        except ValueError:
            self._requests = None
            return None
        if not self._gate.armed:
            self._requests = None  # the fill is over: this connection is read no further
        waits = [h for h in hashes if self._gate.pending(h)]
        return self._gate.wait(waits) if waits else None
