"""The guard on a worker's tensor-cache disk (``--cache-dir``).

llama.cpp's rpc-server saves each big tensor it receives (above 10 MiB) as
``DIR/<16 hex digits of the tensor's FNV-1a hash>`` and, on a later load, copies the
weights from that file when the client offers the same hash. It neither checks the
write nor the length of the file it reads back: on a full disk it leaves a truncated
(or empty) file, and every later load silently gets wrong weights, so the model's
answers change. Hashing the files back to validate them (FNV-1a over GBs, in Python)
is far too slow, so the worker guards the disk instead (:class:`CacheGuard`):

- the rpc-server is started with the cache only while the disk has CACHE_MIN_FREE
  bytes free, and after the empty cache files (never valid) are removed;
- while it runs, the free space is polled every CACHE_POLL seconds; when it drops below
  CACHE_MIN_FREE, the rpc-server is stopped, the cache files written since shortly
  before the last good poll (the only ones that can be truncated) are deleted, and the
  rpc-server runs without the cache until the worker is restarted.

llama.cpp writes cache files in place (no temporary files), so there are no leftovers
of that kind to clean. Only files named like llama.cpp's cache files are ever deleted:
the directory is the user's.
"""

from __future__ import annotations

import os
import pathlib
import re
import time
from collections.abc import Callable, Mapping

import trio

from localp2p.errors import StartupError
from localp2p.logs import get_logger
from localp2p.procutil import stop_child

log = get_logger("tensor-cache")

#: Free bytes the cache disk must keep for the cache to be used. One tensor write can be
#: hundreds of MiB (a big model's output or embedding tensor) and the guard looks only
#: once per CACHE_POLL, so this much headroom lets it stop the rpc-server before a write
#: actually fails, in the common case.
CACHE_MIN_FREE = 1 << 30
#: Environment variable overriding CACHE_MIN_FREE, in MiB (small disks, tests).
CACHE_MIN_FREE_ENV = "LOCALP2P_CACHE_MIN_FREE_MB"
#: Seconds between two free-space checks while the rpc-server runs with the cache.
CACHE_POLL = 1.0
#: Cache files modified up to this many seconds before the last good check are deleted
#: too when the disk runs low: coarse mtimes, a write begun before that check, clock steps.
CACHE_DISCARD_MARGIN = 2.0
#: How llama.cpp names a cache file ("%016" PRIx64 of the hash); nothing else is touched.
CACHE_FILE_NAME = re.compile(r"[0-9a-f]{16}")


def cache_min_free(env: Mapping[str, str] | None = None) -> int:
    """CACHE_MIN_FREE, or ``LOCALP2P_CACHE_MIN_FREE_MB`` MiB; StartupError when that is not a number >= 0."""
    raw = (os.environ if env is None else env).get(CACHE_MIN_FREE_ENV, "").strip()
    if not raw:
        return CACHE_MIN_FREE
    try:
        mib = float(raw)
    except ValueError:
        mib = -1.0
    if not mib >= 0:  # also rejects NaN
        raise StartupError(f"{CACHE_MIN_FREE_ENV} must be a number of MiB >= 0, got {raw!r}")
    return int(mib * 2**20)


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


class CacheGuard:
    """Decides whether the rpc-server may use its cache dir, and watches the disk while it does.

    ``tripped`` becomes true when the disk ran low under a running rpc-server; from then
    on the cache stays off (turning it back on would fill the disk again on the next
    load and cost every server a reload each time).
    """

    def __init__(self, cache_dir: str | os.PathLike[str], min_free: int = CACHE_MIN_FREE) -> None:
        self.cache_dir = pathlib.Path(cache_dir)
        self.min_free = min_free
        self.tripped = False
        self._last_good = 0.0  # time.time() of the last check that found enough room (mtimes are wall-clock)

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer can still use on the cache dir's filesystem; OSError if unreadable."""
        stats = os.statvfs(self.cache_dir)
        return stats.f_bavail * stats.f_frsize

    async def usable(self) -> bool:
        """Whether the next rpc-server start may use the cache (call right before starting it).

        Creates the dir and removes empty cache files. Never raises: a dir that cannot
        be used, or a disk below ``min_free``, gives False and one warning.
        """
        if self.tripped:
            return False
        try:
            free = await trio.to_thread.run_sync(self._prepare)
        except OSError as exc:
            log.warning(
                "cannot use the tensor cache dir; starting the rpc-server WITHOUT the cache",
                cache_dir=str(self.cache_dir),
                error=str(exc),
            )
            return False
        if free < self.min_free:
            log.warning(
                "tensor cache disk nearly full; starting the rpc-server WITHOUT the cache "
                "(weights are sent on every load; free some space or set " + CACHE_MIN_FREE_ENV + ")",
                cache_dir=str(self.cache_dir),
                free_mib=_mib(free),
                min_free_mib=_mib(self.min_free),
            )
            return False
        return True

    def _prepare(self) -> int:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        checked = time.time()
        free = self.free_bytes()
        if free >= self.min_free:
            self._last_good = checked
            removed = self._remove(lambda st: st.st_size == 0)
            if removed:
                log.info("removed empty tensor cache files", cache_dir=str(self.cache_dir), files=removed)
        return free

    def _remove(self, suspect: Callable[[os.stat_result], bool]) -> list[str]:
        """Delete the cache files (by name) that ``suspect`` picks; returns their names."""
        removed: list[str] = []
        with os.scandir(self.cache_dir) as entries:
            for entry in entries:
                if not CACHE_FILE_NAME.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                    continue
                if suspect(entry.stat(follow_symlinks=False)):
                    pathlib.Path(entry.path).unlink(missing_ok=True)
                    removed.append(entry.name)
        return sorted(removed)

    async def wait_low(self) -> int:
        """Poll the disk every CACHE_POLL s; return its free bytes once below ``min_free``.

        A disk that cannot be read any more counts as low (0). Runs until then or cancelled.
        """
        while True:
            await trio.sleep(CACHE_POLL)
            checked = time.time()
            try:
                free = await trio.to_thread.run_sync(self.free_bytes)
            except OSError:
                return 0
            if free < self.min_free:
                return free
            self._last_good = checked

    async def serve(self, process: trio.Process) -> int | None:
        """Wait for a cache-using rpc-server to exit while watching its disk.

        Returns its exit code; or, when the disk ran low first, stops it, deletes the
        cache files that may be truncated, trips the guard and returns None (the caller
        restarts the rpc-server, which then runs without the cache).
        """
        free: int | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal free
                free = await self.wait_low()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            code = await process.wait()
            nursery.cancel_scope.cancel()
        if free is None:
            return code
        self.tripped = True
        await stop_child(process)
        cutoff = self._last_good - CACHE_DISCARD_MARGIN
        try:
            removed = await trio.to_thread.run_sync(self._remove, lambda st: st.st_mtime >= cutoff or st.st_size == 0)
        except OSError as exc:
            removed = [f"(failed: {exc})"]
        log.error(
            "tensor cache disk ran low while the rpc-server was using it: stopped it, deleted the "
            "cache files written since the last check (they may be truncated) and restarting it WITHOUT "
            "the cache until this worker restarts",
            cache_dir=str(self.cache_dir),
            free_mib=_mib(free),
            min_free_mib=_mib(self.min_free),
            deleted=removed,
        )
        return None
