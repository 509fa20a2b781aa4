"""py-libp2p's Circuit Relay v2 hop side, fitted so one circuit's end cannot end another.

Upstream behaviour it fixes (notes/libp2p.md, "Relays and hole punching"): the relay
remembers circuits in ``CircuitV2Protocol._active_relays``, keyed by *peer id* (the
source's on CONNECT, then the destination's once the circuit is up), and when either
direction of a circuit ends, ``_relay_data``'s ``finally`` closes whatever streams are
stored under that peer's key and deletes it. Those are the streams of the *newest*
circuit to (or from) that peer, not of the ending one. So when a server opened a circuit
to a worker that failed half-way (its dial timed out on a loaded machine, or the worker's
Noise handshake never finished) and then a second one, the first circuit's end closed
the second one mid-handshake ("handshake failed" at the worker), and so on for every
retry: the pair never connected through that relay. It also let one worker's circuit
end tear down a server's circuit to another worker through the same relay.

:class:`CircuitSafeRelayProtocol` (run instead of ``CircuitV2Protocol``) keeps upstream's
relaying loop but gives each circuit its own cleanup: ``_active_relays`` is a map that
keeps nothing, so upstream's ``finally`` finds nothing to close, and each direction
closes the two streams of its own circuit when it ends (as upstream meant to: either
direction ending ends the circuit).

Relies on ``CircuitV2Protocol._relay_data(src, dst, peer_id, deadline, data_limit)``
cleaning up only through ``self._active_relays`` (membership test, item get, del), on
``_close_stream(stream)``, and on nothing else reading ``_active_relays`` except
``run()``'s shutdown loop (which then has nothing to close: a circuit runs in its hop
stream's handler task and closes its own streams when that task ends or is cancelled).
"""

from __future__ import annotations

from typing import Any

from libp2p.abc import INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol

__all__ = ["CircuitSafeRelayProtocol", "check"]


class _KeepsNothing(dict[Any, Any]):
    """A dict that drops every item set: upstream's per-peer circuit map, disarmed."""

    def __setitem__(self, key: Any, value: Any) -> None:
        return None


class CircuitSafeRelayProtocol(CircuitV2Protocol):
    """``CircuitV2Protocol`` whose circuits each close their own streams (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._active_relays = _KeepsNothing()

    async def _relay_data(
        self,
        src_stream: INetStream,
        dst_stream: INetStream,
        peer_id: ID,
        deadline: float | None = None,
        circuit_data_limit: list[int] | None = None,
    ) -> None:
        try:
            await super()._relay_data(src_stream, dst_stream, peer_id, deadline, circuit_data_limit)
        finally:
            await self._close_stream(src_stream)
            await self._close_stream(dst_stream)


def check() -> None:
    """Fail (``AttributeError``) if py-libp2p's relay is not built as this patch expects."""
    for name in ("_relay_data", "_close_stream", "_handle_connect"):
        if not callable(getattr(CircuitV2Protocol, name, None)):
            raise AttributeError(f"libp2p.relay.circuit_v2.protocol.CircuitV2Protocol has no {name}")
