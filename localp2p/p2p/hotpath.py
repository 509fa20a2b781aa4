"""py-libp2p's per-frame path, made cheaper: buffered TCP reads and locks that do not yield when free.

Every byte a tunnel relays crosses py-libp2p's Noise and Yamux layers in Python.
Profiled on a 64-byte round trip (``bench.link``, cProfile on both tunnel ends),
each end spent ~1 ms of CPU, most of it in trio's scheduler rather than in
py-libp2p itself, because of two habits:

* Noise reads each frame as a 2-byte length and then the body, and each read is
  one ``recv`` system call *and* one pass through trio's scheduler. Here the TCP
  stream reads up to :data:`READ_AHEAD` bytes at once and serves later reads from
  what it already has, so a burst of frames costs one ``recv``.
* trio's ``Lock.acquire`` yields to the scheduler even when the lock is free, and
  py-libp2p takes six to eight locks per frame (stream state, read/write lock,
  window, connection write, socket read/write). :class:`FreeLock` and
  :class:`FreeSemaphore` take a free lock at once and wait in trio's own lock
  only when it is held, so FIFO order among waiters is unchanged; cancellation is
  still checked on every acquire.

:func:`install` swaps these into py-libp2p's classes for this process (idempotent).
Nothing else changes: the bytes on the wire are the same, so peers running plain
py-libp2p are unaffected.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.stream.net_stream import NetStream
from libp2p.stream_muxer.rw_lock import ReadWriteLock
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

__all__ = ["READ_AHEAD", "FreeLock", "FreeSemaphore", "install"]

#: Bytes one TCP read asks for: a Noise frame is at most 64 KiB + 2, and staying
#: under glibc's mmap threshold (128 KiB) keeps each read's buffer a plain malloc.
READ_AHEAD = 64 * 1024


class _FreeAcquire:
    """The shared fast path: take a free unit at once, else wait in trio's own primitive."""

    __slots__ = ("_inner",)
    _inner: Any  # trio.Lock or trio.Semaphore

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._inner.acquire_nowait()  # refuses when taken or when others wait
        except trio.WouldBlock:
            await self._inner.acquire()

    def acquire_nowait(self) -> None:
        self._inner.acquire_nowait()

    def release(self) -> None:
        self._inner.release()

    def statistics(self) -> Any:
        return self._inner.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class FreeLock(_FreeAcquire):
    """A trio lock whose acquire does not yield when the lock is free.

    Same contract as :class:`trio.Lock` otherwise (owner-only release, FIFO among
    waiters, ``Cancelled`` raised on acquire in a cancelled scope). Wraps one.
    """

    __slots__ = ()

    def __init__(self) -> None:
        self._inner = trio.Lock()

    def locked(self) -> bool:
        return bool(self._inner.locked())


class FreeSemaphore(_FreeAcquire):
    """A trio semaphore whose acquire does not yield when a unit is free (any task may release)."""

    __slots__ = ()

    def __init__(self, initial_value: int) -> None:
        self._inner = trio.Semaphore(initial_value)

    @property
    def value(self) -> int:
        return int(self._inner.value)


def _take(buffered: bytearray, n: int | None) -> bytes:
    """Remove and return up to ``n`` (None: all) bytes from the front of ``buffered``."""
    if n is None or n >= len(buffered):
        data = bytes(buffered)
        buffered.clear()
    else:
        data = bytes(buffered[:n])
        del buffered[:n]
    return data


async def _buffered_read(self: TrioTCPStream, n: int | None = None) -> bytes:
    """``TrioTCPStream.read`` that reads ahead; same errors and EOF (b"") as py-libp2p's."""
    if n == 0:
        return b""
    buffered: bytearray | None = getattr(self, "_read_ahead", None)
    if buffered:  # no await between the check and the take: no other reader can interleave
        return _take(buffered, n)
    async with self.read_lock:
        buffered = getattr(self, "_read_ahead", None)
        if buffered:  # another reader filled it while we waited for the lock
            return _take(buffered, n)
        try:
            data = await self.stream.receive_some(READ_AHEAD if n is None else max(n, READ_AHEAD))
        except trio.BrokenResourceError as error:
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}", transport="tcp") from error
        except trio.ClosedResourceError:
            return b""  # closed locally: EOF for the layers above, as py-libp2p does
        if n is None or len(data) <= n:
            return data
        if buffered is None:
            buffered = self._read_ahead = bytearray()  # type: ignore[attr-defined]
        buffered += memoryview(data)[n:]
        return data[:n]


def _swap_locks(obj: object, names: tuple[str, ...]) -> None:
    for name in names:
        if isinstance(getattr(obj, name, None), trio.Lock):
            setattr(obj, name, FreeLock())


def _after_init(cls: type, swap: Any) -> None:
    original = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        swap(self)

    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]


def _rw_lock(lock: ReadWriteLock) -> None:
    _swap_locks(lock, ("_readers_lock",))
    if isinstance(lock._writer_lock, trio.Semaphore):
        # released by whichever reader leaves last: a semaphore, not an owned lock
        lock._writer_lock = FreeSemaphore(lock._writer_lock.value)  # type: ignore[assignment]


_installed = False


def install() -> None:
    """Put the buffered reads and free-lock fast paths into py-libp2p (this process, once)."""
    global _installed
    if _installed:
        return
    _installed = True
    TrioTCPStream.read = _buffered_read  # type: ignore[method-assign]
    _after_init(TrioTCPStream, lambda s: _swap_locks(s, ("read_lock", "write_lock")))
    _after_init(NetStream, lambda s: _swap_locks(s, ("_state_lock",)))
    _after_init(YamuxStream, lambda s: _swap_locks(s, ("window_lock", "close_lock")))
    _after_init(Yamux, lambda s: _swap_locks(s, ("_write_lock", "streams_lock")))
    _after_init(ReadWriteLock, _rw_lock)
