"""A small, hardened wrapper around a py-libp2p 0.8.1 host (trio).

What this module adds on top of ``libp2p.new_host``:

* **Persistent Ed25519 identity** (:func:`load_or_create_identity`), written
  atomically with mode 0600, so a restarted process keeps its peer id;
  :func:`claim_identity` also locks it (``flock``) so a second live process
  sharing the state dir gets its own identity file instead of the same peer id.
* **Noise-only security, Yamux-only muxing, TCP-only transport.**  The
  default ``new_host()`` offers ``/noise``, ``/tls/1.0.0``, ``/secio/1.0.0``
  *and* ``/plaintext/2.0.0`` (and Mplex as a muxer fallback); we pass explicit
  ``sec_opt`` / ``muxer_opt`` / ``transports`` so nothing else is ever
  offered or accepted.
* **Crash-proof stream handlers.**  In py-libp2p 0.8.1 an exception escaping a
  stream handler propagates through ``SwarmConn._handle_new_streams`` into the
  swarm's service manager, which cancels the *whole swarm* and re-raises an
  ``ExceptionGroup`` out of ``host.run()``.  :meth:`P2PNode.set_handler` wraps
  every handler (and the built-in identify/ping handlers) so an exception is
  logged and the stream reset instead.
* Listen addresses that reflect the real bound ports, with ``0.0.0.0`` / ``::``
  expanded to concrete interface addresses, and a hard error when a listen
  address could not be bound (py-libp2p only logs that).
* A simple "peer disconnected" callback built on the swarm notifee API.
* A connection manager sized for a pool, not the public IPFS network
  (:data:`MIN_CONNECTIONS`, :data:`LOW_WATERMARK`, :data:`HIGH_WATERMARK`), and
  py-libp2p's auto-connector off unless asked for (:class:`_OptInAutoConnector`).
* Hostile-peer limits py-libp2p lacks: at most :data:`MAX_INBOUND_STREAMS` open
  inbound streams per connection (more are reset on arrival), identify/push
  bounded to :data:`IDENTIFY_PUSH_MAX` bytes, and the log lines a remote peer can
  trigger at will (too many streams, bad identify/push, py-libp2p's "Failed to
  open stream") written at most once per peer per :data:`STREAM_REFUSAL_LOG_INTERVAL`.

Everything is trio and structured: :func:`open_node` is an async context
manager; :func:`serve_node` is the same thing shaped for ``nursery.start``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Self

import trio
from multiaddr import Multiaddr

from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.ed25519 import create_new_key_pair as create_new_ed25519_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP
from libp2p.utils.address_validation import get_available_interfaces

from . import hotpath


class _StdlibKVLogger:
    """Minimal structlog-like facade over :mod:`logging` (fallback only)."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _emit(self, level: int, event: str, kw: dict[str, Any]) -> None:
        exc_info = kw.pop("exc_info", None)
        extra = " ".join(f"{k}={v!r}" for k, v in kw.items())
        self._logger.log(level, "%s %s", event, extra, exc_info=exc_info)

    def debug(self, event: str, **kw: Any) -> None:
        self._emit(logging.DEBUG, event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit(logging.INFO, event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit(logging.WARNING, event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit(logging.ERROR, event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        kw.setdefault("exc_info", True)
        self._emit(logging.ERROR, event, kw)


def get_logger(name: str) -> Any:
    """``structlog.get_logger(name)`` if structlog is installed, else a stdlib facade."""
    try:
        import structlog
    except ImportError:  # pragma: no cover - structlog is a project dependency
        return _StdlibKVLogger(name)
    return structlog.get_logger(name)


_log: Any = get_logger(__name__)

__all__ = [
    "MAX_INBOUND_STREAMS",
    "PeerLogLimiter",
    "StreamHandler",
    "P2PNode",
    "IdentityClaim",
    "claim_identity",
    "identity_slot_path",
    "load_or_create_identity",
    "open_node",
    "serve_node",
    "strip_p2p",
    "remote_peer_id",
    "get_logger",
    "NOISE_PROTOCOL_ID",
    "YAMUX_PROTOCOL_ID",
]

#: An async stream handler, as accepted by :meth:`P2PNode.set_handler`.
StreamHandler = Callable[[INetStream], Awaitable[None]]

#: Seconds we allow a reset/close issued from our cleanup code to take.
_CLEANUP_TIMEOUT = 2.0
#: Inbound streams one connection may hold open at once; more are reset on
#: arrival. Honest peers use a handful (ping, a few tunnels, <= 12 KAD queries,
#: identify); each inbound stream may buffer a 256 KiB Yamux window and holds a
#: handler task for up to the negotiation timeout, so this bounds what one
#: connection can pin (128 x 256 KiB = 32 MiB) where py-libp2p has no cap.
MAX_INBOUND_STREAMS = 128
#: A peer whose streams are refused is logged at most this often (s), so a
#: flood of stream opens cannot flood the log.
STREAM_REFUSAL_LOG_INTERVAL = 60.0
#: libp2p's identify/push protocol id (py-libp2p's handler is replaced, see
#: :func:`_identify_push_handler`).
IDENTIFY_PUSH_PROTOCOL = "/ipfs/id/push/1.0.0"
#: Largest identify/push message we read (bytes): a real one is well under
#: 4 KiB (keys, a few addresses and protocol ids); py-libp2p accepts 1 MiB.
IDENTIFY_PUSH_MAX = 64 * 1024
#: Seconds a peer gets to send its identify/push message (py-libp2p's value).
IDENTIFY_PUSH_TIMEOUT = 10.0
#: py-libp2p's switch for a WINDOW_UPDATE after every read (see :func:`_install_yamux_fix`).
YAMUX_RELEASE_ON_READ_ENV = "PY_YAMUX_RELEASE_ON_READ"
#: Peers remembered by :class:`PeerLogLimiter`; the oldest are forgotten so
#: peer-id churn cannot grow memory without bound.
PEER_LOG_TRACK_MAX = 1024
#: Identity files :func:`claim_identity` tries per key path: one per process of one
#: role sharing a state dir; far more than one machine runs, small enough to fail fast.
IDENTITY_SLOTS = 64
#: Times :func:`claim_identity` re-opens a file that was replaced while it locked it.
IDENTITY_CLAIM_RETRIES = 5


# --------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------


def _decode_identity(data: bytes, path: Path) -> KeyPair:
    """Turn serialized libp2p protobuf private-key bytes into an Ed25519 pair.

    :raises ValueError: if the bytes are not a valid Ed25519 libp2p private key.
    """
    if not data:
        raise ValueError(f"identity file {path} is empty (corrupt?)")
    try:
        private_key = deserialize_private_key(data)
    except Exception as exc:  # protobuf DecodeError, KeyError, nacl errors...
        raise ValueError(
            f"identity file {path} is corrupt or not a libp2p private key: {exc}"
        ) from exc
    if private_key.get_type() != KeyType.Ed25519 or not isinstance(
        private_key, Ed25519PrivateKey
    ):
        raise ValueError(
            f"identity file {path} holds a {private_key.get_type().name} key; "
            "only Ed25519 identities are supported"
        )
    try:
        public_key = private_key.get_public_key()
        public_key.serialize()
    except Exception as exc:
        raise ValueError(f"identity file {path} holds an invalid key: {exc}") from exc
    return KeyPair(private_key, public_key)


def _checked_identity(data: bytes, path: Path) -> KeyPair:
    """Decode ``data`` read from ``path`` and tighten the file's mode to 0600 if it was looser.

    :raises ValueError: as :func:`_decode_identity`.
    """
    key_pair = _decode_identity(data, path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        _log.warning(
            "identity file was group/world accessible; tightening to 0600",
            path=str(path),
            mode=oct(mode),
        )
        os.chmod(path, 0o600)
    return key_pair


def _create_identity(path: Path) -> tuple[KeyPair, bool]:
    """Write a new Ed25519 key to ``path`` unless one appears there first.

    Written to a temporary file with mode 0600, fsynced and hard-linked into
    place, so a crash never leaves a half-written key and two processes racing
    to create it end up with the same identity (the loser reads the winner's).

    :return: the key pair now in ``path`` and whether this call created it.
    :raises ValueError: if the winner of a race wrote something that is not a key.
    :raises OSError: on I/O errors.
    """
    key_pair = create_new_ed25519_key_pair()
    data = key_pair.private_key.serialize()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)  # mkstemp already uses 0600; be explicit.
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        try:
            os.link(tmp_name, path)  # atomic "create if absent"
        except FileExistsError:
            # Another process won the race: use its identity.
            return _decode_identity(path.read_bytes(), path), False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                raise
            os.replace(tmp_name, path)  # file system without hard links
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    with contextlib.suppress(OSError):  # make the new directory entry durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return key_pair, True


def load_or_create_identity(path: Path) -> KeyPair:
    """Load the node's Ed25519 key pair from ``path``, creating it if absent.

    The file holds the libp2p protobuf encoding of the private key
    (``PrivateKey.serialize()``; the same format as ``libp2p.load_identity``).
    A new file is written atomically (see :func:`_create_identity`). Nothing is
    locked: a process that must not share its identity with another live
    process uses :func:`claim_identity` instead.

    This is synchronous file I/O; call it before ``trio.run`` or via
    ``trio.to_thread.run_sync`` if you are already inside the event loop.

    :param path: where the key lives (parent directories are created).
    :return: the key pair; ``ID.from_pubkey(kp.public_key)`` is the peer id.
    :raises ValueError: if the file exists but is empty, corrupt, or not an
        Ed25519 key. The file is left untouched so an operator can inspect it.
    :raises OSError: on I/O errors (permissions, read-only file system...).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        pass
    else:
        return _checked_identity(data, path)
    key_pair, created = _create_identity(path)
    if created:
        _log.info(
            "created new node identity",
            path=str(path),
            peer_id=str(ID.from_pubkey(key_pair.public_key)),
        )
    return key_pair


class IdentityClaim:
    """A node identity this process holds: the key pair and the locked file it came from.

    Owns one open file descriptor on :attr:`path` with an exclusive ``flock``;
    no other process (and no other claim in this process) can claim the file
    while it is open. The kernel drops the lock when the descriptor is closed:
    by :meth:`release`, or by the process's death however it dies (SIGKILL
    included), so a stale lock cannot outlive its owner.
    """

    def __init__(self, key_pair: KeyPair, path: Path, fd: int, *, created: bool) -> None:
        self.key_pair = key_pair
        self.path = path
        #: True if this claim wrote the key file (a new identity).
        self.created = created
        self._fd = fd

    @property
    def peer_id(self) -> ID:
        return ID.from_pubkey(self.key_pair.public_key)

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        """Unlock the file (idempotent). The key file itself stays for the next process."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def identity_slot_path(path: Path, slot: int) -> Path:
    """Identity file number ``slot`` for ``path``: slot 0 is ``path`` itself, then ``<stem>-2<suffix>``..."""
    return path if slot == 0 else path.with_name(f"{path.stem}-{slot + 1}{path.suffix}")


def _lock_nowait(fd: int, path: Path) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False if another open file holds it.

    A file system without flock support (some network mounts) is not fatal: the
    file is used unlocked, as before locking existed, with a warning.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        _log.warning(
            "cannot lock identity file; a second process here may share this identity",
            path=str(path),
            error=exc.strerror,
        )
    return True


def _try_claim(path: Path) -> IdentityClaim | None:
    """Claim identity file ``path`` (created if absent), or None if another open file holds it.

    :raises ValueError: if the file is not a valid key (left untouched).
    :raises OSError: on I/O errors, or if the file keeps being replaced while we lock it.
    """
    created = False
    for _ in range(IDENTITY_CLAIM_RETRIES):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            _, created = _create_identity(path)
            continue
        try:
            if not _lock_nowait(fd, path):
                os.close(fd)
                return None
            try:
                same_file = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # replaced or removed between open and lock: the lock guards nothing
                os.close(fd)
                continue
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            key_pair = _checked_identity(b"".join(chunks), path)
        except BaseException:
            os.close(fd)
            raise
        return IdentityClaim(key_pair, path, fd, created=created)
    raise OSError(errno.EAGAIN, f"identity file {path} keeps changing while it is being locked")


def claim_identity(path: Path, slots: int = IDENTITY_SLOTS) -> IdentityClaim:
    """Load (or create) the identity in ``path`` and lock it for this process's use.

    If another live process holds ``path``, the first free of ``<stem>-2<suffix>``,
    ``<stem>-3<suffix>``... is claimed (created if absent) instead, and kept on disk
    for whichever process needs a second identity next; one info line names the
    file used and why. A lone process therefore always gets ``path``, and keeps its
    peer id across restarts. Hold the claim for as long as the identity is in use.

    Synchronous file I/O, like :func:`load_or_create_identity`.

    :raises ValueError: if a file tried is empty, corrupt or not an Ed25519 key.
    :raises OSError: on I/O errors, or if all ``slots`` files are held by live processes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for slot in range(slots):
        candidate = identity_slot_path(path, slot)
        claim = _try_claim(candidate)
        if claim is None:
            continue
        if slot:
            _log.info(
                "identity file in use by another live process; using a separate identity",
                path=str(claim.path),
                in_use=str(path),
                peer_id=str(claim.peer_id),
                created=claim.created,
            )
        elif claim.created:
            _log.info("created new node identity", path=str(path), peer_id=str(claim.peer_id))
        return claim
    raise OSError(
        errno.EAGAIN,
        f"all {slots} identity files like {path} are held by other live processes",
    )


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


class PeerLogLimiter:
    """Decides whether an event about a peer is logged: at most once per ``interval``.

    Owns a bounded map of peer id -> last log time and per-peer counts
    (:attr:`counts`); the least recently seen peers are dropped beyond ``track_max``.
    """

    def __init__(self, interval: float, track_max: int = PEER_LOG_TRACK_MAX) -> None:
        self.interval = interval
        self.track_max = track_max
        self.counts: OrderedDict[str, int] = OrderedDict()
        self._last: OrderedDict[str, float] = OrderedDict()

    def should_log(self, peer: str) -> bool:
        """Count one event for ``peer``; True if it is the first in ``interval``."""
        self.counts[peer] = self.counts.get(peer, 0) + 1
        self.counts.move_to_end(peer)
        while len(self.counts) > self.track_max:
            self.counts.popitem(last=False)
        now = time.monotonic()
        last = self._last.get(peer)
        if last is not None and now - last < self.interval:
            return False
        self._last[peer] = now
        self._last.move_to_end(peer)
        while len(self._last) > self.track_max:
            self._last.popitem(last=False)
        return True


#: Per-process: streams refused for exceeding MAX_INBOUND_STREAMS, by peer.
stream_refusals = PeerLogLimiter(STREAM_REFUSAL_LOG_INTERVAL)
#: Per-process: malformed identify/push messages, by peer.
identify_push_refusals = PeerLogLimiter(STREAM_REFUSAL_LOG_INTERVAL)
#: Per-process: our outbound streams a peer refused (py-libp2p's error log), by peer.
outbound_stream_failures = PeerLogLimiter(STREAM_REFUSAL_LOG_INTERVAL)


class ReaderNeverBlocksYamux(Yamux):
    """py-libp2p's Yamux with the reader-task deadlock removed and inbound streams capped.

    Deadlock (see notes/libp2p.md): the connection's reader task writes a few
    frames itself (PING replies, ACK/RST of new streams) and waits for the
    connection's write lock to do so. With both directions saturated, both ends'
    writers hold the lock in a blocked TCP send, both readers wait for it, nobody
    reads TCP: the connection hangs for good. Here the reader never waits: its
    writes go to a task of the muxer's nursery (the lock is FIFO, so frames keep
    their order).

    Cap: py-libp2p limits only *outbound* streams (256); a peer may open inbound
    streams without limit (each one a handler task waiting up to the negotiation
    timeout, plus its buffered data). :meth:`accept_stream` resets any inbound
    stream beyond :data:`MAX_INBOUND_STREAMS` open on this connection before a
    handler sees it, and logs the peer once per :data:`STREAM_REFUSAL_LOG_INTERVAL`.
    A stream we reset also drops what the peer had sent on it at once (nobody
    will read it), instead of keeping it for py-libp2p's 90 s stale-stream sweep.
    """

    def open_inbound_streams(self) -> int:
        """Inbound streams on this connection that are not closed yet."""
        return sum(1 for s in list(self.streams.values()) if not s.is_initiator and not s.closed)

    async def accept_stream(self) -> Any:
        while True:
            stream = await super().accept_stream()
            if self.open_inbound_streams() <= MAX_INBOUND_STREAMS:
                return stream
            await self._refuse_stream(stream)

    async def _refuse_stream(self, stream: Any) -> None:
        peer = str(self.peer_id)
        if stream_refusals.should_log(peer):
            _log.warning(
                "refused peer: too many open streams",
                peer_id=peer,
                limit=MAX_INBOUND_STREAMS,
                refused=stream_refusals.counts.get(peer, 0),
            )
        with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT):
            with contextlib.suppress(Exception):
                await stream.reset()

    async def _finalize_stream(self, stream: Any, *, fully_closed: bool) -> None:
        if fully_closed and stream.reset_received:
            buffer = self.stream_buffers.get(stream.stream_id)
            if buffer:
                buffer.clear()  # reset: unread data is never read; free it now
        await super()._finalize_stream(stream, fully_closed=fully_closed)

    _reader_task: trio.lowlevel.Task | None = None

    async def handle_incoming(self) -> None:
        self._reader_task = trio.lowlevel.current_task()
        await super().handle_incoming()

    async def _write_frame(self, data: bytes) -> None:
        if self._reader_task is trio.lowlevel.current_task() and self._nursery is not None:
            self._nursery.start_soon(self._write_frame_detached, data)
            return
        await super()._write_frame(data)

    async def _write_frame_detached(self, data: bytes) -> None:
        with contextlib.suppress(Exception):
            await Yamux._write_frame(self, data)


class _OutboundFailureLogLimit(logging.Filter):
    """Let py-libp2p's "Failed to open stream to peer X" error through once per peer per interval.

    py-libp2p logs seven lines at ERROR for every stream a peer refuses or does
    not support (our refused tunnels, DHT lookups that try every connected peer,
    including ones that never spoke KAD), so any peer that merely connects can
    grow our log without bound. The callers log their own reason.
    """

    _PREFIX = "Failed to open stream to peer "

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        if not message.startswith(self._PREFIX):
            return True
        peer = message[len(self._PREFIX) :].split(":", 1)[0]
        return outbound_stream_failures.should_log(peer)


def _install_log_limits() -> None:
    """Filters on py-libp2p loggers whose messages a remote peer can trigger at will."""
    logger = logging.getLogger("libp2p.host.basic_host")
    if not any(isinstance(f, _OutboundFailureLogLimit) for f in logger.filters):
        logger.addFilter(_OutboundFailureLogLimit())


_install_log_limits()


def _install_yamux_fix() -> None:
    """Use :class:`ReaderNeverBlocksYamux` and go-yamux's window-update batching.

    MuxerMultistream builds the module-level ``Yamux`` whatever muxer_opt says.
    py-libp2p's ``PY_YAMUX_RELEASE_ON_READ`` (default on) answers every read
    with a WINDOW_UPDATE frame: one more encrypted frame each way per relayed
    chunk. Off, credit is returned in batches like go-yamux (the window stays
    open: the sender still never waits while the reader keeps up); measured on
    the tunnel: bulk 111 -> 121 MB/s on 2 cores. An operator's own setting wins.
    """
    from libp2p.stream_muxer import muxer_multistream  # noqa: PLC0415

    muxer_multistream.Yamux = ReaderNeverBlocksYamux  # type: ignore[misc]
    os.environ.setdefault(YAMUX_RELEASE_ON_READ_ENV, "0")


_install_yamux_fix()
hotpath.install()


# --------------------------------------------------------------------------
# py-libp2p connection manager tuning (upstream: libp2p.network.config
# defaults and libp2p.network.auto_connector.AutoConnector, 0.8.1)
# --------------------------------------------------------------------------

#: py-libp2p's connection manager defaults (keep >= 50 connections, dial towards
#: 200, prune above 300) are go-libp2p's, sized for the public IPFS network. A
#: localp2p network is one server, its workers and a few clients, and discovery
#: dials every peer we use, so nothing is dialled just to have connections:
MIN_CONNECTIONS = 0
#: With the auto-connector on (``auto_connect=True``) it dials peers the peerstore
#: knows towards (LOW_WATERMARK + HIGH_WATERMARK) / 2 = 36 connections.
LOW_WATERMARK = 8
#: Above this many connections py-libp2p closes idle ones (no open stream, older
#: than its 20 s grace period): far above a pool's size, so only churn is pruned.
HIGH_WATERMARK = 64


class _OptInAutoConnector(AutoConnector):
    """py-libp2p's AutoConnector that does nothing unless ``enabled``.

    Upstream behaviour changed: ``Swarm.run()`` always starts its AutoConnector,
    whose first cycle runs at once and logs (at INFO, on a logger py-libp2p sets
    to INFO itself) "initiating N new dials" and tries every peer in the
    peerstore; stopping it after ``host.run()`` came too late for that first cycle.
    Disabled, :meth:`start` leaves it stopped, so neither the periodic task nor the
    disconnect-triggered ``maybe_connect`` ever dials.
    """

    def __init__(self, swarm: Any, *, enabled: bool) -> None:
        super().__init__(swarm, auto_connect_interval=swarm.connection_config.auto_connect_interval)
        self.enabled = enabled

    async def start(self) -> None:
        if self.enabled:
            await super().start()


def _tune_connection_manager(host: IHost, *, auto_connect: bool) -> None:
    """Replace ``host``'s AutoConnector by :class:`_OptInAutoConnector` (call before ``host.run``).

    The watermarks themselves are passed through ``ConnectionConfig`` in
    :func:`open_node`. Raises ``AttributeError`` if py-libp2p's swarm no longer
    has an ``auto_connector`` (a py-libp2p other than the pinned 0.8.1).
    """
    swarm: Any = host.get_network()
    if not isinstance(getattr(swarm, "auto_connector", None), AutoConnector):
        raise AttributeError("py-libp2p's swarm has no AutoConnector (not py-libp2p 0.8.1?)")
    swarm.auto_connector = _OptInAutoConnector(swarm, enabled=auto_connect)


# --------------------------------------------------------------------------
# end of py-libp2p connection manager tuning
# --------------------------------------------------------------------------


def strip_p2p(addr: Multiaddr) -> Multiaddr:
    """Return ``addr`` without a trailing ``/p2p/<peer id>`` component."""
    try:
        value = addr.value_for_protocol("p2p")
    except Exception:
        value = None
    if value:
        return addr.decapsulate(Multiaddr(f"/p2p/{value}"))
    return addr


def _expand_wildcard(addr: Multiaddr) -> list[Multiaddr]:
    """Expand a bound ``/ip4/0.0.0.0/tcp/N`` (or ``/ip6/::/tcp/N``) address.

    Uses ``libp2p.utils.address_validation.get_available_interfaces`` (psutil
    based, includes loopback). Non-wildcard addresses are returned unchanged.
    """
    protos = [p.name for p in addr.protocols()]
    if "tcp" not in protos:
        return [addr]
    ip4 = ip6 = None
    with contextlib.suppress(Exception):
        ip4 = addr.value_for_protocol("ip4")
    with contextlib.suppress(Exception):
        ip6 = addr.value_for_protocol("ip6")
    if ip4 != "0.0.0.0" and ip6 != "::":
        return [addr]
    port = int(addr.value_for_protocol("tcp"))
    family = "ip4" if ip4 == "0.0.0.0" else "ip6"
    try:
        expanded = [
            a
            for a in get_available_interfaces(port, "tcp")
            if a.protocols()[0].name == family
        ]
    except Exception:  # pragma: no cover - defensive, psutil problems
        expanded = []
    return expanded or [addr]


def _expand_addrs(addrs: Sequence[Multiaddr]) -> list[Multiaddr]:
    """Expand wildcard addresses and de-duplicate, keeping order."""
    seen: dict[str, Multiaddr] = {}
    for addr in addrs:
        for concrete in _expand_wildcard(addr):
            seen.setdefault(str(concrete), concrete)
    return list(seen.values())


async def _quiet_reset(stream: INetStream) -> None:
    """Reset ``stream``, ignoring errors; shielded and time-bounded."""
    with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT):
        with contextlib.suppress(Exception):
            await stream.reset()


def remote_peer_id(stream: INetStream) -> ID:
    """The authenticated peer id of the remote end of ``stream``.

    In 0.8.1 this is ``stream.muxed_conn.peer_id`` (set from the Noise
    handshake, so it is cryptographically verified).
    """
    return stream.muxed_conn.peer_id


class _DisconnectNotifee(INotifee):
    """Swarm notifee that turns connection events into per-peer callbacks."""

    def __init__(self, node: P2PNode) -> None:
        self._node = node

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id
        # The swarm notifies per *connection*; only report the peer as gone
        # when its last connection closed.
        if network.get_connections(peer_id):
            return
        for callback in list(self._node._disconnect_callbacks):
            try:
                await callback(peer_id)
            except Exception:
                _log.exception("disconnect callback failed", peer_id=str(peer_id))

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        return None


# --------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------


class P2PNode:
    """A running libp2p host (Noise + Yamux + TCP). Create with :func:`open_node`."""

    def __init__(self, host: IHost, key_pair: KeyPair) -> None:
        self.host = host
        self.key_pair = key_pair
        self._disconnect_callbacks: list[Callable[[ID], Awaitable[None]]] = []
        self._notifee = _DisconnectNotifee(self)
        host.get_network().register_notifee(self._notifee)

    # -- identity / addresses -------------------------------------------------

    @property
    def peer_id(self) -> ID:
        """This node's peer id (derived from its Ed25519 public key)."""
        return self.host.get_id()

    @property
    def bound_addrs(self) -> list[Multiaddr]:
        """Addresses the TCP listeners are bound to, with the real ports.

        ``0.0.0.0`` is *not* expanded here (see :attr:`listen_addrs`).
        """
        return list(self.host.get_transport_addrs())

    @property
    def listen_addrs(self) -> list[Multiaddr]:
        """Dialable listen addresses (real ports, wildcards expanded), no ``/p2p``."""
        return _expand_addrs(self.bound_addrs)

    @property
    def peer_info(self) -> PeerInfo:
        """``PeerInfo(peer_id, listen_addrs)`` - what another node needs to dial us."""
        return PeerInfo(self.peer_id, self.listen_addrs)

    def p2p_addrs(self) -> list[Multiaddr]:
        """:attr:`listen_addrs` with ``/p2p/<peer id>`` appended."""
        suffix = Multiaddr(f"/p2p/{self.peer_id}")
        return [a.encapsulate(suffix) for a in self.listen_addrs]

    # -- connections -----------------------------------------------------------

    async def connect(self, peer_info: PeerInfo) -> None:
        """Dial ``peer_info`` (no-op if already connected).

        Addresses may carry a ``/p2p/<id>`` suffix. Raises
        ``libp2p.network.exceptions.SwarmException`` (or a subclass) if no
        address could be dialed or the security/muxer upgrade failed.
        """
        addrs = [strip_p2p(a) for a in peer_info.addrs]
        await self.host.connect(PeerInfo(peer_info.peer_id, addrs))

    async def disconnect(self, peer_id: ID) -> None:
        """Close all connections to ``peer_id``."""
        await self.host.disconnect(peer_id)

    def connected_peers(self) -> list[ID]:
        """Peers with at least one open connection."""
        return list(self.host.get_connected_peers())

    def negotiated_protocols(self, peer_id: ID) -> list[tuple[str | None, str | None]]:
        """``(security, muxer)`` protocol ids for each connection to ``peer_id``."""
        out: list[tuple[str | None, str | None]] = []
        for conn in self.host.get_network().get_connections(peer_id):
            sec = getattr(conn, "get_negotiated_security_protocol", lambda: None)()
            mux = getattr(conn, "get_negotiated_muxer_protocol", lambda: None)()
            out.append((sec, mux))
        return out

    def on_peer_disconnected(self, callback: Callable[[ID], Awaitable[None]]) -> None:
        """Call ``await callback(peer_id)`` when the last connection to a peer closes.

        Runs inside the swarm's notifee fan-out: keep it short and
        non-blocking (it delays connection cleanup). Exceptions are logged.
        """
        self._disconnect_callbacks.append(callback)

    # -- streams --------------------------------------------------------------

    async def new_stream(
        self, peer_id: ID, protocols: str | Sequence[str]
    ) -> INetStream:
        """Open a stream to ``peer_id`` speaking one of ``protocols``.

        Dials using peerstore addresses if not connected yet. The chosen
        protocol is ``stream.get_protocol()``. Always ``close()`` or
        ``reset()`` the stream when done: py-libp2p only releases its
        per-stream resource-manager/semaphore slot then.

        :raises libp2p.host.exceptions.StreamFailure: negotiation failed
            (e.g. the peer has no handler for any of ``protocols``).
        """
        if isinstance(protocols, str):
            protocols = [protocols]
        return await self.host.new_stream(peer_id, [TProtocol(p) for p in protocols])

    def set_handler(
        self,
        protocol: str,
        handler: StreamHandler,
        *,
        close_on_return: bool = True,
    ) -> None:
        """Register ``handler`` for inbound streams negotiating ``protocol``.

        The handler is wrapped: any ``Exception`` it raises is logged (with
        the remote peer id and protocol) and the stream is reset - it never
        reaches py-libp2p, where it would tear the whole host down. If the
        handler returns normally and ``close_on_return`` is true, the stream
        is closed (a no-op if the handler already closed/reset it).
        ``trio.Cancelled`` (host shutdown) is propagated untouched.

        Use :func:`remote_peer_id` inside the handler to learn who is calling.
        """
        self.host.set_stream_handler(
            TProtocol(protocol),
            _safe_handler(protocol, handler, close_on_return=close_on_return),
        )

    def remove_handler(self, protocol: str) -> None:
        """Stop accepting streams for ``protocol``."""
        self.host.remove_stream_handler(TProtocol(protocol))

    def _harden_builtin_handlers(self) -> None:
        """Wrap the handlers py-libp2p registers itself (identify, ping...).

        identify/push is replaced (:func:`_identify_push_handler`): py-libp2p's
        logs an error for every malformed push, which any peer can send.
        """
        mux = self.host.get_mux()
        for protocol, handler in list(mux.handlers.items()):
            if protocol is None or handler is None:
                continue
            if getattr(handler, "_localp2p_safe", False):
                continue
            if str(protocol) == IDENTIFY_PUSH_PROTOCOL:
                handler = _identify_push_handler(self.host)
            mux.add_handler(
                protocol, _safe_handler(str(protocol), handler, close_on_return=False)
            )


def _identify_push_handler(host: IHost) -> StreamHandler:
    """identify/push as py-libp2p does it, but bounded and quiet about bad peers.

    Reads one varint-prefixed Identify message of at most
    :data:`IDENTIFY_PUSH_MAX` bytes within :data:`IDENTIFY_PUSH_TIMEOUT` and
    updates the peerstore with it. Anything else (oversized, not protobuf, slow,
    reset) resets the stream and is logged once per peer per
    :data:`STREAM_REFUSAL_LOG_INTERVAL`. Never raises except ``Cancelled``.
    """
    from libp2p.identity.identify.pb.identify_pb2 import Identify  # noqa: PLC0415
    from libp2p.identity.update import update_peerstore_from_identify  # noqa: PLC0415
    from libp2p.utils.varint import read_length_prefixed_protobuf  # noqa: PLC0415

    async def identify_push(stream: INetStream) -> None:
        peer_id = remote_peer_id(stream)
        try:
            with trio.fail_after(IDENTIFY_PUSH_TIMEOUT):
                data = await read_length_prefixed_protobuf(stream, True, IDENTIFY_PUSH_MAX)
            message = Identify()
            message.ParseFromString(data)
            await update_peerstore_from_identify(host.get_peerstore(), peer_id, message)
        except Exception as exc:
            if identify_push_refusals.should_log(str(peer_id)):
                _log.warning(
                    "refused peer: bad identify push",
                    peer_id=str(peer_id),
                    error=f"{type(exc).__name__}: {exc}"[:200],
                    refused=identify_push_refusals.counts.get(str(peer_id), 0),
                )
            await _quiet_reset(stream)
            return
        with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT):
            try:
                await stream.close()
            except Exception:
                await _quiet_reset(stream)

    return identify_push


def _safe_handler(
    protocol: str, handler: StreamHandler, *, close_on_return: bool
) -> StreamHandler:
    """Wrap ``handler`` so exceptions are contained (see :meth:`P2PNode.set_handler`)."""
    if getattr(handler, "_localp2p_safe", False):
        return handler

    async def safe(stream: INetStream) -> None:
        try:
            await handler(stream)
        except Exception as exc:
            try:
                peer = str(remote_peer_id(stream))
            except Exception:
                peer = "?"
            _log.error(
                "stream handler raised; resetting stream",
                protocol=protocol,
                peer_id=peer,
                error=repr(exc),
                exc_info=exc,
            )
            await _quiet_reset(stream)
            return
        if close_on_return:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT):
                try:
                    await stream.close()
                except Exception:
                    await _quiet_reset(stream)

    safe._localp2p_safe = True  # type: ignore[attr-defined]
    safe.__name__ = f"safe_{getattr(handler, '__name__', 'handler')}"
    return safe


