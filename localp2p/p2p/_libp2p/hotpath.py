"""py-libp2p's per-frame path, made cheaper: buffered TCP reads and locks that do not yield when free.

Patch (installed by :func:`install`). Upstream behaviour it fixes (notes/libp2p.md,
"Where a tunnel round trip goes"): every byte a tunnel relays crosses py-libp2p's
Noise and Yamux layers in Python. Profiled on a 64-byte round trip (``bench.link``,
cProfile on both tunnel ends), each end spent ~1 ms of CPU, most of it in trio's
scheduler rather than in py-libp2p itself, because of two habits:

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

It relies on ``TrioTCPStream.read(n=None)`` (over ``self.stream.receive_some`` and
``self.read_lock``), and on each ``__init__`` in :data:`LOCKS` creating those
attributes as a ``trio.Lock`` (``ReadWriteLock._writer_lock``: a ``trio.Semaphore``).
A missing or retyped attribute raises (:func:`_swap_locks`) instead of silently
leaving the slow path in place, and :func:`install` checks one object of each class.

Nothing else changes: the bytes on the wire are the same, so peers running plain
py-libp2p are unaffected.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.stream.net_stream import NetStream
from libp2p.stream_muxer.rw_lock import ReadWriteLock
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

__all__ = ["LOCKS", "READ_AHEAD", "FreeLock", "FreeSemaphore", "install"]

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


#: The trio locks each py-libp2p class creates in ``__init__`` and takes per frame.
LOCKS: dict[type, tuple[str, ...]] = {
    TrioTCPStream: ("read_lock", "write_lock"),
    NetStream: ("_state_lock",),
    YamuxStream: ("window_lock", "close_lock"),
    Yamux: ("_write_lock", "streams_lock"),
    ReadWriteLock: ("_readers_lock",),
}


def _swap_locks(obj: object, names: tuple[str, ...]) -> None:
    """Replace each ``trio.Lock`` attribute ``names`` of ``obj`` by a :class:`FreeLock`.

    :raises AttributeError: if one is missing or not a ``trio.Lock`` (py-libp2p changed).
    """
    for name in names:
        current = getattr(obj, name, None)
        if not isinstance(current, trio.Lock):
            raise AttributeError(
                f"py-libp2p's {type(obj).__name__}.{name} is {type(current).__name__}, not a trio.Lock: "
                "the hot-path patch does not fit this py-libp2p"
            )
        setattr(obj, name, FreeLock())


def _after_init(cls: type, swap: Any) -> None:
    """Make ``cls.__init__`` call ``swap(self)`` after py-libp2p's own ``__init__``."""
    original = cls.__init__  # type: ignore[misc]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        swap(self)

    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]


def _rw_lock(lock: ReadWriteLock) -> None:
    """:func:`_swap_locks` for a ReadWriteLock, whose writer lock is a semaphore.

    :raises AttributeError: as :func:`_swap_locks`, or if ``_writer_lock`` is not a ``trio.Semaphore``.
    """
    _swap_locks(lock, LOCKS[ReadWriteLock])
    writer = getattr(lock, "_writer_lock", None)
    if not isinstance(writer, trio.Semaphore):
        raise AttributeError(
            f"py-libp2p's ReadWriteLock._writer_lock is {type(writer).__name__}, not a trio.Semaphore: "
            "the hot-path patch does not fit this py-libp2p"
        )
    # released by whichever reader leaves last: a semaphore, not an owned lock
    lock._writer_lock = FreeSemaphore(writer.value)  # type: ignore[assignment]


def _check() -> None:
    """Build one object of each patched class and check its locks were swapped.

    None of these constructors does I/O or needs a running trio loop.

    :raises AttributeError: if a class no longer has the attributes this patch swaps.
    """
    yamux = Yamux(cast(Any, None), cast(Any, None), is_initiator=True)
    yamux_stream = YamuxStream(1, yamux, True)
    samples: dict[type, object] = {
        TrioTCPStream: TrioTCPStream(cast(Any, None)),
        NetStream: NetStream(yamux_stream, None, None),
        YamuxStream: yamux_stream,
        Yamux: yamux,
        ReadWriteLock: yamux_stream.rw_lock,
    }
    for cls, names in LOCKS.items():
        for name in names:
            if not isinstance(getattr(samples[cls], name), FreeLock):
                raise AttributeError(f"py-libp2p's {cls.__name__}.{name} was not swapped by the hot-path patch")
    if not isinstance(yamux_stream.rw_lock._writer_lock, FreeSemaphore):
        raise AttributeError("py-libp2p's ReadWriteLock._writer_lock was not swapped by the hot-path patch")


_installed = False


def install() -> None:
    """Put the buffered reads and free-lock fast paths into py-libp2p (this process, once).

    :raises AttributeError: if py-libp2p's classes no longer fit (see :func:`_check`).
    """
    global _installed  # noqa: PLW0603 - once per process, like the patches themselves
    if _installed:
        return
    TrioTCPStream.read = _buffered_read  # type: ignore[method-assign]
    for cls, names in LOCKS.items():
        if cls is not ReadWriteLock:
            _after_init(cls, functools.partial(_swap_locks, names=names))
    _after_init(ReadWriteLock, _rw_lock)
    _installed = True
    _check()
