"""py-libp2p's connection manager, sized for a pool and with its auto-connector opt-in.

Patch (per host, :func:`tune_connection_manager`, before ``host.run()``).
Upstream behaviour it fixes (notes/libp2p.md, "Lifecycle pitfalls" and "Log noise
and the connection manager"): ``Swarm.run()`` always starts the swarm's
``AutoConnector``, whose first cycle runs at once, logs "initiating N new dials" at
INFO and dials every peer in the peerstore; it re-dials peers we disconnected from
or the DHT merely heard of. Stopping it after ``host.run()`` came too late for that
first cycle. It relies on ``Swarm.auto_connector`` being the ``AutoConnector`` that
``Swarm.run()`` starts, ``AutoConnector(swarm, auto_connect_interval=...)`` and
``ConnectionConfig.auto_connect_interval``.

The sizes (:data:`MIN_CONNECTIONS`, :data:`LOW_WATERMARK`, :data:`HIGH_WATERMARK`)
are plain ``ConnectionConfig`` fields, passed by ``open_node``.
"""

from __future__ import annotations

from typing import Any

from libp2p.abc import IHost
from libp2p.network.auto_connector import AutoConnector

__all__ = [
    "HIGH_WATERMARK",
    "LOW_WATERMARK",
    "MIN_CONNECTIONS",
    "OptInAutoConnector",
    "tune_connection_manager",
]

#: py-libp2p's connection manager defaults (keep >= 50 connections, dial towards
#: 200, prune above 300) are go-libp2p's, sized for the public IPFS network. A
#: localp2p network is one server, its workers and a few clients, and discovery
#: dials every peer we use, so nothing is dialled just to have connections:
MIN_CONNECTIONS = 0
#: With the auto-connector on (``auto_connect=True``) it dials peers the peerstore
#: knows towards (LOW_WATERMARK + HIGH_WATERMARK) / 2 = 36 connections.
LOW_WATERMARK = 8
#: Above this many connections py-libp2p closes idle ones (no open stream, older
#: than its 20 s grace period): far above a pool's size, so only churn is pruned.
HIGH_WATERMARK = 64


class OptInAutoConnector(AutoConnector):
    """py-libp2p's AutoConnector that does nothing unless ``enabled``.

    Disabled, :meth:`start` leaves it stopped, so neither the periodic task nor the
    disconnect-triggered ``maybe_connect`` ever dials.
    """

    def __init__(self, swarm: Any, *, enabled: bool) -> None:
        super().__init__(swarm, auto_connect_interval=swarm.connection_config.auto_connect_interval)
        self.enabled = enabled

    async def start(self) -> None:
        if self.enabled:
            await super().start()


def tune_connection_manager(host: IHost, *, auto_connect: bool) -> None:
    """Replace ``host``'s AutoConnector by :class:`OptInAutoConnector` (call before ``host.run``).

    :raises AttributeError: if py-libp2p's swarm no longer has an ``auto_connector``
        (a py-libp2p other than the pinned 0.8.1).
    """
    swarm: Any = host.get_network()
    if not isinstance(getattr(swarm, "auto_connector", None), AutoConnector):
        raise AttributeError("py-libp2p's swarm has no AutoConnector (not py-libp2p 0.8.1?)")
    swarm.auto_connector = OptInAutoConnector(swarm, enabled=auto_connect)
