"""Tests for localp2p.p2p.node / localp2p.p2p.discovery.dht (py-libp2p 0.8.1, plain trio.run).

Run: .venv/bin/python -m pytest tests/test_p2p_node.py -q
Bench (skipped by default): LOCALP2P_BENCH=1 .venv/bin/python -m pytest \
    tests/test_p2p_node.py -k bench -s -q
"""

from __future__ import annotations

import os
import stat
import statistics
import time
from pathlib import Path

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP
from multiaddr import Multiaddr

from localp2p.p2p.discovery import open_dht, run_dht
from localp2p.p2p.identity import load_or_create_identity
from localp2p.p2p.node import (
    P2PNode,
    open_node,
    remote_peer_id,
    serve_node,
)

ECHO = "/localp2p/test/echo/1.0.0"
BOOM = "/localp2p/test/boom/1.0.0"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


async def echo_handler(stream) -> None:  # type: ignore[no-untyped-def]
    """Echo everything until the peer half-closes, then half-close too."""
    from libp2p.network.stream.exceptions import StreamEOF

    while True:
        try:
            data = await stream.read(256 * 1024)
        except StreamEOF:
            break
        if not data:
            break
        await stream.write(data)
    await stream.close()


async def read_exactly(stream, n: int) -> bytes:  # type: ignore[no-untyped-def]
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def echo_roundtrip(node: P2PNode, peer: ID, payload: bytes) -> bytes:
    """Send ``payload`` on an echo stream while concurrently reading it back.

    Reading concurrently matters: py-libp2p's Yamux writer gives up with
    ``MuxedStreamError`` after waiting 5 s for a window update, so a peer
    that writes 4 MB before reading would deadlock into that timeout.
    """
    stream = await node.new_stream(peer, ECHO)
    received = bytearray()

    async def writer() -> None:
        chunk = 256 * 1024
        for off in range(0, len(payload), chunk):
            await stream.write(payload[off : off + chunk])
        await stream.close_write()

    async def reader() -> None:
        received.extend(await read_exactly(stream, len(payload)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        nursery.start_soon(reader)
    await stream.close()
    return bytes(received)


async def multistream_propose(host: str, port: int, protocols: list[str]) -> list[str]:
    """Speak raw multistream-select on a fresh TCP connection.

    Returns the server's answer for each proposed security protocol
    (the protocol id echoed back = accepted, ``na`` = refused). Stops after
    the first accepted one (the next bytes would be that handshake).
    """

    def frame(msg: str) -> bytes:
        raw = (msg + "\n").encode()
        assert len(raw) < 128
        return bytes([len(raw)]) + raw

    sock = await trio.open_tcp_stream(host, port)
    buf = bytearray()

    async def read_msg() -> str:
        while not buf:
            buf.extend(await sock.receive_some(4096))
        length = buf[0]
        while len(buf) < 1 + length:
            buf.extend(await sock.receive_some(4096))
        msg = bytes(buf[1 : 1 + length]).decode().rstrip("\n")
        del buf[: 1 + length]
        return msg

    answers: list[str] = []
    async with sock:
        await sock.send_all(frame("/multistream/1.0.0"))
        assert await read_msg() == "/multistream/1.0.0"
        for proto in protocols:
            await sock.send_all(frame(proto))
            answer = await read_msg()
            answers.append(answer)
            if answer != "na":
                break
    return answers


def tcp_port(node: P2PNode) -> int:
    return int(node.listen_addrs[0].value_for_protocol("tcp"))


# --------------------------------------------------------------------------
# (a) echo, 4 MB both ways, Noise + Yamux only
# --------------------------------------------------------------------------


def test_echo_4mb_both_ways() -> None:
    payload = os.urandom(4 * 1024 * 1024)

    async def main() -> None:
        with trio.fail_after(60):
            async with open_node(create_new_key_pair(), LOOPBACK) as a, open_node(
                create_new_key_pair(), LOOPBACK
            ) as b:
                seen_callers: list[ID] = []

                async def recording_echo(stream) -> None:  # type: ignore[no-untyped-def]
                    seen_callers.append(remote_peer_id(stream))
                    await echo_handler(stream)

                a.set_handler(ECHO, recording_echo)
                b.set_handler(ECHO, recording_echo)

                await a.connect(b.peer_info)
                assert b.peer_id in a.connected_peers()
                assert a.negotiated_protocols(b.peer_id) == [("/noise", "/yamux/1.0.0")]

                assert await echo_roundtrip(a, b.peer_id, payload) == payload
                assert await echo_roundtrip(b, a.peer_id, payload) == payload
                assert seen_callers == [a.peer_id, b.peer_id]
                # the inbound side also negotiated noise/yamux
                assert b.negotiated_protocols(a.peer_id) == [("/noise", "/yamux/1.0.0")]

    trio.run(main)


# --------------------------------------------------------------------------
# (b) a raising handler does not take the host down
# --------------------------------------------------------------------------


def test_raising_handler_does_not_kill_host() -> None:
    async def main() -> None:
        with trio.fail_after(30):
            async with open_node(create_new_key_pair(), LOOPBACK) as a, open_node(
                create_new_key_pair(), LOOPBACK
            ) as b:
                calls = 0

                async def boom(stream) -> None:  # type: ignore[no-untyped-def]
                    nonlocal calls
                    calls += 1
                    await stream.read(1)
                    raise RuntimeError("handler bug")

                b.set_handler(BOOM, boom)
                b.set_handler(ECHO, echo_handler)
                await a.connect(b.peer_info)

                for _ in range(3):
                    try:
                        s = await a.new_stream(b.peer_id, BOOM)
                        await s.write(b"x")
                        # the handler resets the stream: EOF/reset, never data
                        assert await s.read(10) == b""
                    except Exception:
                        pass  # StreamReset / StreamFailure are both fine
                with trio.fail_after(5):
                    while calls < 3:
                        await trio.sleep(0.01)

                # host and connection survived: a later stream works
                assert b.peer_id in a.connected_peers()
                data = os.urandom(1000)
                assert await echo_roundtrip(a, b.peer_id, data) == data

    trio.run(main)


def test_unwrapped_raising_handler_kills_host_in_libp2p_0_8_1() -> None:
    """Canary documenting *why* set_handler wraps: the raw API tears the host down.

    If this starts failing, py-libp2p fixed the behaviour upstream.
    """

    async def main() -> None:
        with trio.fail_after(30):
            async with open_node(create_new_key_pair(), LOOPBACK) as a:
                with pytest.raises(BaseExceptionGroup) as info:
                    async with open_node(create_new_key_pair(), LOOPBACK) as b:

                        async def boom(stream) -> None:  # type: ignore[no-untyped-def]
                            raise RuntimeError("raw handler bug")

                        b.host.set_stream_handler(TProtocol(BOOM), boom)  # unwrapped
                        await a.connect(b.peer_info)
                        with pytest.raises(Exception):
                            s = await a.new_stream(b.peer_id, BOOM)
                            await s.read(10)
                        await trio.sleep(5)  # cancelled by the host crash
                        pytest.fail("host b should have been torn down")
                assert info.value.subgroup(RuntimeError) is not None

    trio.run(main)


# --------------------------------------------------------------------------
# (c) Noise only: a plaintext-only peer cannot connect, nothing else offered
# --------------------------------------------------------------------------


def test_plaintext_only_peer_cannot_connect() -> None:
    async def main() -> None:
        with trio.fail_after(60):
            plain_kp = create_new_key_pair()
            plain = new_host(
                key_pair=plain_kp,
                sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(plain_kp)},
                muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
                transports=[TCP()],
            )
            async with open_node(create_new_key_pair(), LOOPBACK) as ours, plain.run(
                [Multiaddr(LOOPBACK[0])]
            ):
                plain_info = PeerInfo(plain.get_id(), plain.get_transport_addrs())

                # plaintext peer dials us -> security negotiation fails
                with pytest.raises(SwarmException):
                    await plain.connect(ours.peer_info)
                # we dial the plaintext peer -> fails as well
                with pytest.raises(SwarmException):
                    await ours.connect(plain_info)
                assert ours.connected_peers() == []
                assert plain.get_connected_peers() == []

                # raw multistream-select probe of our listener: only /noise
                answers = await multistream_propose(
                    "127.0.0.1",
                    tcp_port(ours),
                    ["/plaintext/2.0.0", "/plaintext/1.0.0", "/secio/1.0.0",
                     "/tls/1.0.0", "/noise"],
                )
                assert answers == ["na", "na", "na", "na", "/noise"]

                # sanity: the same probe against a default new_host() shows the
                # insecure defaults we are avoiding
                default = new_host(key_pair=create_new_key_pair())
                async with default.run([Multiaddr(LOOPBACK[0])]):
                    port = int(default.get_transport_addrs()[0].value_for_protocol("tcp"))
                    assert await multistream_propose(
                        "127.0.0.1", port, ["/plaintext/2.0.0"]
                    ) == ["/plaintext/2.0.0"]

    trio.run(main)


# --------------------------------------------------------------------------
# (d) identity persistence
# --------------------------------------------------------------------------


def test_identity_persists_and_corruption_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    kp1 = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kp2 = load_or_create_identity(path)
    assert ID.from_pubkey(kp1.public_key) == ID.from_pubkey(kp2.public_key)
    assert kp1.private_key.to_bytes() == kp2.private_key.to_bytes()
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temp left

    # the peer id survives a node restart
    async def peer_id_of_running_node() -> ID:
        async with open_node(load_or_create_identity(path), LOOPBACK) as node:
            return node.peer_id

    assert trio.run(peer_id_of_running_node) == ID.from_pubkey(kp1.public_key)

    # loose permissions are tightened
    os.chmod(path, 0o644)
    load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    for garbage in (b"", b"\x00\x01garbage\xff" * 7, path.read_bytes()[:-5]):
        bad = tmp_path / "bad.key"
        bad.write_bytes(garbage)
        with pytest.raises(ValueError, match="identity file"):
            load_or_create_identity(bad)
        assert bad.read_bytes() == garbage  # left untouched for inspection


# --------------------------------------------------------------------------
# (e) DHT: A and C know only B; C finds A as provider and streams to it
# --------------------------------------------------------------------------


def test_dht_provider_discovery_via_bootstrap() -> None:
    key = b"model-shard:llama-3-8b:q4:0"

    async def main() -> None:
        with trio.fail_after(60):
            async with (
                open_node(create_new_key_pair(), ["/ip4/0.0.0.0/tcp/0"]) as a,
                open_node(create_new_key_pair(), LOOPBACK) as b,
                open_node(create_new_key_pair(), LOOPBACK) as c,
                trio.open_nursery() as nursery,
            ):
                a.set_handler(ECHO, echo_handler)
                dht_a = await nursery.start(run_dht, a)
                dht_b = await nursery.start(run_dht, b)
                dht_c = await nursery.start(run_dht, c)

                assert await dht_a.add_peer(b.peer_info)
                assert await dht_c.add_peer(b.peer_info)
                assert a.connected_peers() == [b.peer_id]
                assert c.connected_peers() == [b.peer_id]
                assert a.peer_id not in c.connected_peers()

                assert await dht_a.advertise(key) is True
                assert await dht_c.find(b"some other key") == []

                providers = await dht_c.find(key)
                assert [p.peer_id for p in providers] == [a.peer_id]
                # dialable addresses came with it, wildcard already expanded
                assert providers[0].addrs
                assert not any("/0.0.0.0/" in str(x) for x in providers[0].addrs)
                assert b.peer_id in dht_a.routing_table_peers()
                assert set(dht_b.routing_table_peers()) >= {a.peer_id}

                await c.connect(providers[0])
                data = b"hello provider"
                assert await echo_roundtrip(c, a.peer_id, data) == data
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_open_dht_context_manager() -> None:
    async def main() -> None:
        with trio.fail_after(30):
            async with open_node(create_new_key_pair(), LOOPBACK) as a, open_node(
                create_new_key_pair(), LOOPBACK
            ) as b:
                async with open_dht(a) as dht_a, open_dht(b) as dht_b:
                    assert await dht_b.add_peer(a.peer_info)
                    assert await dht_b.advertise(b"k")
                    assert [p.peer_id for p in await dht_a.find(b"k")] == [b.peer_id]

    trio.run(main)


# --------------------------------------------------------------------------
# lifecycle: cancellation stops cleanly, disconnect callback, listen addrs
# --------------------------------------------------------------------------


def test_cancellation_and_disconnect_callback() -> None:
    async def main() -> None:
        with trio.fail_after(30):
            async with open_node(create_new_key_pair(), LOOPBACK) as a:
                gone: list[ID] = []
                event = trio.Event()

                async def on_gone(peer_id: ID) -> None:
                    gone.append(peer_id)
                    event.set()

                a.on_peer_disconnected(on_gone)
                async with trio.open_nursery() as nursery:
                    b = await nursery.start(serve_node, create_new_key_pair(), LOOPBACK)
                    await a.connect(b.peer_info)
                    b_port = tcp_port(b)
                    t0 = time.monotonic()
                    nursery.cancel_scope.cancel()
                assert time.monotonic() - t0 < 5
                with trio.fail_after(10):
                    await event.wait()
                assert gone == [b.peer_id]
                assert a.connected_peers() == []
                # b's port is released
                with pytest.raises(OSError):
                    await trio.open_tcp_stream("127.0.0.1", b_port)

    trio.run(main)


def test_wildcard_listen_addrs_are_expanded() -> None:
    async def main() -> None:
        with trio.fail_after(30):
            async with open_node(
                create_new_key_pair(), ["/ip4/0.0.0.0/tcp/0", "/ip4/127.0.0.1/tcp/0"]
            ) as node:
                bound = [str(a) for a in node.bound_addrs]
                assert any(a.startswith("/ip4/0.0.0.0/tcp/") for a in bound)
                listen = [str(a) for a in node.listen_addrs]
                assert not any("/0.0.0.0/" in a for a in listen)
                assert all(not a.endswith("/tcp/0") for a in listen)
                wildcard_port = next(
                    a.split("/")[-1] for a in bound if a.startswith("/ip4/0.0.0.0/")
                )
                assert f"/ip4/127.0.0.1/tcp/{wildcard_port}" in listen
                assert all(str(node.peer_id) in str(a) for a in node.p2p_addrs())
                # what identify / the DHT advertise is expanded as well
                advertised = [str(a) for a in node.host.get_addrs()]
                assert advertised and not any("/0.0.0.0/" in a for a in advertised)

    trio.run(main)


def test_unbindable_listen_addr_raises() -> None:
    async def main() -> None:
        with trio.fail_after(30):
            with pytest.raises(OSError, match="could not listen"):
                # 203.0.113.0/24 is TEST-NET-3: never assigned to a local interface
                async with open_node(create_new_key_pair(), ["/ip4/203.0.113.7/tcp/0"]):
                    pass

    trio.run(main)


def test_fixed_port_already_in_use_raises() -> None:
    """py-libp2p uses SO_REUSEPORT; open_node must still refuse a busy port."""

    async def main() -> None:
        with trio.fail_after(30):
            async with open_node(create_new_key_pair(), LOOPBACK) as a:
                busy = f"/ip4/127.0.0.1/tcp/{tcp_port(a)}"
                with pytest.raises(OSError, match="cannot listen"):
                    async with open_node(create_new_key_pair(), [busy]):
                        pass
            # once a is gone the port can be reused by a new node
            async with open_node(create_new_key_pair(), [busy]) as b:
                assert tcp_port(b) == int(busy.rsplit("/", 1)[1])

    trio.run(main)


# --------------------------------------------------------------------------
# bench (opt-in)
# --------------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("LOCALP2P_BENCH"), reason="set LOCALP2P_BENCH=1")
def test_bench_throughput_and_rtt() -> None:
    total = 64 * 1024 * 1024
    write_size = 256 * 1024
    sink = "/localp2p/test/sink/1.0.0"

    async def sink_handler(stream) -> None:  # type: ignore[no-untyped-def]
        got = 0
        while got < total:
            got += len(await stream.read(1024 * 1024))
        await stream.write(b"ok")

    async def main() -> None:
        with trio.fail_after(300):
            async with open_node(create_new_key_pair(), LOOPBACK) as a, open_node(
                create_new_key_pair(), LOOPBACK
            ) as b:
                b.set_handler(sink, sink_handler)
                b.set_handler(ECHO, echo_handler)
                await a.connect(b.peer_info)

                chunk = os.urandom(write_size)
                results = []
                for _ in range(3):
                    s = await a.new_stream(b.peer_id, sink)
                    t0 = time.perf_counter()
                    for _ in range(total // write_size):
                        await s.write(chunk)
                    assert await read_exactly(s, 2) == b"ok"
                    dt = time.perf_counter() - t0
                    await s.close()
                    results.append(total / dt / 1e6)
                print(f"\nthroughput 64 MiB / 256 KiB writes: "
                      f"{', '.join(f'{r:.1f}' for r in results)} MB/s")

                s = await a.new_stream(b.peer_id, ECHO)
                msg = os.urandom(64)
                rtts = []
                for i in range(220):
                    t0 = time.perf_counter()
                    await s.write(msg)
                    assert await read_exactly(s, 64) == msg
                    if i >= 20:  # warm-up
                        rtts.append(time.perf_counter() - t0)
                await s.close()
                print(f"rtt 64 B ping-pong (n={len(rtts)}): median "
                      f"{statistics.median(rtts) * 1e3:.3f} ms, p90 "
                      f"{statistics.quantiles(rtts, n=10)[-1] * 1e3:.3f} ms, "
                      f"min {min(rtts) * 1e3:.3f} ms")

    trio.run(main)

