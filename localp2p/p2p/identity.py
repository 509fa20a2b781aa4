"""A node's persistent Ed25519 identity: the key file, written atomically, and the lock on it.

:func:`load_or_create_identity` reads or creates a key file (mode 0600, fsynced,
hard-linked into place so a crash or a race never leaves a half-written key).
:func:`claim_identity` also locks it (``flock``), so a second live process sharing
the state dir gets its own identity file instead of the same peer id; the lock is
held by an :class:`IdentityClaim` and dies with its process however it dies.

All of it is synchronous file I/O: call it before ``trio.run`` or through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Self

from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.ed25519 import create_new_key_pair as create_new_ed25519_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from localp2p.logs import get_logger

__all__ = [
    "IDENTITY_SLOTS",
    "IdentityClaim",
    "claim_identity",
    "identity_slot_path",
    "load_or_create_identity",
]

_log: Any = get_logger(__name__)

#: Identity files :func:`claim_identity` tries per key path: one per process of one
#: role sharing a state dir; far more than one machine runs, small enough to fail fast.
IDENTITY_SLOTS = 64
#: Times :func:`claim_identity` re-opens a file that was replaced while it locked it.
IDENTITY_CLAIM_RETRIES = 5


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
