"""py-libp2p's identify/push handler, replaced by one that is bounded and quiet about bad peers.

Patch (per host, :func:`replace_identify_push`). Upstream behaviour it fixes
(notes/libp2p.md, "Hostile peers"): ``identify_push_handler_for`` reads up to 1 MiB
and logs an ERROR for every malformed message, and any connected peer may send
them. It relies on ``new_host`` registering a handler for
:data:`IDENTIFY_PUSH_PROTOCOL` in ``host.get_mux().handlers``, and on
``read_length_prefixed_protobuf(stream, use_varint_format, max_length)``,
``update_peerstore_from_identify(peerstore, peer_id, message)`` and the
``Identify`` protobuf message.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.identity.update import update_peerstore_from_identify
from libp2p.utils.varint import read_length_prefixed_protobuf

from localp2p.logs import get_logger

from ..streams import StreamHandler, close_or_reset, quiet_reset, remote_peer_id
from .log_limits import STREAM_REFUSAL_LOG_INTERVAL, PeerLogLimiter

__all__ = [
    "IDENTIFY_PUSH_MAX",
    "IDENTIFY_PUSH_PROTOCOL",
    "IDENTIFY_PUSH_TIMEOUT",
    "identify_push_handler",
    "identify_push_refusals",
    "replace_identify_push",
]

_log: Any = get_logger(__name__)

#: libp2p's identify/push protocol id.
IDENTIFY_PUSH_PROTOCOL = "/ipfs/id/push/1.0.0"
#: Largest identify/push message we read (bytes): a real one is well under
#: 4 KiB (keys, a few addresses and protocol ids); py-libp2p accepts 1 MiB.
IDENTIFY_PUSH_MAX = 64 * 1024
#: Seconds a peer gets to send its identify/push message (py-libp2p's value).
IDENTIFY_PUSH_TIMEOUT = 10.0

#: Per-process: malformed identify/push messages, by peer.
identify_push_refusals = PeerLogLimiter(STREAM_REFUSAL_LOG_INTERVAL)


def identify_push_handler(host: IHost) -> StreamHandler:
    """identify/push as py-libp2p does it, but bounded and quiet about bad peers.

    Reads one varint-prefixed Identify message of at most
    :data:`IDENTIFY_PUSH_MAX` bytes within :data:`IDENTIFY_PUSH_TIMEOUT` and
    updates ``host``'s peerstore with it. Anything else (oversized, not protobuf,
    slow, reset) resets the stream and is logged once per peer per
    :data:`STREAM_REFUSAL_LOG_INTERVAL`. Never raises except ``Cancelled``.
    """

    async def identify_push(stream: INetStream) -> None:
        peer_id = remote_peer_id(stream)
        try:
            with trio.fail_after(IDENTIFY_PUSH_TIMEOUT):
                data = await read_length_prefixed_protobuf(stream, True, IDENTIFY_PUSH_MAX)
            message = Identify()
            message.ParseFromString(data)
            await update_peerstore_from_identify(host.get_peerstore(), peer_id, message)
        except Exception as exc:
            if identify_push_refusals.should_log(str(peer_id)):
                _log.warning(
                    "refused peer: bad identify push",
                    peer_id=str(peer_id),
                    error=f"{type(exc).__name__}: {exc}"[:200],
                    refused=identify_push_refusals.counts.get(str(peer_id), 0),
                )
            await quiet_reset(stream)
            return
        await close_or_reset(stream)

    return identify_push


def replace_identify_push(host: IHost) -> None:
    """Register :func:`identify_push_handler` in place of py-libp2p's on ``host`` (before it runs).

    :raises KeyError: if ``host`` has no identify/push handler to replace (not py-libp2p 0.8.1?).
    """
    mux = host.get_mux()
    protocol = TProtocol(IDENTIFY_PUSH_PROTOCOL)
    if mux.handlers.get(protocol) is None:
        raise KeyError(f"py-libp2p registered no {IDENTIFY_PUSH_PROTOCOL} handler to replace")
    mux.add_handler(protocol, identify_push_handler(host))
