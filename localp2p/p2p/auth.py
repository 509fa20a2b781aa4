"""Token proof: peers show they hold the network token before anything else.

Protocol ``/localp2p/auth/1.0.0``, run on a libp2p stream (already Noise
encrypted, so both peer ids are authenticated by the transport). ``I`` is the
initiator, ``R`` the responder, ``k = token.auth_key()``::

    I -> R : nonce_i (32)
    R -> I : nonce_r (32) | mac_r (32)      mac_r = HMAC(k, "lp2p-auth-r" | T)
    I -> R : mac_i (32) | hello_i (JSON)    mac_i = HMAC(k, "lp2p-auth-i" | T | hello_i)
    R -> I : mac_h (32) | hello_r (JSON)    mac_h = HMAC(k, "lp2p-auth-h" | T | hello_r)

    T = nonce_i | nonce_r | len|id_i | len|id_r   (ids: peer id bytes, u16 length prefix)

Every message is one frame: a big-endian u16 length and at most
:data:`MAX_FRAME` bytes. Fresh nonces on both sides make a recorded handshake
useless on a new stream, and the peer ids in ``T`` make it useless between other
peers. Neither side says anything about itself (its hello) before the other has
proved the token: ``R`` proves first but reveals only a MAC; ``I`` sends its
hello only after checking ``R``'s proof.

A "hello" is a small JSON object, ``{"role": "server"|"worker"|"relay"|"client", "name": str,
...extra}``; workers add their rpc protocol version and device memory.

:class:`AuthGate` (one per node) runs both sides, remembers which peers proved
the token (until their last connection closes) and is the check every other
handler makes first (:meth:`AuthGate.require`). A peer that fails, sends
malformed or oversized frames, or stalls is refused within :data:`AUTH_TIMEOUT`
and its stream reset; refusals are counted per peer and logged at most once per
peer per :data:`REFUSAL_LOG_INTERVAL`. The token never appears in logs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from localp2p.logs import get_logger
from localp2p.p2p.token import NetworkToken

from .node import P2PNode, remote_peer_id

__all__ = [
    "AUTH_PROTOCOL",
    "AUTH_TIMEOUT",
    "MAX_FRAME",
    "MAX_HELLO",
    "AuthError",
    "AuthGate",
    "PeerHello",
    "Role",
    "encode_frame",
    "mac",
    "read_frame",
    "shielded_write",
    "transcript",
]

AUTH_PROTOCOL = "/localp2p/auth/1.0.0"
#: Whole-handshake bound (s): three round trips on a LAN take milliseconds, so a
#: peer slower than this is stalling on purpose or broken.
AUTH_TIMEOUT = 1.0
#: Largest frame we read (bytes): enough for a hello, small enough that an
#: unauthenticated peer cannot make us buffer anything meaningful.
MAX_FRAME = 4096
#: Largest hello JSON (bytes): a frame minus its MAC, with room to spare.
MAX_HELLO = MAX_FRAME - 64
#: Nonce size (bytes): 256 bits, never repeats.
NONCE_SIZE = 32
#: HMAC-SHA256 output size (bytes).
MAC_SIZE = 32
#: Refusals of one peer are logged at most this often (s), so a hostile or
#: misconfigured peer cannot flood the log.
REFUSAL_LOG_INTERVAL = 60.0
#: Peers tracked for refusal counts/log rate limiting; older entries are dropped
#: so peer-id churn by an attacker cannot grow memory without bound.
REFUSAL_TRACK_MAX = 1024
#: Longest one shielded stream write may take (s); see :func:`shielded_write`.
WRITE_TIMEOUT = 30.0
#: Seconds a reset issued during cleanup may take.
_RESET_TIMEOUT = 1.0

_LABEL_R = b"lp2p-auth-r"
_LABEL_I = b"lp2p-auth-i"
_LABEL_H = b"lp2p-auth-h"

Role = Literal["server", "worker", "relay", "client"]
_ROLES = ("server", "worker", "relay", "client")

_log = get_logger(__name__)


class AuthError(Exception):
    """The token proof with a peer failed; ``reason`` is one short line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Refused(Exception):
    """Internal: the handshake must stop; carries the refusal reason."""


@dataclass(frozen=True)
class PeerHello:
    """What an authenticated peer said about itself."""

    peer_id: ID
    role: Role
    name: str
    extra: dict[str, Any] = field(default_factory=dict)
    authenticated_at: float = field(default_factory=time.monotonic)


# --------------------------------------------------------------------------
# framing and MACs
# --------------------------------------------------------------------------


