"""Tensor streams between token holders: who has which tensors, and their bytes.

Two protocols, both token-gated like the tunnels (the handler calls
:meth:`~localp2p.p2p.auth.AuthGate.require` before it reads a byte):

``/localp2p/tensors/1.0.0`` (any token holder serves it: the server from its model
file, workers from their model files and tensor caches). One request per stream, a
JSON message (``u32`` big-endian length, then the JSON)::

    {"op": "have", "hashes": ["<16 hex>", ...]}  ->  message {"have": ["<16 hex>", ...]}
    {"op": "get", "hash": "<16 hex>", "size": N}  ->  1 status byte (0 = here it comes,
                                                      1 = missing), then N bytes

The bytes go in chunks of :data:`CHUNK`; the receiver checks the hash (the sender is
not trusted: a tensor is only as good as its hash).

``/localp2p/weights/1.0.0`` (the server to a worker, before a load): one message
with the plan (the tensors the worker will hold and who may have them), answered by
progress messages until one says ``"done": true``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from localp2p.logs import get_logger

from .auth import AuthGate, shielded_write
from .node import P2PNode
from .streams import StreamHandler, close_or_reset, quiet_reset, remote_peer_id

log = get_logger("weights")

TENSOR_PROTOCOL = "/localp2p/tensors/1.0.0"
WEIGHTS_PROTOCOL = "/localp2p/weights/1.0.0"
#: Bytes per write of tensor data: big enough that framing costs nothing, small enough
#: that one write never holds a connection long (every write is shielded).
CHUNK = 1 << 20
#: Largest JSON message read (a plan for a big model lists a few thousand tensors).
MAX_MESSAGE = 4 << 20
#: Seconds a request may take to arrive, and a "have" answer.
REQUEST_TIMEOUT = 10.0
#: Seconds without a byte of a tensor before its fetch counts as failed (a stalled peer).
STALL_TIMEOUT = 20.0
STATUS_OK, STATUS_MISSING = 0, 1

#: Where a tensor's bytes are: (file path, offset, size), or None. Blocking (a stat or two).
Locate = Callable[[int], "tuple[str, int, int] | None"]


class TensorStreamError(Exception):
    """A tensor stream failed: the peer went away, refused, stalled or spoke nonsense; one line."""


async def read_exactly(stream: INetStream, n: int) -> bytes:
    """Exactly ``n`` bytes. :raises TensorStreamError: the stream ended first."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except StreamEOF:
            chunk = b""
        except Exception as exc:  # StreamReset, StreamError
            raise TensorStreamError(f"stream failed ({type(exc).__name__})") from None
        if not chunk:
            raise TensorStreamError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def write_message(stream: INetStream, message: dict[str, Any]) -> None:
    """One JSON message. :raises TensorStreamError: the stream failed."""
    raw = json.dumps(message, separators=(",", ":")).encode()
    try:
        await shielded_write(stream, struct.pack(">I", len(raw)) + raw)
    except Exception as exc:
        raise TensorStreamError(f"write failed ({type(exc).__name__}: {exc})") from None


async def read_message(stream: INetStream) -> dict[str, Any]:
    """One JSON object message. :raises TensorStreamError: EOF, oversized or not a JSON object."""
    (size,) = struct.unpack(">I", await read_exactly(stream, 4))
    if size > MAX_MESSAGE:
        raise TensorStreamError(f"message of {size} bytes is too big")
    try:
        data = json.loads(await read_exactly(stream, size))
    except ValueError:
        raise TensorStreamError("message is not JSON") from None
    if not isinstance(data, dict):
        raise TensorStreamError("message is not a JSON object")
    return data


def parse_hash(text: object) -> int:
    """A ``<16 hex>`` hash. :raises TensorStreamError:"""
    if not isinstance(text, str) or len(text) != 16:
        raise TensorStreamError(f"not a tensor hash: {text!r}")
    try:
        return int(text, 16)
    except ValueError:
        raise TensorStreamError(f"not a tensor hash: {text!r}") from None


def _read_range(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"{path}: short read")
    return data


