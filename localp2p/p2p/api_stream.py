"""HTTP over a libp2p stream: one OpenAI API request per stream, between nodes that proved the token.

Protocol :data:`API_PROTOCOL`. Every message is a frame: a big-endian u32 length and that
many bytes. The caller sends::

    head  : JSON {"method", "path", "query", "headers": [[name, value], ...]}
    body  : zero or more frames, then an empty frame (end of the body)

and keeps its side open until the answer ends: resetting the stream is how it says "I went
away" (the serving side then cancels the request, and with it the generation). The server
answers::

    head  : JSON {"status", "headers": [[name, value], ...]}
    body  : one frame per chunk the HTTP app produced (an SSE event as it comes), then an empty frame

A stream that ends (EOF or reset) before the final empty frame is a broken answer
(:class:`ApiStreamBroken`). :data:`INFO_PROTOCOL` is a one-frame announcement a server
sends about itself (models, load; see :mod:`localp2p.p2p.federation`).

Both ends are here: :func:`serve_asgi` runs one request from a stream through an ASGI app
(the server's own HTTP app, so API keys, validation and metrics hold as for local callers),
and :func:`call` sends one request and returns an :class:`ApiReply` to read the answer from.
Handlers that use these must have asked the :class:`~localp2p.p2p.auth.AuthGate` first:
nothing here is read from a stream before the caller says so.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from localp2p.logs import get_logger

from .auth import shielded_write
from .node import P2PNode
from .streams import close_or_reset, quiet_reset

__all__ = [
    "API_PROTOCOL",
    "INFO_PROTOCOL",
    "MAX_BODY",
    "ApiCallFailed",
    "ApiReply",
    "ApiStreamBroken",
    "FrameReader",
    "RequestHead",
    "call",
    "read_info",
    "serve_asgi",
    "write_info",
]

API_PROTOCOL = "/localp2p/api/1.0.0"
INFO_PROTOCOL = "/localp2p/api-info/1.0.0"
#: Largest head frame (bytes): a request line and headers, never a body.
MAX_HEAD = 64 * 1024
#: Largest request body (bytes): the HTTP app's own cap (localp2p.api.app.MAX_BODY_BYTES).
MAX_BODY = 8 * 1024 * 1024
#: Largest single frame (bytes): a body part or a response chunk.
MAX_FRAME = MAX_BODY
#: Largest announcement (bytes): a model list and a few counters.
MAX_INFO = 64 * 1024
#: Bytes asked of the stream per read: one Yamux window's worth.
READ_CHUNK = 256 * 1024
#: Request headers that describe the hop, not the request: never carried over.
HOP_HEADERS = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "upgrade", "te", "content-length"})
#: Methods carried; anything else is answered 405 by the caller's side.
METHODS = frozenset({"GET", "POST", "DELETE", "OPTIONS", "HEAD"})

_log: Any = get_logger(__name__)
_U32 = struct.Struct(">I")


class ApiStreamBroken(Exception):
    """The stream ended (EOF, reset, a malformed frame) before the message did."""


class ApiCallFailed(Exception):
    """:func:`call` got no answer head: the stream could not be opened, or broke, or timed out."""


def frame(payload: bytes) -> bytes:
    """``u32 length | payload``."""
    return _U32.pack(len(payload)) + payload


class FrameReader:
    """Reads u32-length frames from a stream; owns the bytes read past the last frame."""

    def __init__(self, stream: INetStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self, n: int) -> None:
        while len(self._buffer) < n:
            try:
                chunk = await self._stream.read(READ_CHUNK)
            except Exception as exc:  # StreamEOF, StreamReset, StreamError
                raise ApiStreamBroken(f"stream ended ({type(exc).__name__})") from None
            if not chunk:
                raise ApiStreamBroken("stream ended")
            self._buffer += chunk

    async def read(self, limit: int) -> bytes:
        """One frame's payload. :raises ApiStreamBroken: EOF, reset, or a frame over ``limit``."""
        await self._fill(4)
        (size,) = _U32.unpack_from(self._buffer)
        if size > limit:
            raise ApiStreamBroken(f"frame of {size} bytes exceeds {limit}")
        await self._fill(4 + size)
        payload = bytes(self._buffer[4 : 4 + size])
        del self._buffer[: 4 + size]
        return payload

    async def read_json(self, limit: int) -> dict[str, Any]:
        """One frame holding a JSON object. :raises ApiStreamBroken: anything else."""
        raw = await self.read(limit)
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ApiStreamBroken("head is not JSON") from None
        if not isinstance(value, dict):
            raise ApiStreamBroken("head is not a JSON object")
        return value