def encode_frame(payload: bytes) -> bytes:
    """``u16 length | payload``. Raises ValueError if payload exceeds :data:`MAX_FRAME`."""
    if len(payload) > MAX_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME}")
    return struct.pack(">H", len(payload)) + payload


async def _read_exactly(stream: INetStream, n: int) -> bytes:
    """Read exactly ``n`` bytes; raises _Refused on EOF/reset."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.read(n - len(buf))
        except Exception as exc:  # StreamEOF, StreamReset, StreamError
            raise _Refused(f"stream ended during handshake ({type(exc).__name__})") from None
        if not chunk:
            raise _Refused("stream ended during handshake")
        buf += chunk
    return bytes(buf)


async def read_frame(stream: INetStream, max_size: int = MAX_FRAME) -> bytes:
    """Read one frame. Raises ``_Refused`` (internal) for EOF or an oversized length.

    Never reads more than the 2-byte header plus ``max_size`` bytes.
    """
    (size,) = struct.unpack(">H", await _read_exactly(stream, 2))
    if size > max_size:
        raise _Refused(f"oversized frame ({size} bytes)")
    return await _read_exactly(stream, size)


async def shielded_write(stream: INetStream, data: bytes, timeout: float = WRITE_TIMEOUT) -> None:
    """``stream.write(data)`` that cancellation cannot interrupt part-way.

    py-libp2p 0.8.1 Noise-encrypts a frame (advancing the connection's nonce)
    before it sends it; a write cancelled after that point leaves a missing or
    partial frame and breaks the *whole connection* for every stream on it
    (verified). So the write is shielded and bounded by its own ``timeout``
    instead; a write still stuck then means the connection is dead anyway.
    A cancellation that arrived meanwhile is seen at the caller's next
    checkpoint.

    :raises trio.TooSlowError: the write took longer than ``timeout``.
    :raises libp2p.network.stream.exceptions.StreamError: the stream failed.
    """
    with trio.CancelScope(shield=True, deadline=trio.current_time() + timeout) as scope:
        await stream.write(data)
    if scope.cancelled_caught:
        raise trio.TooSlowError(f"libp2p stream write stalled for {timeout} s")


async def _write(stream: INetStream, payload: bytes) -> None:
    try:
        await shielded_write(stream, encode_frame(payload), AUTH_TIMEOUT)
    except Exception as exc:
        raise _Refused(f"stream failed during handshake ({type(exc).__name__})") from None


def _lp(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def transcript(nonce_i: bytes, nonce_r: bytes, id_i: ID, id_r: ID) -> bytes:
    """The bytes both MACs cover: both nonces and both peer ids."""
    return nonce_i + nonce_r + _lp(id_i.to_bytes()) + _lp(id_r.to_bytes())


def mac(key: bytes, label: bytes, data: bytes) -> bytes:
    """HMAC-SHA256(key, label | data)."""
    return hmac.new(key, label + data, hashlib.sha256).digest()


def _encode_hello(hello: dict[str, Any]) -> bytes:
    try:
        raw = json.dumps(hello, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"hello is not JSON-serialisable: {exc}") from exc
    if len(raw) > MAX_HELLO:
        raise ValueError(f"hello is {len(raw)} bytes, more than {MAX_HELLO}")
    return raw


def _decode_hello(raw: bytes, peer_id: ID) -> PeerHello:
    """Validate a peer's hello; raises _Refused with a short reason."""
    if len(raw) > MAX_HELLO:
        raise _Refused("hello too large")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _Refused("hello is not JSON") from None
    if not isinstance(data, dict):
        raise _Refused("hello is not a JSON object")
    role = data.pop("role", None)
    name = data.pop("name", "")
    if role not in _ROLES:
        raise _Refused("hello has no valid role")
    if not isinstance(name, str) or len(name) > 128:
        raise _Refused("hello has an invalid name")
    return PeerHello(peer_id=peer_id, role=role, name=name, extra=data)


# --------------------------------------------------------------------------
# the gate
# --------------------------------------------------------------------------


class AuthGate:
    """Runs the token proof and remembers which peers passed it.

    One per node. Owns: the set of authenticated peers and their hellos (a peer
    is forgotten when its last connection closes), per-peer refusal counters
    (:attr:`refused`) and the refusal-log rate limiter. Call :meth:`install`
    once to register the responder handler and the disconnect hook.
    """

    def __init__(self, token: NetworkToken, own_hello: dict[str, Any], role: Role) -> None:
        """:raises ValueError: bad role, or a hello that is not JSON or too large."""
        if role not in _ROLES:
            raise ValueError(f"role must be one of {_ROLES}, got {role!r}")
        self._key = token.auth_key()
        self.role: Role = role
        self._hello_raw = b""
        self.set_hello(own_hello)
        self._peers: dict[ID, PeerHello] = {}
        #: refusals per peer id (responder and initiator side, and :meth:`require`)
        self.refused: OrderedDict[ID, int] = OrderedDict()
        self._last_logged: OrderedDict[ID, float] = OrderedDict()
        self._node: P2PNode | None = None

    def __repr__(self) -> str:  # never show the key
        return f"AuthGate(role={self.role!r}, authenticated={len(self._peers)})"

    # -- setup ------------------------------------------------------------------

    def set_hello(self, own_hello: dict[str, Any]) -> None:
        """Replace what we tell peers about ourselves (``role`` is always ours).

        :raises ValueError: not JSON-serialisable or larger than :data:`MAX_HELLO`.
        """
        hello = dict(own_hello)
        hello["role"] = self.role
        hello.setdefault("name", "")
        self._hello_raw = _encode_hello(hello)

    def install(self, node: P2PNode) -> None:
        """Register the responder on ``node`` and forget peers when they disconnect."""
        self._node = node
        node.set_handler(AUTH_PROTOCOL, self._handle)
        node.on_peer_disconnected(self._on_disconnected)

    async def _on_disconnected(self, peer_id: ID) -> None:
        if self._peers.pop(peer_id, None) is not None:
            _log.info("authenticated peer disconnected", peer_id=str(peer_id))

    def forget(self, peer_id: ID) -> None:
        """Drop ``peer_id``'s authentication (it must prove the token again)."""
        self._peers.pop(peer_id, None)

    # -- queries ----------------------------------------------------------------

    def is_authenticated(self, peer_id: ID) -> bool:
        return peer_id in self._peers

    def hello_of(self, peer_id: ID) -> PeerHello | None:
        return self._peers.get(peer_id)

    def authenticated_peers(self) -> list[PeerHello]:
        return list(self._peers.values())

    async def require(self, stream: INetStream, *, role: Role | None = None) -> bool:
        """For other handlers, before reading anything: is the caller authenticated?

        True if the stream's remote peer proved the token (and, when ``role`` is
        given, said it has that role); otherwise the stream is reset, the refusal
        counted and logged, and False returned. Reads nothing from the stream.
        """
        peer_id = remote_peer_id(stream)
        hello = self._peers.get(peer_id)
        if hello is not None and (role is None or hello.role == role):
            return True
        if hello is None:
            reason = f"unauthenticated stream on {stream.get_protocol()}"
        else:
            reason = f"{hello.role} may not open {stream.get_protocol()} (needs {role})"
        self._refuse(peer_id, reason)
        await _reset(stream)
        return False

    # -- initiator ----------------------------------------------------------------

    async def authenticate(self, node: P2PNode, peer_id: ID, *, timeout: float = AUTH_TIMEOUT) -> PeerHello:
        """Prove the token to ``peer_id`` and check its proof (we are the initiator).

        Opens an :data:`AUTH_PROTOCOL` stream (dialing from the peerstore if not
        connected), all within ``timeout`` seconds. On success the peer is marked
        authenticated on both sides and its hello returned.

        :raises AuthError: the peer refused us, failed its proof, sent something
            malformed, or did not finish in time. The stream is reset.
        """
        stream: INetStream | None = None
        try:
            with trio.fail_after(timeout):
                try:
                    stream = await node.new_stream(peer_id, AUTH_PROTOCOL)
                except Exception as exc:
                    raise _Refused(f"could not open auth stream ({type(exc).__name__}: {exc})") from None
                hello = await self._initiate(stream, node.peer_id, peer_id)
                self._accept(node, hello)
        except trio.TooSlowError:
            reason = "timed out"
        except _Refused as exc:
            reason = str(exc)
        else:
            assert stream is not None
            await _close(stream)
            return hello
        if stream is not None:
            await _reset(stream)
        self._refuse(peer_id, reason)
        raise AuthError(f"authentication with {peer_id} failed: {reason}")

    async def _initiate(self, stream: INetStream, own_id: ID, peer_id: ID) -> PeerHello:
        nonce_i = os.urandom(NONCE_SIZE)
        await _write(stream, nonce_i)
        reply = await read_frame(stream)
        if len(reply) != NONCE_SIZE + MAC_SIZE:
            raise _Refused("malformed responder proof")
        nonce_r, mac_r = reply[:NONCE_SIZE], reply[NONCE_SIZE:]
        t = transcript(nonce_i, nonce_r, own_id, peer_id)
        if not hmac.compare_digest(mac_r, mac(self._key, _LABEL_R, t)):
            raise _Refused("peer does not hold the network token")
        await _write(stream, mac(self._key, _LABEL_I, t + self._hello_raw) + self._hello_raw)
        final = await read_frame(stream)
        if len(final) < MAC_SIZE:
            raise _Refused("malformed responder hello")
        mac_h, hello_raw = final[:MAC_SIZE], final[MAC_SIZE:]
        if not hmac.compare_digest(mac_h, mac(self._key, _LABEL_H, t + hello_raw)):
            raise _Refused("responder hello failed verification")
        return _decode_hello(hello_raw, peer_id)

    # -- responder ------------------------------------------------------------------

    async def _handle(self, stream: INetStream) -> None:
        """AUTH_PROTOCOL handler; never raises for protocol errors (it refuses)."""
        peer_id = remote_peer_id(stream)
        own_id = self._node.peer_id if self._node is not None else None
        reason = "timed out"
        with trio.move_on_after(AUTH_TIMEOUT):
            try:
                assert own_id is not None, "AuthGate.install() was not called"
                hello = await self._respond(stream, own_id, peer_id)
            except _Refused as exc:
                reason = str(exc)
            else:
                try:
                    self._accept(self._node, hello)  # type: ignore[arg-type]
                except _Refused as exc:
                    reason = str(exc)
                else:
                    return  # node.set_handler closes the stream
        self._refuse(peer_id, reason)
        await _reset(stream)

    async def _respond(self, stream: INetStream, own_id: ID, peer_id: ID) -> PeerHello:
        nonce_i = await read_frame(stream, NONCE_SIZE)
        if len(nonce_i) != NONCE_SIZE:
            raise _Refused("malformed initiator nonce")
        nonce_r = os.urandom(NONCE_SIZE)
        t = transcript(nonce_i, nonce_r, peer_id, own_id)
        await _write(stream, nonce_r + mac(self._key, _LABEL_R, t))
        proof = await read_frame(stream)
        if len(proof) < MAC_SIZE:
            raise _Refused("malformed initiator proof")
        mac_i, hello_raw = proof[:MAC_SIZE], proof[MAC_SIZE:]
        if not hmac.compare_digest(mac_i, mac(self._key, _LABEL_I, t + hello_raw)):
            raise _Refused("peer does not hold the network token")
        hello = _decode_hello(hello_raw, peer_id)
        await _write(stream, mac(self._key, _LABEL_H, t + self._hello_raw) + self._hello_raw)
        return hello

    # -- bookkeeping ------------------------------------------------------------------

    def _accept(self, node: P2PNode, hello: PeerHello) -> None:
        """Mark ``hello.peer_id`` authenticated; raises _Refused if it already disconnected."""
        if not node.host.get_network().get_connections(hello.peer_id):
            # The disconnect callback may have run before we got here; do not
            # resurrect a peer that is gone.
            raise _Refused("peer disconnected during handshake")
        first = hello.peer_id not in self._peers
        self._peers[hello.peer_id] = hello
        if first:
            _log.info("peer authenticated", peer_id=str(hello.peer_id), role=hello.role, name=hello.name)

    def _refuse(self, peer_id: ID, reason: str) -> None:
        """Count a refusal and log it (once per peer per REFUSAL_LOG_INTERVAL)."""
        self.refused[peer_id] = self.refused.get(peer_id, 0) + 1
        self.refused.move_to_end(peer_id)
        while len(self.refused) > REFUSAL_TRACK_MAX:
            self.refused.popitem(last=False)
        now = time.monotonic()
        last = self._last_logged.get(peer_id)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL:
            return
        self._last_logged[peer_id] = now
        self._last_logged.move_to_end(peer_id)
        while len(self._last_logged) > REFUSAL_TRACK_MAX:
            self._last_logged.popitem(last=False)
        _log.warning("refused peer", peer_id=str(peer_id), reason=reason, refusals=self.refused[peer_id])


async def _reset(stream: INetStream) -> None:
    """Reset ``stream``; shielded, bounded, errors ignored."""
    with trio.CancelScope(shield=True), trio.move_on_after(_RESET_TIMEOUT):
        try:
            await stream.reset()
        except Exception:
            pass


async def _close(stream: INetStream) -> None:
    """Close ``stream`` (reset if that fails); shielded and bounded."""
    with trio.CancelScope(shield=True), trio.move_on_after(_RESET_TIMEOUT):
        try:
            await stream.close()
        except Exception:
            await _reset(stream)