def _ensure_port_free(addr: Multiaddr) -> None:
    """Fail fast if a fixed TCP port is already in use by any listener.

    py-libp2p binds listeners with SO_REUSEPORT, so a second node (or any
    SO_REUSEPORT socket of the same user) on the same fixed port is *not*
    an error: the kernel silently load-balances incoming connections between
    the processes. A plain bind (SO_REUSEADDR only, so TIME_WAIT leftovers
    are fine) fails with EADDRINUSE if anything listens there.
    """
    port = int(addr.value_for_protocol("tcp"))
    if port == 0:
        return
    ip: str | None = None
    family = socket.AF_INET
    with contextlib.suppress(Exception):
        ip = addr.value_for_protocol("ip4")
    if ip is None:
        with contextlib.suppress(Exception):
            ip = addr.value_for_protocol("ip6")
            family = socket.AF_INET6
    if ip is None:
        return
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((ip, port))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from exc


def _unbound_addrs(host: IHost, requested: Sequence[Multiaddr]) -> list[str]:
    """Requested listen addresses py-libp2p failed to bind.

    ``Swarm.listen`` swallows bind errors (it logs them and returns False)
    and ``BasicHost.run`` ignores the return value, so we must check.
    """
    listeners = host.get_network().listeners
    return [
        str(a)
        for a in requested
        if str(a) not in listeners or not listeners[str(a)].get_addrs()
    ]


