"""A one-node discovery probe for multi-process / multi-namespace tests.

Opens a libp2p node, runs mDNS and/or DHT discovery and prints JSON lines on
stdout (logs go to stderr)::

    {"event": "starting", "wall": <time.time()>}
    {"event": "ready", "peer_id": ..., "addrs": [<p2p multiaddrs>], "t": s, "wall": ...}
    {"event": "candidate", "peer_id": ..., "addrs": [...], "source": "mdns"|"dht",
     "role": ..., "name": ..., "gone": bool, "t": s, "wall": ...}

``t`` is seconds since "starting" (taken just before the node is opened).
Runs until SIGTERM/SIGINT, then stops cleanly (mDNS goodbye).

    python tests/discovery_probe.py --listen /ip4/0.0.0.0/tcp/0 \\
        --mdns _lp2p-1a2b3c4d._tcp.local. --role worker --name w1
    python tests/discovery_probe.py --dht --advertise --search --key 6b31 \\
        --bootstrap /ip4/10.231.7.1/tcp/4001/p2p/12D3KooW...
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
import time
from typing import Any

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from localp2p.logs import configure_logging
from localp2p.p2p.discovery import Candidate, run_dht, run_dht_discovery, run_mdns
from localp2p.p2p.node import open_node


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def _main(args: argparse.Namespace) -> None:
    started = time.monotonic()
    _emit({"event": "starting", "wall": time.time()})
    send, recv = trio.open_memory_channel[Candidate](100)
    async with open_node(create_new_key_pair(), args.listen) as node:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(on_signal)
            if args.mdns:
                await nursery.start(
                    functools.partial(
                        run_mdns,
                        node,
                        args.mdns,
                        role=args.role,
                        name=args.name,
                        send_channel=send.clone(),
                    )
                )
            if args.dht:
                dht = await nursery.start(run_dht, node)
                keys = [bytes.fromhex(k) for k in args.key]
                await nursery.start(
                    functools.partial(
                        run_dht_discovery,
                        node,
                        dht,
                        lambda: keys,
                        advertise=args.advertise,
                        search=args.search,
                        send_channel=send.clone(),
                        bootstrap=args.bootstrap,
                    )
                )
            _emit(
                {
                    "event": "ready",
                    "peer_id": str(node.peer_id),
                    "addrs": [str(a) for a in node.p2p_addrs()],
                    "t": time.monotonic() - started,
                    "wall": time.time(),
                }
            )
            async for c in recv:
                _emit(
                    {
                        "event": "candidate",
                        "peer_id": str(c.peer_id),
                        "addrs": [str(a) for a in c.addrs],
                        "source": c.source,
                        "role": c.role,
                        "name": c.name,
                        "gone": c.gone,
                        "t": time.monotonic() - started,
                        "wall": time.time(),
                    }
                )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", action="append", default=None)
    parser.add_argument("--mdns", metavar="SERVICE_TYPE")
    parser.add_argument("--role", default="worker")
    parser.add_argument("--name", default="probe")
    parser.add_argument("--dht", action="store_true")
    parser.add_argument("--advertise", action="store_true")
    parser.add_argument("--search", action="store_true")
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--key", action="append", default=[], help="hex rendezvous key")
    args = parser.parse_args(argv)
    args.listen = args.listen or ["/ip4/0.0.0.0/tcp/0"]
    configure_logging("json", "info", process="probe")
    try:
        trio.run(_main, args)
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
