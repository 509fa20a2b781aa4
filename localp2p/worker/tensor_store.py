"""The worker's side of the rpc-server's tensor cache dir: tensors put there before a load.

llama.cpp's rpc-server answers ``SET_TENSOR_HASH`` from ``DIR/<16 hex digits>`` when
that file holds the tensor, so a tensor placed there before a load never crosses the
network. This module owns every file it writes there, and keeps the invariant that
**a tensor enters the cache only after its hash is checked**: each one is written to a
hidden temporary file (``.<hash>.<pid>.part``, a name the rpc-server and the cache
guard never use), its FNV-1a is computed from the file, and only a match is renamed to
``<hash>`` (atomic: the rpc-server sees the whole file or none). A process killed
half-way leaves only a temporary file, removed at the next start.

Disk: the cache holds copies of the weights (a worker's share of each model it
serves). Copies from a local GGUF file go through ``copy_file_range``, which shares
the blocks instead (a reflink) on filesystems that can (btrfs; XFS when aligned).
The tensor-cache guard's rule holds here too: nothing is written unless the disk
keeps ``min_free`` bytes free afterwards, and nothing once the guard has tripped.
"""

from __future__ import annotations

import os
import pathlib
import re
import secrets

from localp2p.llama.fnv import Hasher, hex_name
from localp2p.logs import get_logger
from localp2p.worker.tensor_cache import CACHE_FILE_NAME, CacheGuard

log = get_logger("tensor-cache")

#: Our temporary files in the cache dir (never a name llama.cpp or the guard uses).
PART_NAME = re.compile(r"\.[0-9a-f]{16}\.[0-9a-z]+\.part")
#: Bytes per copy_file_range call (the kernel may do less; looped).
COPY_CHUNK = 64 << 20


class TensorMismatch(Exception):
    """The bytes written do not hash to the expected value; nothing entered the cache."""


class NoRoom(Exception):
    """Writing this tensor would take the cache disk below its free-space floor (or the guard tripped)."""


class PartialTensor:
    """One tensor being written to a temporary file; :meth:`commit` checks and publishes it.

    Blocking methods (call from a thread). Owns its temporary file: :meth:`abort`
    (or a failed :meth:`commit`) removes it.
    """

    def __init__(self, store: TensorStore, hash_: int, size: int) -> None:
        self.store, self.hash, self.size = store, hash_, size
        self.path = store.cache_dir / f".{hex_name(hash_)}.{os.getpid()}{secrets.token_hex(3)}.part"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

    def write_at(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def copy_from(self, src: str, offset: int) -> None:
        """The tensor's bytes from ``src`` at ``offset`` (in-kernel copy; a reflink where the filesystem shares blocks)."""
        with open(src, "rb") as f:
            left, src_off, dst_off = self.size, offset, 0
            while left:
                done = os.copy_file_range(f.fileno(), self.fd, min(left, COPY_CHUNK), src_off, dst_off)
                if done <= 0:
                    raise OSError(f"{src} is shorter than its index says")
                left, src_off, dst_off = left - done, src_off + done, dst_off + done

    def commit(self) -> None:
        """Check the hash of what was written; rename it into the cache if it matches.

        :raises TensorMismatch: wrong bytes (the file is removed). :raises OSError: I/O.
        """
        try:
            if os.fstat(self.fd).st_size != self.size:
                raise TensorMismatch(f"{os.fstat(self.fd).st_size} bytes written, {self.size} expected")
            got = self.store.hasher.fd_range(self.fd, 0, self.size)
            if got != self.hash:
                raise TensorMismatch(f"hash {hex_name(got)}, expected {hex_name(self.hash)}")
            os.close(self.fd)
            self.fd = -1
            os.replace(self.path, self.store.cache_dir / hex_name(self.hash))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


class TensorStore:
    """Tensors by hash in ``cache_dir`` (the rpc-server's ``--cache-dir``); blocking methods, call from threads."""

    def __init__(self, cache_dir: str | os.PathLike[str], hasher: Hasher, guard: CacheGuard | None, min_free: int) -> None:
        self.cache_dir = pathlib.Path(cache_dir)
        self.hasher = hasher
        self.guard = guard
        self.min_free = min_free

    def prepare(self) -> int:
        """Create the dir and remove temporary files left by a killed process; returns how many."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        removed = 0
        for entry in os.scandir(self.cache_dir):
            if PART_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                pathlib.Path(entry.path).unlink(missing_ok=True)
                removed += 1
        return removed

    def path_of(self, hash_: int) -> pathlib.Path:
        return self.cache_dir / hex_name(hash_)

    def has(self, hash_: int, size: int) -> bool:
        """Whether the cache holds a file for ``hash_`` of ``size`` bytes (the rpc-server's or ours)."""
        try:
            return self.path_of(hash_).stat().st_size == size
        except OSError:
            return False

    def cached(self) -> set[int]:
        """Hashes of every cache file present (by name)."""
        try:
            return {int(e.name, 16) for e in os.scandir(self.cache_dir) if CACHE_FILE_NAME.fullmatch(e.name)}
        except OSError:
            return set()

    def check_room(self, size: int) -> None:
        """:raises NoRoom: when writing ``size`` bytes would break the guard's free-space rule."""
        if self.guard is not None and self.guard.tripped:
            raise NoRoom("the tensor cache guard has turned the cache off")
        stats = os.statvfs(self.cache_dir)
        free = stats.f_bavail * stats.f_frsize
        if free - size < self.min_free:
            raise NoRoom(f"{free >> 20} MiB free, {size >> 20} MiB needed above the {self.min_free >> 20} MiB floor")

    def begin(self, hash_: int, size: int) -> PartialTensor:
        """A temporary file for one tensor. :raises NoRoom:, OSError."""
        self.check_room(size)
        return PartialTensor(self, hash_, size)

    def place_from_file(self, hash_: int, size: int, src: str, offset: int) -> None:
        """Copy one tensor from a local GGUF file into the cache, checked. :raises TensorMismatch, NoRoom, OSError."""
        part = self.begin(hash_, size)
        try:
            part.copy_from(src, offset)
        except BaseException:
            part.abort()
            raise
        part.commit()