async def _graceful_close(host: IHost, timeout: float) -> None:
    """Close listeners, connections and the swarm, shielded from cancellation.

    Needed because ``BasicHost.run()`` exits by *cancelling* the swarm
    service: the swarm's own cleanup then runs inside a cancelled scope, its
    first ``await listener.close()`` raises ``Cancelled`` and the TCP listener
    (a trio *system* task) keeps accepting on the port until ``trio.run``
    returns - and open connections are never closed gracefully.
    """
    with trio.CancelScope(shield=True):
        with trio.move_on_after(timeout) as scope:
            # Stop accepting first: Swarm.close() closes connections serially
            # (~0.2 s each, two trio.sleep(0.1) calls) before listeners.
            for listener in list(host.get_network().listeners.values()):
                with contextlib.suppress(Exception):
                    await listener.close()
            with contextlib.suppress(Exception):
                await host.close()
        if scope.cancelled_caught:
            _log.warning("libp2p node did not shut down in time", timeout=timeout)


@contextlib.asynccontextmanager
async def open_node(
    key_pair: KeyPair,
    listen_addrs: Sequence[Multiaddr | str] = ("/ip4/127.0.0.1/tcp/0",),
    *,
    negotiate_timeout: int = 10,
    auto_connect: bool = False,
    close_timeout: float = 10.0,
) -> AsyncIterator[P2PNode]:
    """Run a Noise+Yamux+TCP libp2p host for the duration of the block.

    Only ``/noise`` is offered/accepted as security protocol and only
    ``/yamux/1.0.0`` as muxer; mDNS, UPnP, QUIC, WebSocket, relay are off.
    The host's background tasks run in nurseries owned by this context
    manager (plus one trio *system* task per TCP listener, which py-libp2p
    spawns itself and cancels on close). Leaving the block - normally, by
    exception or by cancellation - closes all connections and listeners.

    :param key_pair: identity, e.g. from :func:`load_or_create_identity`.
    :param listen_addrs: TCP multiaddrs; port 0 picks a free port. A fixed
        port that is already in use raises ``OSError`` (we pre-check: py-libp2p
        binds with SO_REUSEPORT and would silently share the port with
        another node).
    :param negotiate_timeout: seconds for multistream-select on new streams.
    :param auto_connect: run py-libp2p's AutoConnector. It re-dials peers in
        the peerstore (cooldown-limited) whenever we have fewer than
        (LOW_WATERMARK + HIGH_WATERMARK) / 2 connections, so a peer we
        disconnected from - or one the DHT merely heard about - gets dialed
        again. Off by default, and then it never runs at all.
    :param close_timeout: upper bound (s) for the shielded graceful shutdown.
    :raises OSError: if any listen address could not be bound.

    Exceptions raised inside the ``async with`` body cross py-libp2p's
    nurseries and therefore surface wrapped in (nested) ``ExceptionGroup``s;
    catch them with ``except*``.
    """
    addrs = [a if isinstance(a, Multiaddr) else Multiaddr(a) for a in listen_addrs]
    for a in addrs:
        if "tcp" not in [p.name for p in a.protocols()]:
            raise ValueError(f"only TCP listen addresses are supported: {a}")
        _ensure_port_free(a)
    noise = NoiseTransport(
        key_pair, noise_privkey=create_new_x25519_key_pair().private_key
    )
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): ReaderNeverBlocksYamux},
        transports=[TCP()],
        listen_addrs=addrs,
        negotiate_timeout=negotiate_timeout,
        # BasicHost ignores negotiate_timeout whenever the swarm has a
        # ConnectionConfig (it always does): the config's values win.
        connection_config=ConnectionConfig(
            outbound_stream_protocol_negotiation_timeout=float(negotiate_timeout),
            inbound_stream_protocol_negotiation_timeout=float(negotiate_timeout),
            # Swarm.dial_peer's happy-eyeballs loop only returns early when
            # len(connections) >= max_connections_per_peer (default 3), so
            # with the default every successful dial waits a fixed 250 ms.
            max_connections_per_peer=1,
            # go-libp2p's public-network sizes are far too many here (see MIN_CONNECTIONS).
            min_connections=MIN_CONNECTIONS,
            low_watermark=LOW_WATERMARK,
            high_watermark=HIGH_WATERMARK,
        ),
        # host.get_addrs() feeds identify, signed peer records and DHT
        # provider records; without this it advertises /ip4/0.0.0.0/...
        addrs_factory=_expand_addrs,
    )
    _tune_connection_manager(host, auto_connect=auto_connect)
    node = P2PNode(host, key_pair)
    node._harden_builtin_handlers()
    unbound: list[str] = []
    async with host.run(listen_addrs=addrs):
        try:
            unbound = _unbound_addrs(host, addrs)
            if not unbound:
                _log.info(
                    "libp2p node started",
                    peer_id=str(node.peer_id),
                    addrs=[str(a) for a in node.listen_addrs],
                )
                yield node
        finally:
            _log.info("libp2p node stopping", peer_id=str(node.peer_id))
            await _graceful_close(host, close_timeout)
    if unbound:
        # raised outside host.run()'s nurseries, so it is a bare OSError
        raise OSError(f"could not listen on {', '.join(unbound)}")


async def serve_node(
    key_pair: KeyPair,
    listen_addrs: Sequence[Multiaddr | str] = ("/ip4/127.0.0.1/tcp/0",),
    *,
    negotiate_timeout: int = 10,
    auto_connect: bool = False,
    close_timeout: float = 10.0,
    task_status: trio.TaskStatus[P2PNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    """:func:`open_node` shaped for ``node = await nursery.start(serve_node, kp)``.

    Runs until the surrounding nursery is cancelled.
    """
    async with open_node(
        key_pair,
        listen_addrs,
        negotiate_timeout=negotiate_timeout,
        auto_connect=auto_connect,
        close_timeout=close_timeout,
    ) as node:
        task_status.started(node)
        await trio.sleep_forever()
