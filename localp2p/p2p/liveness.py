"""Liveness and ownership pings between a server and its workers.

Protocol ``/localp2p/ping/1.0.0``: the server keeps one stream per worker and sends
a frame with an 8-byte nonce every :data:`PING_INTERVAL`; the worker answers with
the nonce and one status byte. Answering also claims the worker for that server
(:class:`~localp2p.p2p.tunnel.Admission`): a worker serves one server at a time, and
a second server learns at once that it is busy instead of hanging on a tunnel.
Only authenticated servers may open the stream.
"""

from __future__ import annotations

import os
import time

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from localp2p.logs import get_logger

from .auth import AuthGate, encode_frame, read_frame
from .node import P2PNode, remote_peer_id
from .tunnel import Admission

PING_PROTOCOL = "/localp2p/ping/1.0.0"
#: Seconds between pings: with MAX_MISSED below a silent worker is dropped in < 10 s.
PING_INTERVAL = 2.0
#: Seconds to wait for one answer before counting it as missed.
PING_TIMEOUT = 2.0
#: Missed answers in a row after which a worker counts as gone.
MAX_MISSED = 3
NONCE_SIZE = 8
STATUS_OWNED = 0
STATUS_BUSY = 1

log = get_logger(__name__)


class PingFailed(Exception):
    """No valid answer to a ping (timeout, reset stream, malformed reply)."""


def ping_handler(gate: AuthGate, admission: Admission):  # type: ignore[no-untyped-def]
    """Worker side: answer pings from authenticated servers and claim ownership for them."""

    async def handle(stream: INetStream) -> None:
        if not await gate.require(stream, role="server"):
            return
        peer_id = remote_peer_id(stream)
        while True:
            try:
                nonce = await read_frame(stream, max_size=NONCE_SIZE)
            except Exception:  # EOF, reset, oversized frame: the conversation is over
                return
            if len(nonce) != NONCE_SIZE:
                return
            status = STATUS_OWNED if admission.try_acquire(peer_id) else STATUS_BUSY
            await stream.write(encode_frame(nonce + bytes([status])))

    return handle


class Pinger:
    """Server side: one long-lived ping stream to one worker.

    Owns the stream; reopens it after a failure. Use :meth:`ping` periodically and
    :meth:`aclose` at the end.
    """

    def __init__(self, node: P2PNode, peer_id: ID) -> None:
        self.node = node
        self.peer_id = peer_id
        self._stream: INetStream | None = None
        self.rtt: float | None = None

    async def ping(self, timeout: float = PING_TIMEOUT) -> bool:
        """One round trip; returns True when the worker is ours, False when it is busy.

        Raises PingFailed when there is no valid answer within ``timeout``.
        """
        nonce = os.urandom(NONCE_SIZE)
        started = time.monotonic()
        try:
            with trio.fail_after(timeout):
                if self._stream is None:
                    self._stream = await self.node.new_stream(self.peer_id, PING_PROTOCOL)
                await self._stream.write(encode_frame(nonce))
                reply = await read_frame(self._stream, max_size=NONCE_SIZE + 1)
        except Exception as exc:  # timeout, StreamReset, StreamFailure, SwarmException, ...
            await self._drop()
            raise PingFailed(f"{type(exc).__name__}: {exc}") from None
        if len(reply) != NONCE_SIZE + 1 or reply[:NONCE_SIZE] != nonce:
            await self._drop()
            raise PingFailed("malformed ping reply")
        self.rtt = time.monotonic() - started
        return reply[NONCE_SIZE] == STATUS_OWNED

    async def _drop(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    await stream.reset()
                except Exception:
                    pass

    async def aclose(self) -> None:
        await self._drop()
