"""Liveness and ownership pings between a server and its workers.

Protocol ``/localp2p/ping/1.0.0``: the server keeps one stream per worker and sends
a frame with an 8-byte nonce every :data:`PING_INTERVAL`; the worker answers with
the nonce and one status byte. Answering also claims the worker for that server
(:class:`~localp2p.p2p.tunnel.Admission`): a worker serves one server at a time, and
a second server learns at once that it is busy instead of hanging on a tunnel.
Only authenticated servers may open the stream.
"""

from __future__ import annotations

import enum
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


#: Links of an exception's cause/context chain searched for a timeout (py-libp2p wraps errors).
CAUSE_DEPTH = 8


class PingFailure(enum.Enum):
    """How a ping failed: the pinger paces its next try by it."""

    #: No answer within the timeout (ours, or one of py-libp2p's): the wait is spent already.
    TIMED_OUT = "timed out"
    #: Failed at once: refused, reset, stream closed, no connection (the worker is likely gone).
    BROKEN = "broken"
    #: An answer came that is not the reply to this ping.
    MALFORMED = "malformed"


class PingFailed(Exception):
    """No valid answer to a ping; ``kind`` says how it failed, the message what happened."""

    def __init__(self, kind: PingFailure, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def failure_kind(exc: BaseException) -> PingFailure:
    """TIMED_OUT when ``exc`` is a timeout (trio's TooSlowError or a TimeoutError), or was caused by one; else BROKEN."""
    seen: BaseException | None = exc
    for _ in range(CAUSE_DEPTH):
        if seen is None:
            break
        if isinstance(seen, trio.TooSlowError | TimeoutError):
            return PingFailure.TIMED_OUT
        seen = seen.__cause__ or seen.__context__
    return PingFailure.BROKEN


def ping_handler(gate: AuthGate, admission: Admission):
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

        Raises PingFailed when there is no valid answer within ``timeout`` (its ``kind``:
        TIMED_OUT, BROKEN when the stream failed at once, MALFORMED for a wrong reply).
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
            raise PingFailed(failure_kind(exc), f"{type(exc).__name__}: {exc}") from None
        if len(reply) != NONCE_SIZE + 1 or reply[:NONCE_SIZE] != nonce:
            await self._drop()
            raise PingFailed(PingFailure.MALFORMED, "malformed ping reply")
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
