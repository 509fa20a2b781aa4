"""Per-peer log limits: lines a remote peer can make us (or py-libp2p) write at will.

Patch (installed by :func:`install`): a filter on py-libp2p's
``libp2p.host.basic_host`` logger. Upstream behaviour it fixes (notes/libp2p.md,
"Hostile peers"): ``BasicHost.new_stream`` logs "Failed to open stream to peer X"
(seven lines at ERROR) for every stream a peer refuses or does not support, so any
peer that merely connects grows our log without bound. It relies on the message
starting with :data:`OUTBOUND_FAILURE_PREFIX` followed by the peer id and a colon.

:class:`PeerLogLimiter` is the per-peer rate limit the other patches use too
(too many inbound streams, bad identify/push).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

__all__ = [
    "OUTBOUND_FAILURE_LOGGER",
    "OUTBOUND_FAILURE_PREFIX",
    "STREAM_REFUSAL_LOG_INTERVAL",
    "OutboundFailureLogLimit",
    "PeerLogLimiter",
    "install",
    "outbound_stream_failures",
]

#: A peer whose streams are refused is logged at most this often (s), so a
#: flood of stream opens cannot flood the log.
STREAM_REFUSAL_LOG_INTERVAL = 60.0
#: Peers remembered by :class:`PeerLogLimiter`; the oldest are forgotten so
#: peer-id churn cannot grow memory without bound.
PEER_LOG_TRACK_MAX = 1024
#: py-libp2p's logger that writes the outbound stream failure (``BasicHost.new_stream``).
OUTBOUND_FAILURE_LOGGER = "libp2p.host.basic_host"
#: How that message starts in py-libp2p 0.8.1; the peer id follows, then ``:``.
OUTBOUND_FAILURE_PREFIX = "Failed to open stream to peer "


class PeerLogLimiter:
    """Decides whether an event about a peer is logged: at most once per ``interval``.

    Owns a bounded map of peer id -> last log time and per-peer counts
    (:attr:`counts`); the least recently seen peers are dropped beyond ``track_max``.
    """

    def __init__(self, interval: float, track_max: int = PEER_LOG_TRACK_MAX) -> None:
        self.interval = interval
        self.track_max = track_max
        self.counts: OrderedDict[str, int] = OrderedDict()
        self._last: OrderedDict[str, float] = OrderedDict()

    def should_log(self, peer: str) -> bool:
        """Count one event for ``peer``; True if it is the first in ``interval``."""
        self.counts[peer] = self.counts.get(peer, 0) + 1
        self.counts.move_to_end(peer)
        while len(self.counts) > self.track_max:
            self.counts.popitem(last=False)
        now = time.monotonic()
        last = self._last.get(peer)
        if last is not None and now - last < self.interval:
            return False
        self._last[peer] = now
        self._last.move_to_end(peer)
        while len(self._last) > self.track_max:
            self._last.popitem(last=False)
        return True


#: Per-process: our outbound streams a peer refused (py-libp2p's error log), by peer.
outbound_stream_failures = PeerLogLimiter(STREAM_REFUSAL_LOG_INTERVAL)


class OutboundFailureLogLimit(logging.Filter):
    """Let py-libp2p's "Failed to open stream to peer X" error through once per peer per interval.

    The callers log their own reason. Never raises: a record whose message cannot
    be built passes untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        if not message.startswith(OUTBOUND_FAILURE_PREFIX):
            return True
        peer = message[len(OUTBOUND_FAILURE_PREFIX) :].split(":", 1)[0]
        return outbound_stream_failures.should_log(peer)


def install() -> None:
    """Put :class:`OutboundFailureLogLimit` on :data:`OUTBOUND_FAILURE_LOGGER` (once per process)."""
    logger = logging.getLogger(OUTBOUND_FAILURE_LOGGER)
    if not any(isinstance(f, OutboundFailureLogLimit) for f in logger.filters):
        logger.addFilter(OutboundFailureLogLimit())
