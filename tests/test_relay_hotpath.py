"""The tunnel's per-frame fast paths: ggml-RPC message boundaries and localp2p.p2p._libp2p.hotpath.

Run: .venv/bin/python -m pytest tests/test_relay_hotpath.py -q
(The relay itself is tested end to end, through real libp2p hosts, in test_p2p_tunnel.py.)
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio
from libp2p.io.trio import TrioTCPStream

from localp2p.llama import rpc
from localp2p.p2p import _libp2p
from localp2p.p2p._libp2p import hotpath

_libp2p.install()  # as open_node does first: these tests use py-libp2p's classes without a node


def _request(cmd: int, payload: bytes) -> bytes:
    return struct.pack("<BQ", cmd, len(payload)) + payload


def test_message_boundaries_requests() -> None:
    b = rpc.MessageBoundaries(requests=True)
    assert b.feed(_request(rpc.RPC_CMD_HELLO, bytes(24)))  # answered
    set_tensor = _request(rpc.RPC_CMD_SET_TENSOR, b"abcde")
    assert not b.feed(set_tensor)  # never answered: a relay may hold it
    for i in range(1, len(set_tensor)):  # split anywhere, header included
        assert not b.feed(set_tensor[:i])
        assert not b.feed(set_tensor[i:])
    get = _request(8, b"xyz")
    assert not b.feed(get[:4])  # half a header
    assert b.feed(get[4:])
    assert b.feed(set_tensor + _request(rpc.RPC_CMD_GRAPH_COMPUTE, b"g") + get)  # a whole burst in one read
    assert not b.feed(set_tensor + get + set_tensor)  # ends on an unanswered one
    assert b.feed(_request(rpc.RPC_CMD_DEVICE_COUNT, b""))  # empty payload


def test_message_boundaries_replies_and_foreign_bytes() -> None:
    b = rpc.MessageBoundaries(requests=False)
    assert not b.feed(struct.pack("<Q", 4))
    assert not b.feed(b"ab")
    assert b.feed(b"cd")
    assert b.feed(struct.pack("<Q", 0))
    assert b.feed(struct.pack("<Q", 1) + b"x" + struct.pack("<Q", 2) + b"yz")
    with pytest.raises(ValueError, match="not ggml-RPC"):
        rpc.MessageBoundaries(requests=False).feed(b"E" * 64)  # the link bench's echo, say


def test_free_lock_keeps_fifo_and_cancellation() -> None:
    async def main() -> None:
        lock = hotpath.FreeLock()
        order: list[int] = []

        async def waiter(i: int) -> None:
            async with lock:
                order.append(i)
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            await lock.acquire()
            for i in range(3):
                nursery.start_soon(waiter, i)
                await trio.sleep(0.01)  # queued in this order
            assert lock.statistics().tasks_waiting == 3
            lock.release()
        assert order == [0, 1, 2]
        with trio.CancelScope() as scope:  # a free lock in a cancelled scope still raises Cancelled
            scope.cancel()
            await lock.acquire()
            pytest.fail("acquire did not see the cancellation")
        assert not lock.locked()
        await lock.acquire()

        async def other() -> None:
            lock.release()

        with pytest.RaisesGroup(RuntimeError):  # only the owner releases
            async with trio.open_nursery() as nursery:
                nursery.start_soon(other)
        lock.release()

    trio.run(main)


def test_free_semaphore_any_task_releases() -> None:
    async def main() -> None:
        sem = hotpath.FreeSemaphore(1)
        await sem.acquire()
        assert sem.value == 0
        got = trio.Event()

        async def second() -> None:
            await sem.acquire()
            got.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await trio.sleep(0.01)
            assert not got.is_set()

            async def release() -> None:  # another task releases
                sem.release()

            nursery.start_soon(release)
            await got.wait()

    trio.run(main)


def test_buffered_reads_keep_bytes_and_eof() -> None:
    """py-libp2p's TCP stream reads ahead: exact sizes come back in order, EOF is b""."""

    async def main() -> None:
        a, b = socket.socketpair()
        left, right = trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(
            trio.socket.from_stdlib_socket(b)
        )
        reader = TrioTCPStream(right)
        assert isinstance(reader.read_lock, hotpath.FreeLock)
        frames = [bytes([i]) * (i * 1000 + 1) for i in range(1, 6)]
        await left.send_all(b"".join(struct.pack(">H", len(f)) + f for f in frames))  # one send, five frames
        got = []
        for _ in frames:
            (n,) = struct.unpack(">H", await reader.read(2))
            body = b""
            while len(body) < n:
                body += await reader.read(n - len(body))
            got.append(body)
        assert got == frames
        await left.send_all(b"tail")
        await left.aclose()
        assert await reader.read(2) == b"ta"
        assert await reader.read(None) == b"il"
        assert await reader.read(10) == b""  # EOF
        await reader.close()

    trio.run(main)
