"""Small helpers for py-libp2p streams, shared by the node, the tunnel and the py-libp2p patches.

Owns nothing: each helper acts on the stream it is given.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

__all__ = ["CLEANUP_TIMEOUT", "StreamHandler", "close_or_reset", "quiet_reset", "remote_peer_id"]

#: An async stream handler, as accepted by :meth:`~localp2p.p2p.node.P2PNode.set_handler`.
StreamHandler = Callable[[INetStream], Awaitable[None]]

#: Seconds a reset or close issued from cleanup code may take: a peer that stopped
#: reading must not hold a handler (or a shutdown) for longer.
CLEANUP_TIMEOUT = 2.0


def remote_peer_id(stream: INetStream) -> ID:
    """The authenticated peer id of the remote end of ``stream``.

    In py-libp2p 0.8.1 this is ``stream.muxed_conn.peer_id`` (set from the Noise
    handshake, so it is cryptographically verified).
    """
    return stream.muxed_conn.peer_id


async def quiet_reset(stream: INetStream, timeout: float = CLEANUP_TIMEOUT) -> None:
    """Reset ``stream``; shielded from cancellation, bounded by ``timeout``, errors ignored."""
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        try:
            await stream.reset()
        except Exception:
            return


async def close_or_reset(stream: INetStream, timeout: float = CLEANUP_TIMEOUT) -> None:
    """Close ``stream`` (reset it if closing fails); shielded, bounded by ``timeout``, never raises."""
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        try:
            await stream.close()
        except Exception:
            await quiet_reset(stream, timeout)
