"""py-libp2p's Yamux muxer with the reader deadlock removed, inbound streams capped, credit batched.

Patches (installed by :func:`install`):

* :class:`ReaderNeverBlocksYamux` replaces ``Yamux`` in
  ``libp2p.stream_muxer.muxer_multistream``: ``MuxerMultistream.new_conn`` builds
  that module-level name whatever ``muxer_opt`` says, so passing the class to
  ``new_host`` alone is not enough. Upstream behaviours it fixes:

  - the reader-task deadlock under two-way load (notes/libp2p.md, "Found while
    building auth and tunnels"): ``Yamux.handle_incoming`` writes PING replies and
    ACK/RST frames itself and waits for the connection's write lock to do so;
  - no cap on *inbound* streams (notes/libp2p.md, "Hostile peers"): only outbound
    streams are limited (256), so a peer may open thousands, each a handler task
    and a buffered window;
  - unread data of a stream the peer reset is kept for the 90 s stale-stream sweep.

  It relies on ``Yamux.accept_stream()``, ``handle_incoming()``,
  ``_write_frame(data)``, ``_finalize_stream(stream, *, fully_closed)`` and the
  attributes ``streams``, ``stream_buffers``, ``_nursery`` and ``peer_id``.
* ``PY_YAMUX_RELEASE_ON_READ`` defaults to ``0`` (notes/libp2p.md, "Where a tunnel
  round trip goes"): upstream's default answers every read with a WINDOW_UPDATE
  frame, one more encrypted frame each way per relayed chunk. py-libp2p reads the
  variable at call time (``yamux._yamux_release_on_read``); an operator's own
  setting wins.
* :func:`credit_in_batches` replaces ``YamuxStream._auto_tune_and_send_window_update``
  while that switch is off: upstream still sent a WINDOW_UPDATE after every read that
  left *any* slack in the window (its "partial slack" branch), i.e. after half of all
  small reads (1,000 echo round trips of 200 bytes: 1,000 updates). As in go-yamux, credit
  now goes back once half the window is owed. Relies on the stream's ``window_lock``,
  ``recv_window``, ``target_recv_window``, ``_pending_recv_release``, ``_grow_threshold()``,
  ``_grow_to_delta(buffered)``, ``_apply_autotune_epoch(buffered)``,
  ``send_window_update(delta, skip_lock=)`` and ``conn.stream_buffers``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import trio
from libp2p.stream_muxer import muxer_multistream
from libp2p.stream_muxer.yamux import yamux as upstream_yamux
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

from localp2p.logs import get_logger

from ..streams import CLEANUP_TIMEOUT
from .log_limits import STREAM_REFUSAL_LOG_INTERVAL, PeerLogLimiter

__all__ = [
    "MAX_INBOUND_STREAMS",
    "YAMUX_RELEASE_ON_READ_ENV",
    "ReaderNeverBlocksYamux",
    "install",
    "stream_refusals",
]

_log: Any = get_logger(__name__)

#: Inbound streams one connection may hold open at once; more are reset on
#: arrival. Honest peers use a handful (ping, a few tunnels, <= 12 KAD queries,
#: identify); each inbound stream may buffer a 256 KiB Yamux window and holds a
#: handler task for up to the negotiation timeout, so this bounds what one
#: connection can pin (128 x 256 KiB = 32 MiB) where py-libp2p has no cap.
MAX_INBOUND_STREAMS = 128
#: py-libp2p's switch for a WINDOW_UPDATE after every read (see the module docstring).
YAMUX_RELEASE_ON_READ_ENV = "PY_YAMUX_RELEASE_ON_READ"
#: Our default for it: off, credit goes back in batches as in go-yamux (the window
#: stays open: the sender still never waits while the reader keeps up); measured on
#: the tunnel: bulk 111 -> 121 MB/s on 2 cores.
YAMUX_RELEASE_ON_READ_DEFAULT = "0"

#: Per-process: streams refused for exceeding MAX_INBOUND_STREAMS, by peer.
stream_refusals = PeerLogLimiter(STREAM_REFUSAL_LOG_INTERVAL)


class ReaderNeverBlocksYamux(Yamux):
    """py-libp2p's Yamux with the reader-task deadlock removed and inbound streams capped.

    Deadlock (see notes/libp2p.md): the connection's reader task writes a few
    frames itself (PING replies, ACK/RST of new streams) and waits for the
    connection's write lock to do so. With both directions saturated, both ends'
    writers hold the lock in a blocked TCP send, both readers wait for it, nobody
    reads TCP: the connection hangs for good. Here the reader never waits: its
    writes go to a task of the muxer's nursery (the lock is FIFO, so frames keep
    their order).

    Cap: py-libp2p limits only *outbound* streams (256); a peer may open inbound
    streams without limit (each one a handler task waiting up to the negotiation
    timeout, plus its buffered data). :meth:`accept_stream` resets any inbound
    stream beyond :data:`MAX_INBOUND_STREAMS` open on this connection before a
    handler sees it, and logs the peer once per :data:`STREAM_REFUSAL_LOG_INTERVAL`.
    A stream we reset also drops what the peer had sent on it at once (nobody
    will read it), instead of keeping it for py-libp2p's 90 s stale-stream sweep.
    """

    def open_inbound_streams(self) -> int:
        """Inbound streams on this connection that are not closed yet."""
        return sum(1 for s in list(self.streams.values()) if not s.is_initiator and not s.closed)

    async def accept_stream(self) -> Any:
        while True:
            stream = await super().accept_stream()
            if self.open_inbound_streams() <= MAX_INBOUND_STREAMS:
                return stream
            await self._refuse_stream(stream)

    async def _refuse_stream(self, stream: Any) -> None:
        peer = str(self.peer_id)
        if stream_refusals.should_log(peer):
            _log.warning(
                "refused peer: too many open streams",
                peer_id=peer,
                limit=MAX_INBOUND_STREAMS,
                refused=stream_refusals.counts.get(peer, 0),
            )
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
            with contextlib.suppress(Exception):
                await stream.reset()

    async def _finalize_stream(self, stream: Any, *, fully_closed: bool) -> None:
        if fully_closed and stream.reset_received:
            buffer = self.stream_buffers.get(stream.stream_id)
            if buffer:
                buffer.clear()  # reset: unread data is never read; free it now
        await super()._finalize_stream(stream, fully_closed=fully_closed)

    _reader_task: trio.lowlevel.Task | None = None

    async def handle_incoming(self) -> None:
        self._reader_task = trio.lowlevel.current_task()
        await super().handle_incoming()

    async def _write_frame(self, data: bytes) -> None:
        if self._reader_task is trio.lowlevel.current_task() and self._nursery is not None:
            self._nursery.start_soon(self._write_frame_detached, data)
            return
        await super()._write_frame(data)

    async def _write_frame_detached(self, data: bytes) -> None:
        with contextlib.suppress(Exception):
            await Yamux._write_frame(self, data)


_upstream_window_update = YamuxStream._auto_tune_and_send_window_update


async def credit_in_batches(self: YamuxStream, *, bytes_read: int = 0) -> None:
    """Upstream's window update without its "partial slack" branch (see the module docstring).

    Credit goes back when what is owed (the window's shortfall, or the bytes read since
    the last update) reaches the threshold, half the window. With the release-on-read
    switch on, upstream's own method runs.
    """
    if upstream_yamux._yamux_release_on_read():
        await _upstream_window_update(self, bytes_read=bytes_read)
        return
    total_delta = 0
    async with self.window_lock:
        if bytes_read > 0:
            self._pending_recv_release += bytes_read
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        delta = self.target_recv_window - (self.recv_window + buffered)
        threshold = self._grow_threshold()
        if delta >= threshold and delta > 0:
            total_delta = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
        elif self._pending_recv_release >= threshold:
            self.recv_window += self._pending_recv_release
            total_delta = self._pending_recv_release + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
    if total_delta > 0:
        await self.send_window_update(total_delta, skip_lock=True)


def install() -> None:
    """Make py-libp2p build :class:`ReaderNeverBlocksYamux` and default to batched credit (idempotent).

    :raises AttributeError: if ``muxer_multistream`` no longer has a module-level ``Yamux``
        to replace (the patch would silently do nothing).
    """
    if not hasattr(muxer_multistream, "Yamux"):
        raise AttributeError("py-libp2p's muxer_multistream has no module-level Yamux to replace")
    muxer_multistream.Yamux = ReaderNeverBlocksYamux  # type: ignore[misc]
    for name in ("_grow_threshold", "_grow_to_delta", "_apply_autotune_epoch", "send_window_update"):
        if not callable(getattr(YamuxStream, name, None)):
            raise AttributeError(f"py-libp2p's YamuxStream has no {name}")
    if not callable(getattr(upstream_yamux, "_yamux_release_on_read", None)):
        raise AttributeError("py-libp2p's yamux module has no _yamux_release_on_read")
    YamuxStream._auto_tune_and_send_window_update = credit_in_batches  # type: ignore[method-assign]
    os.environ.setdefault(YAMUX_RELEASE_ON_READ_ENV, YAMUX_RELEASE_ON_READ_DEFAULT)
