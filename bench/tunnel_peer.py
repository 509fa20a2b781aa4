"""The two ends of a localp2p tunnel, each its own process, for the link benchmark.

    python -m bench.tunnel_peer worker          # libp2p node + AuthGate + tunnel_handler + TCP echo server
    python -m bench.tunnel_peer server PEER ADDR  # libp2p node + AuthGate.authenticate + serve_tunnel

Both read the network token from ``TOKEN``. Each prints one JSON line on stdout when
ready (``{"ready": ...}``) and runs until SIGTERM/SIGINT. These are the same pieces
`localp2p worker p2p-llama-cpp-rpc` and `localp2p run --p2p` use; only discovery,
pings and llama.cpp are left out, so what is measured is the tunnel alone. The
measuring client (bench.link) is a third process.

The echo server (worker side, standing in for the rpc-server) speaks, per connection,
one mode byte then:

* ``E`` echo: every byte back, until EOF;
* ``S`` sink: u64 length, that many bytes, then one ``K`` byte (a one-way bulk send with an ack).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import struct
import sys

import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from localp2p.llama.burst import RpcBurstFraming
from localp2p.p2p.auth import AuthGate
from localp2p.p2p.node import open_node
from localp2p.p2p.token import NetworkToken
from localp2p.p2p.tunnel import TUNNEL_PROTOCOL, Admission, TunnelStats, serve_tunnel, tunnel_handler

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
CHUNK = 256 * 1024


async def _read_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            raise EOFError
        buf += data
    return bytes(buf)


async def _echo_connection(stream: trio.SocketStream) -> None:
    try:
        mode = await _read_exactly(stream, 1)
        if mode == b"E":
            while data := await stream.receive_some(CHUNK):
                await stream.send_all(data)
            await stream.send_eof()
        elif mode == b"S":
            (left,) = struct.unpack("<Q", await _read_exactly(stream, 8))
            while left:
                data = await stream.receive_some(min(CHUNK, left))
                if not data:
                    raise EOFError
                left -= len(data)
            await stream.send_all(b"K")
    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def run_echo(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(int(listeners[0].socket.getsockname()[1]))
    await trio.serve_listeners(_echo_connection, listeners)


def _ready(**info: object) -> None:
    print(json.dumps({"ready": True, **info}), flush=True)


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def worker(token: NetworkToken) -> None:
    async with trio.open_nursery() as nursery:
        echo_port = await nursery.start(run_echo)
        async with open_node(create_new_key_pair(), LOOPBACK) as node:
            gate = AuthGate(token, {"name": "bench-worker"}, "worker")
            gate.install(node)
            admission = Admission()
            admission.install(node)
            node.set_handler(TUNNEL_PROTOCOL, tunnel_handler(gate, f"127.0.0.1:{echo_port}", admission, framing=RpcBurstFraming))
            _ready(peer_id=str(node.peer_id), addrs=[str(a) for a in node.listen_addrs], echo_port=echo_port)
            await _until_signal()
        nursery.cancel_scope.cancel()


async def server(token: NetworkToken, peer: str, addrs: list[str]) -> None:
    peer_id = ID.from_base58(peer)
    async with open_node(create_new_key_pair(), LOOPBACK) as node:
        gate = AuthGate(token, {"name": "bench-server"}, "server")
        gate.install(node)
        await node.connect(PeerInfo(peer_id, [Multiaddr(a) for a in addrs]))
        await gate.authenticate(node, peer_id)
        stats = TunnelStats()
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(serve_tunnel, node, peer_id, stats, framing=RpcBurstFraming))
            # py-libp2p's Yamux pings once 0.5 s after connecting (notes/libp2p.md); start after it
            await trio.sleep(0.7)
            _ready(tunnel_port=port)
            await _until_signal()
            nursery.cancel_scope.cancel()


def main(argv: list[str]) -> int:
    token = NetworkToken.parse(os.environ["TOKEN"])
    if argv[:1] == ["worker"]:
        trio.run(worker, token)
    elif argv[:1] == ["server"] and len(argv) >= 3:
        trio.run(server, token, argv[1], argv[2:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
