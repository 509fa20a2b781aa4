"""The tunnel's framings, without a tunnel: the default passes every read on, the ggml-RPC
one (localp2p.llama.burst) holds a burst until the message somebody waits for.

Run: .venv/bin/python -m pytest tests/test_tunnel_framing.py -q
(Through real libp2p hosts: test_tunnel_sends_each_rpc_burst_as_one_frame in test_p2p_tunnel.py.)
"""

from __future__ import annotations

import struct

from localp2p.llama import rpc
from localp2p.llama.burst import GATHER_LIMIT, HOLD_TIMEOUT, RpcBurstFraming
from localp2p.p2p.tunnel import ConnectionFraming, PassThrough


def _request(cmd: int, payload: bytes) -> bytes:
    return struct.pack("<BQ", cmd, len(payload)) + payload


HELLO = _request(rpc.RPC_CMD_HELLO, bytes(rpc.CONN_CAPS_SIZE))
SET_TENSOR = _request(rpc.RPC_CMD_SET_TENSOR, b"s" * 10)
GET_TENSOR = _request(8, b"g" * 4)


def test_pass_through_holds_nothing() -> None:
    framing: ConnectionFraming = PassThrough("server")
    framing.from_peer(HELLO)
    assert framing.ends_burst(SET_TENSOR) and framing.ends_burst(b"x")
    assert framing.gather_limit == 0


def test_server_end_holds_unanswered_requests() -> None:
    framing: ConnectionFraming = RpcBurstFraming("server")
    assert (framing.hold_timeout, framing.gather_limit) == (HOLD_TIMEOUT, GATHER_LIMIT)
    assert framing.ends_burst(HELLO)  # answered
    assert not framing.ends_burst(SET_TENSOR)  # never answered: hold it
    assert not framing.ends_burst(GET_TENSOR[:3])
    assert framing.ends_burst(GET_TENSOR[3:])  # waited for: the burst goes


def test_worker_end_learns_the_protocol_from_the_peer() -> None:
    framing = RpcBurstFraming("worker")
    framing.from_peer(HELLO)
    reply = struct.pack("<Q", 4) + b"abcd"
    assert not framing.ends_burst(reply[:8])  # the size, without its payload: hold it
    assert framing.ends_burst(reply[8:])


def test_other_bytes_are_relayed_as_read() -> None:
    echo = RpcBurstFraming("server")
    assert echo.ends_burst(b"E" * 64) and echo.ends_burst(b"\x06")  # first byte not HELLO: never held
    worker = RpcBurstFraming("worker")
    worker.from_peer(b"E")
    assert worker.ends_burst(struct.pack("<Q", 4))
    turned = RpcBurstFraming("server")
    assert turned.ends_burst(HELLO)
    assert turned.ends_burst(b"\x06" + b"\xff" * 8)  # a length no ggml-RPC message has
    assert turned.ends_burst(SET_TENSOR)  # ...and from then on everything goes as read