def _header_pairs(value: Any) -> list[tuple[str, str]]:
    """``[[name, value], ...]`` checked; :raises ApiStreamBroken: any other shape."""
    if not isinstance(value, list):
        raise ApiStreamBroken("headers are not a list")
    out = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise ApiStreamBroken("a header is not a [name, value] pair of strings")
        out.append((pair[0], pair[1]))
    return out


@dataclass(frozen=True)
class RequestHead:
    """What a forwarded request says before its body."""

    method: str
    path: str
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self) -> bytes:
        return json.dumps(
            {"method": self.method, "path": self.path, "query": self.query, "headers": [list(h) for h in self.headers]},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, value: dict[str, Any]) -> RequestHead:
        """:raises ApiStreamBroken: a field missing or of the wrong type, a method not carried."""
        method, path, query = value.get("method"), value.get("path"), value.get("query", "")
        if not isinstance(method, str) or method not in METHODS:
            raise ApiStreamBroken(f"method {method!r} is not carried")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ApiStreamBroken("path is not an absolute path")
        if not isinstance(query, str):
            raise ApiStreamBroken("query is not a string")
        return cls(method, path, query, tuple(_header_pairs(value.get("headers", []))))

    @classmethod
    def from_scope(cls, scope: dict[str, Any]) -> RequestHead:
        """The head of the ASGI request ``scope``, hop-by-hop headers left out."""
        headers = tuple(
            (k.decode("latin-1").lower(), v.decode("latin-1"))
            for k, v in scope.get("headers", [])
            if k.decode("latin-1").lower() not in HOP_HEADERS
        )
        return cls(scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"), headers)


# -- the serving end ----------------------------------------------------------------------------


async def serve_asgi(stream: INetStream, app: Callable[..., Any], extra_scope: dict[str, Any]) -> None:
    """Run the one request on ``stream`` through the ASGI ``app`` and stream its answer back.

    Owns the stream from here: it is closed when the answer ended, reset when the app
    failed part-way or the caller went away (its reset, or EOF, cancels the app: a
    generation stops). ``extra_scope`` goes into the ASGI scope (who called). A request
    that is malformed, or a body over :data:`MAX_BODY`, gets the stream reset. Never raises
    for the peer's faults.
    """
    reader = FrameReader(stream)
    try:
        head = RequestHead.decode(await reader.read_json(MAX_HEAD))
        body = bytearray()
        while part := await reader.read(MAX_FRAME):
            body += part
            if len(body) > MAX_BODY:
                raise ApiStreamBroken(f"body exceeds {MAX_BODY} bytes")
    except ApiStreamBroken as exc:
        _log.info("bad api stream request", error=str(exc))
        await quiet_reset(stream)
        return
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": head.method,
        "scheme": "http",
        "path": head.path,
        "raw_path": head.path.encode("utf-8", "replace"),
        "query_string": head.query.encode("latin-1", "replace"),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1", "replace"), v.encode("latin-1", "replace")) for k, v in head.headers]
        + [(b"content-length", str(len(body)).encode())],
        "client": None,
        "server": None,
        **extra_scope,
    }
    gone = trio.Event()
    state = {"body_sent": False, "ended": False}
    #: The answer's head, held back to go out in one write with the first body part (one
    #: Noise frame and one Yamux frame fewer before the first byte).
    pending = bytearray()

    async def receive() -> dict[str, Any]:
        if not state["body_sent"]:
            state["body_sent"] = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in message.get("headers", [])]
            payload = json.dumps({"status": int(message["status"]), "headers": headers}, separators=(",", ":")).encode()
            pending.extend(frame(payload))
        elif kind == "http.response.body":
            data = bytes(message.get("body", b""))
            out = bytes(pending) + (frame(data) if data else b"")
            pending.clear()
            if not message.get("more_body", False):
                out += frame(b"")
                state["ended"] = True
            if out:
                await shielded_write(stream, out)

    async with trio.open_nursery() as nursery:

        async def watch_caller() -> None:
            """The caller sends nothing after the body: any read result means it went away."""
            try:
                await stream.read(1)
            except Exception:
                pass
            gone.set()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_caller)
        try:
            await app(scope, receive, send)
        except Exception as exc:
            _log.warning("api stream request failed", path=head.path, error=f"{type(exc).__name__}: {exc}")
        nursery.cancel_scope.cancel()
    if state["ended"] and not gone.is_set():
        await close_or_reset(stream)
    else:
        await quiet_reset(stream)