def tensor_handler(gate: AuthGate, locate: Locate, served: Callable[[ID, int], None] | None = None) -> StreamHandler:
    """The :data:`TENSOR_PROTOCOL` handler: answers "have" and "get" from ``locate``.

    ``served(peer, bytes)`` is told each chunk sent (counters). Refuses (resets) an
    unauthenticated peer before reading anything; a malformed request resets the
    stream. Never raises except Cancelled.
    """

    async def handle_tensors(stream: INetStream) -> None:
        if not await gate.require(stream):
            return
        peer = remote_peer_id(stream)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await read_message(stream)
            op = request.get("op")
            if op == "have":
                hashes = request.get("hashes")
                if not isinstance(hashes, list):
                    raise TensorStreamError("have: no hash list")
                wanted = [parse_hash(h) for h in hashes]
                found = await trio.to_thread.run_sync(lambda: [h for h in wanted if locate(h) is not None])
                await write_message(stream, {"have": [f"{h:016x}" for h in found]})
            elif op == "get":
                hash_, size = parse_hash(request.get("hash")), request.get("size")
                where = await trio.to_thread.run_sync(locate, hash_)
                if where is None or not isinstance(size, int) or where[2] != size:
                    await shielded_write(stream, bytes([STATUS_MISSING]))
                else:
                    await shielded_write(stream, bytes([STATUS_OK]))
                    path, offset, _ = where
                    sent = 0
                    while sent < size:
                        n = min(CHUNK, size - sent)
                        data = await trio.to_thread.run_sync(_read_range, path, offset + sent, n)
                        await shielded_write(stream, data)
                        sent += n
                        if served is not None:
                            served(peer, n)
            else:
                raise TensorStreamError(f"unknown op {op!r}")
        except (TensorStreamError, trio.TooSlowError, OSError) as exc:
            log.info("tensor request failed", peer=str(peer), error=str(exc) or type(exc).__name__)
            await quiet_reset(stream)
            return
        except Exception as exc:  # the stream broke under a write
            log.info("tensor stream failed", peer=str(peer), error=f"{type(exc).__name__}: {exc}")
            await quiet_reset(stream)
            return
        await close_or_reset(stream)

    return handle_tensors


async def _request(node: P2PNode, peer: ID, message: dict[str, Any]) -> INetStream:
    """A new tensor stream to ``peer`` with ``message`` sent on it; the caller owns the stream.

    :raises TensorStreamError: the stream could not be opened.
    """
    try:
        stream = await node.new_stream(peer, TENSOR_PROTOCOL)
    except Exception as exc:
        raise TensorStreamError(f"cannot open a tensor stream ({type(exc).__name__}: {exc})") from None
    try:
        await write_message(stream, message)
    except BaseException:
        await quiet_reset(stream)
        raise
    return stream


async def ask_have(node: P2PNode, peer: ID, hashes: list[int]) -> set[int]:
    """Which of ``hashes`` ``peer`` can send. :raises TensorStreamError: (any failure, timeouts included)."""
    stream: INetStream | None = None
    try:
        with trio.fail_after(REQUEST_TIMEOUT):
            stream = await _request(node, peer, {"op": "have", "hashes": [f"{h:016x}" for h in hashes]})
            reply = await read_message(stream)
        have = reply.get("have")
        if not isinstance(have, list):
            raise TensorStreamError("have: malformed answer")
        return {parse_hash(h) for h in have} & set(hashes)
    except trio.TooSlowError:
        raise TensorStreamError("have: timed out") from None
    finally:
        if stream is not None:
            await close_or_reset(stream)


async def get_tensor(node: P2PNode, peer: ID, hash_: int, size: int, sink: Callable[[int, bytes], Awaitable[None]]) -> None:
    """Stream one tensor from ``peer`` into ``sink(offset, chunk)``; the caller checks the hash.

    :raises TensorStreamError: the peer lacks it, stalls (STALL_TIMEOUT without a byte), or the stream fails.
    """
    stream: INetStream | None = None
    ok = False
    try:
        with trio.fail_after(REQUEST_TIMEOUT):
            stream = await _request(node, peer, {"op": "get", "hash": f"{hash_:016x}", "size": size})
            status = await read_exactly(stream, 1)
        if status[0] != STATUS_OK:
            raise TensorStreamError("the peer does not have it")
        got = 0
        while got < size:
            with trio.fail_after(STALL_TIMEOUT):
                try:
                    chunk = await stream.read(min(CHUNK, size - got))
                except StreamEOF:
                    chunk = b""
                except Exception as exc:
                    raise TensorStreamError(f"stream failed after {got} bytes ({type(exc).__name__})") from None
            if not chunk:
                raise TensorStreamError(f"stream ended after {got} of {size} bytes")
            await sink(got, chunk)
            got += len(chunk)
        ok = True
    except trio.TooSlowError:
        raise TensorStreamError("stalled") from None
    finally:
        if stream is not None:
            if ok:
                await close_or_reset(stream)
            else:
                await quiet_reset(stream)
