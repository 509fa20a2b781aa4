"""The one thread of the backend process that calls into llama.cpp.

llama.cpp's CPU backend runs each computation on an OpenMP team that belongs to the
calling thread. Called from the gRPC server's pool, every pool thread that ever ran a
request keeps a team of its own: on 2 cores, two requests from two threads leave 4
threads that spin at barriers, and decoding stays ~2.6× slower for the life of the
process. So every llama.cpp computation of the backend (loads, generations,
embeddings) runs on this one thread, in the order submitted; gRPC threads only wait
for results or relay a generation's replies.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

#: Name of the engine thread (seen in debuggers and py-spy dumps).
THREAD_NAME = "llama-engine"

_ITEM, _ERROR, _DONE = "item", "error", "done"


class EngineThread:
    """Runs callables and generators on one dedicated thread, one at a time (FIFO).

    Work keeps the caller's contextvars (the request id bound for logging). An
    exception raised on the engine thread is raised again in the caller's thread.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
        self._ident: int | None = None

    @property
    def ident(self) -> int | None:
        """The engine thread's id, once it has run something (tests compare with it)."""
        return self._ident

    def _enter(self) -> None:
        self._ident = threading.get_ident()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the engine thread; blocks until it is done and returns its result."""
        scope = contextvars.copy_context()

        def run() -> T:
            self._enter()
            return scope.run(fn, *args)

        return self._pool.submit(run).result()

    def stream(self, make: Callable[[], Generator[T, None, None]]) -> Generator[T, None, None]:
        """The items of the generator ``make()``, which runs on the engine thread.

        Items are relayed as they come. When the consumer stops early (closes this
        iterator: the client went away), the generator is closed on the engine thread
        after its next item, so its own clean-up runs there.
        """
        scope = contextvars.copy_context()
        relay: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        stopped = threading.Event()

        def work() -> None:
            self._enter()
            items = make()
            try:
                for item in items:
                    relay.put((_ITEM, item))
                    if stopped.is_set():
                        break
            except BaseException as exc:
                relay.put((_ERROR, exc))
                return
            finally:
                items.close()
            relay.put((_DONE, None))

        self._pool.submit(scope.run, work)
        try:
            while True:
                kind, value = relay.get()
                if kind == _DONE:
                    return
                if kind == _ERROR:
                    raise value
                yield value
        finally:
            stopped.set()