# -- the calling end ----------------------------------------------------------------------------


class ApiReply:
    """An answer being read from a stream: status and headers now, the body as it comes.

    Owns the stream: :meth:`aclose` closes it once the answer ended, and resets it
    otherwise (which cancels the request on the serving side). ``on_close`` runs once then.
    """

    def __init__(
        self,
        stream: INetStream,
        reader: FrameReader,
        status: int,
        headers: list[tuple[str, str]],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.stream = stream
        self._reader = reader
        self.status = status
        self.headers = headers
        self.ended = False
        self._on_close = on_close
        self._closed = False

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as the server produced them. :raises ApiStreamBroken: the stream broke first."""
        while not self.ended:
            data = await self._reader.read(MAX_FRAME)
            if not data:
                self.ended = True
                return
            yield data

    async def read_all(self) -> bytes:
        """The whole body. :raises ApiStreamBroken: the stream broke first."""
        out = bytearray()
        async for chunk in self.chunks():
            out += chunk
        return bytes(out)

    async def aclose(self) -> None:
        """Close (answer complete) or reset (not); shielded and bounded; runs ``on_close`` once."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.ended:
                await close_or_reset(self.stream)
            else:
                await quiet_reset(self.stream)
        finally:
            if self._on_close is not None:
                self._on_close()


async def call(
    node: P2PNode,
    peer_id: ID,
    head: RequestHead,
    body: bytes,
    *,
    timeout: float,
    connect_timeout: float | None = None,
    on_close: Callable[[], None] | None = None,
) -> ApiReply:
    """Send one request to ``peer_id`` and wait for the answer's head, all within ``timeout`` s
    (opening the stream and sending the request within ``connect_timeout``, when given).

    The caller owns the returned reply (``await reply.aclose()``); ``on_close`` runs when it
    is closed, or at once when this raises.

    :raises ApiCallFailed: no stream (unreachable, no handler), the stream broke, or no head in time.
    """
    stream: INetStream | None = None
    try:
        with trio.fail_after(timeout):
            with trio.fail_after(connect_timeout if connect_timeout is not None else timeout):
                try:
                    stream = await node.new_stream(peer_id, API_PROTOCOL)
                except Exception as exc:
                    raise ApiCallFailed(f"cannot open an api stream ({type(exc).__name__}: {exc})") from None
                out = frame(head.encode())
                for start in range(0, len(body), MAX_FRAME):
                    out += frame(body[start : start + MAX_FRAME])
                out += frame(b"")
                try:
                    await shielded_write(stream, out)
                except Exception as exc:
                    raise ApiCallFailed(f"cannot send the request ({type(exc).__name__})") from None
            reader = FrameReader(stream)
            try:
                value = await reader.read_json(MAX_HEAD)
                status = value.get("status")
                if not isinstance(status, int) or not 100 <= status < 600:
                    raise ApiStreamBroken("status is not an HTTP status")
                headers = _header_pairs(value.get("headers", []))
            except ApiStreamBroken as exc:
                raise ApiCallFailed(f"no answer ({exc})") from None
    except BaseException as exc:
        if stream is not None:
            await quiet_reset(stream)
        if on_close is not None:
            on_close()
        if isinstance(exc, trio.TooSlowError):
            raise ApiCallFailed(f"no answer within {timeout:g} s") from None
        raise
    return ApiReply(stream, reader, status, headers, on_close)


# -- announcements ------------------------------------------------------------------------------


async def write_info(stream: INetStream, info: dict[str, Any]) -> None:
    """Send the one announcement frame of :data:`INFO_PROTOCOL` (the handler's caller closes)."""
    await shielded_write(stream, frame(json.dumps(info, separators=(",", ":")).encode()))


async def read_info(node: P2PNode, peer_id: ID, *, timeout: float) -> dict[str, Any]:
    """Ask ``peer_id`` for its announcement. :raises ApiCallFailed: no answer in ``timeout`` s, or a malformed one."""
    stream: INetStream | None = None
    try:
        with trio.fail_after(timeout):
            stream = await node.new_stream(peer_id, INFO_PROTOCOL)
            return await FrameReader(stream).read_json(MAX_INFO)
    except trio.TooSlowError:
        raise ApiCallFailed(f"no announcement within {timeout:g} s") from None
    except ApiStreamBroken as exc:
        raise ApiCallFailed(f"bad announcement ({exc})") from None
    except Exception as exc:
        raise ApiCallFailed(f"cannot ask for the announcement ({type(exc).__name__}: {exc})") from None
    finally:
        if stream is not None:
            await close_or_reset(stream)
