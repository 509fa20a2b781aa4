"""One task per discovered peer of a role: the shape the worker attacher and the server directory share.

Discovery sends :class:`~localp2p.p2p.discovery.candidate.Candidate`\\ s (mDNS, DHT, the
bootstrap list); a consumer of one role (workers for a server, servers for a client)
keeps the latest addresses of each peer, starts one attend task per peer the first time
it is seen, and wakes that task when discovery announces the peer again (a restarted
peer, new addresses: a task waiting out a retry backoff tries at once).
"""

from __future__ import annotations

import abc

import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from .discovery import Candidate
from .node import P2PNode

__all__ = ["PeerAttendance"]


class PeerAttendance(abc.ABC):
    """Consumes candidates (:meth:`run`) and owns one :meth:`_attend` task per peer of :attr:`role`.

    Subclasses set :attr:`role`, implement :meth:`_attend` (which must discard its peer
    from ``_attending`` and ``_announced`` when it ends), and may refuse peers in
    :meth:`_skip`.
    """

    #: The hello role of the peers attended (a candidate with another known role is ignored).
    role: str

    def __init__(self, node: P2PNode) -> None:
        self.node = node
        #: Peers (peer id text) with an attend task running.
        self._attending: set[str] = set()
        #: Per attended peer: set when discovery announces it again, to end a backoff early.
        self._announced: dict[str, trio.Event] = {}
        #: The latest addresses discovery gave for each peer.
        self._addrs: dict[str, list[Multiaddr]] = {}

    async def run(
        self,
        candidates: trio.MemoryReceiveChannel[Candidate],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume discovery candidates until cancelled; one attend task per peer."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for candidate in candidates:
                key = str(candidate.peer_id)
                if candidate.gone or key == str(self.node.peer_id):
                    continue
                if candidate.role is not None and candidate.role != self.role:
                    continue
                if candidate.addrs:
                    self._addrs[key] = list(candidate.addrs)
                if key in self._attending:
                    self._announced.get(key, trio.Event()).set()
                    continue
                if self._skip(key):
                    continue
                self._attending.add(key)
                nursery.start_soon(self._attend, candidate.peer_id, candidate.source, candidate.name)

    def _skip(self, key: str) -> bool:
        """Whether a peer seen for the first time (or again, after its task ended) is left alone."""
        return False

    @abc.abstractmethod
    async def _attend(self, peer_id: ID, source: str, name: str | None) -> None:
        """Own one peer until it is given up on (see the subclass)."""
