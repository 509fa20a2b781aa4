"""One libp2p frame per ggml-RPC burst: the tunnel framing for llama.cpp's RPC connections.

llama.cpp's RPC protocol 7 makes one waiting round trip per worker per token: a few
requests the rpc-server never answers (SET_TENSOR, GRAPH_COMPUTE, GRAPH_RECOMPUTE),
sent as separate writes spread over ~0.5-1.5 ms, then one it waits for (GET_TENSOR);
the reply comes as two writes (size, then payload). A relay that passes on what each
read returns sends four or five frames up and two down per worker per token, and
every frame costs both tunnel ends Python time in Noise and Yamux on the token's
critical path (notes/libp2p.md, "Where a tunnel round trip goes").

:class:`RpcBurstFraming` is a :class:`~localp2p.p2p.tunnel.ConnectionFraming`: the
server end holds requests until the one that is waited for, the worker end holds a
reply until it is whole (:class:`~localp2p.llama.rpc.MessageBoundaries`), never
longer than :data:`HOLD_TIMEOUT` and never more than :data:`GATHER_LIMIT`. Only for
connections whose first request is HELLO (which an rpc-server insists on); anything
else is relayed as read. Pass the class itself as the tunnel's ``framing``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from .rpc import RPC_CMD_HELLO, MessageBoundaries

if TYPE_CHECKING:
    from localp2p.p2p.auth import Role

__all__ = ["GATHER_LIMIT", "HOLD_TIMEOUT", "RpcBurstFraming"]

#: Seconds bytes held back for the rest of a burst wait before they go anyway. llama.cpp
#: sends a token's burst (a few unanswered requests, then one it waits for) within about
#: half a millisecond; this only matters if it ever stops half-way.
HOLD_TIMEOUT = 0.002
#: Bytes a burst is gathered up to. Bigger reads (weights, during a load) go as they
#: are read: copying them into one frame would cost more than the frames it saves.
GATHER_LIMIT = 64 * 1024


class RpcBurstFraming:
    """Where one tunnelled ggml-RPC connection's bytes may be cut into frames, at one end.

    Owns only its parse state. Whether the connection speaks ggml-RPC is decided by
    its first request byte: the server end sees it in the bytes it reads from TCP
    (llama.cpp), the worker end in the bytes the peer sends it (:meth:`from_peer`).
    Bytes that turn out not to be ggml-RPC after all are relayed as read from then on.
    """

    __slots__ = ("_boundaries", "_side", "_speaks_rpc", "gather_limit", "hold_timeout")

    def __init__(self, side: Role) -> None:
        self._side = side
        self._speaks_rpc: bool | None = None  # undecided until the first request byte
        self._boundaries: MessageBoundaries | None = None
        self.hold_timeout = HOLD_TIMEOUT
        self.gather_limit = GATHER_LIMIT

    def _decide(self, data: bytes) -> None:
        if self._speaks_rpc is None and data:
            self._speaks_rpc = data[0] == RPC_CMD_HELLO

    def from_peer(self, data: bytes) -> Awaitable[None] | None:
        """Note bytes the peer sent (relayed to TCP): at the worker end, the first request."""
        if self._side == "worker":
            self._decide(data)
        return None

    def ends_burst(self, data: bytes) -> bool:
        """Account for ``data`` read from TCP; True if it ends a message somebody waits for.

        Never raises: bytes that are not ggml-RPC make this framing pass everything on.
        """
        if self._side == "server":
            self._decide(data)
        if self._boundaries is None and self._speaks_rpc:
            self._boundaries = MessageBoundaries(requests=self._side == "server")
        if self._boundaries is None:
            return True
        try:
            return self._boundaries.feed(data)
        except ValueError:  # not ggml-RPC after all: relay as read from now on
            self._speaks_rpc, self._boundaries = False, None
            return True
