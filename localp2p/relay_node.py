"""`localp2p relay`: a node that only relays, for a small box with a public address.

It joins the network of its token (DHT server, mDNS), relays for token holders
(:mod:`localp2p.p2p.relay`) and answers their reachability questions; it serves no
API and lends no rpc-server. Give its address to the others as ``--p2p-bootstrap``.
"""

from __future__ import annotations

import functools

import trio

from localp2p.p2p.network import Network, P2PSettings, discard_candidates, run_network
from localp2p.p2p.relay import RelayLimits


async def run_relay_node(p2p: P2PSettings, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Relay until cancelled; prints one ready line with the addresses to bootstrap from."""
    if p2p.relay is None:
        p2p.relay = RelayLimits()
    async with trio.open_nursery() as nursery:
        network: Network = await nursery.start(
            functools.partial(run_network, p2p, role="relay", hello={"name": p2p.name}, advertise=False)
        )
        nursery.start_soon(discard_candidates, network.candidates)
        ready = (
            f"localp2p relay ready: peer={network.node.peer_id} network={p2p.token.network_id} "
            f"addrs={','.join(str(a) for a in network.node.p2p_addrs())}"
        )
        print(ready, flush=True)
        task_status.started(ready)

