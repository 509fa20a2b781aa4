"""Issue 16: the tensor streams are token-gated like the tunnels.

A worker's tensor cache holds a file; a libp2p peer that skipped the token proof gets
nothing from ``/localp2p/tensors/1.0.0`` or ``/localp2p/weights/1.0.0`` (reset before a
byte is read); a token holder with the worker role may ask and fetch tensors but may not
send the worker a plan (servers only); the bytes it gets are the file's.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest
import trio

from localp2p.llama.fnv import fnv1a_py
from localp2p.testing.cluster import new_token, p2p_worker, worker_peer_id


def test_tensor_streams_are_token_gated(tmp_path: pathlib.Path) -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo
    from multiaddr import Multiaddr

    from localp2p.p2p.network import P2PSettings, run_network
    from localp2p.p2p.node import open_node
    from localp2p.p2p.tensor_stream import TENSOR_PROTOCOL, WEIGHTS_PROTOCOL, TensorStreamError, ask_have, get_tensor, write_message
    from localp2p.p2p.token import NetworkToken

    data = os.urandom(100_000)
    hash_ = fnv1a_py(data)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"{hash_:016x}").write_bytes(data)
    token = new_token()
    worker = p2p_worker(tmp_path, token, "gated", "--p2p-no-dht", "--cache-dir", str(cache))
    results: dict[str, Any] = {}
    try:
        addr = next(a for a in worker.stdout[0].split("addrs=")[1].split(",") if "/127.0.0.1/" in a)
        info = PeerInfo(ID.from_base58(worker_peer_id(worker)), [Multiaddr(addr.rsplit("/p2p/", 1)[0])])

        async def probe() -> None:
            async with open_node(create_new_key_pair()) as raw:  # no token proof at all
                await raw.connect(info)
                for protocol in (TENSOR_PROTOCOL, WEIGHTS_PROTOCOL):
                    try:
                        stream = await raw.new_stream(info.peer_id, protocol)
                        await write_message(stream, {"op": "get", "hash": f"{hash_:016x}", "size": len(data)})
                        results.setdefault("raw", []).append(await stream.read(1))
                    except Exception as exc:  # reset: what we expect
                        results.setdefault("raw", []).append(type(exc).__name__)
            settings = P2PSettings(
                token=NetworkToken.parse(token), state_dir=tmp_path / "peer", listen=("/ip4/127.0.0.1/tcp/0",), mdns=False, dht=False, name="peer"
            )
            async with trio.open_nursery() as nursery:
                network = await nursery.start(
                    lambda task_status: run_network(settings, role="worker", hello={"name": "peer"}, advertise=False, task_status=task_status)
                )
                await network.node.connect(info)
                await network.gate.authenticate(network.node, info.peer_id)
                results["have"] = await ask_have(network.node, info.peer_id, [hash_, hash_ ^ 1])
                got = bytearray(len(data))

                async def sink(offset: int, chunk: bytes) -> None:
                    got[offset : offset + len(chunk)] = chunk

                await get_tensor(network.node, info.peer_id, hash_, len(data), sink)
                results["bytes"] = bytes(got)
                with pytest.raises(TensorStreamError):
                    await get_tensor(network.node, info.peer_id, hash_ ^ 1, 10, sink)  # not there: refused
                try:  # a worker may not send a plan: only servers
                    stream = await network.node.new_stream(info.peer_id, WEIGHTS_PROTOCOL)
                    await write_message(stream, {"tensors": [], "sources": []})
                    results["plan_reply"] = await stream.read(1)
                except Exception as exc:
                    results["plan_reply"] = type(exc).__name__
                nursery.cancel_scope.cancel()

        trio.run(probe)
        refused = (b"", "StreamReset", "StreamEOF", "StreamError", "StreamFailure")  # reset while or after negotiating
        assert all(r in refused for r in results["raw"]), results
        assert results["have"] == {hash_}, results
        assert results["bytes"] == data
        assert results["plan_reply"] in refused, results
        log = worker.stderr()
        assert "unauthenticated stream on /localp2p/tensors/1.0.0" in log, log[-2000:]
        assert "worker may not open /localp2p/weights/1.0.0 (needs server)" in log, log[-2000:]
    finally:
        worker.stop()
