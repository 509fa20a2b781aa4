"""The one thread of the backend process that calls into llama.cpp.

llama.cpp's CPU backend runs each computation on an OpenMP team that belongs to the
calling thread. Called from the gRPC server's pool, every pool thread that ever ran a
request keeps a team of its own: on 2 cores, two requests from two threads leave 4
threads that spin at barriers, and decoding stays ~2.6× slower for the life of the
process. So every llama.cpp computation of the backend (loads, generation steps,
embeddings) runs on this one thread; gRPC threads only submit work and wait.

Between calls the thread steps the current model's batching scheduler
(batching.Scheduler) while it has work. A call marked ``exclusive`` (a model load)
waits until the scheduler has none, and no new generation starts meanwhile.
"""

from __future__ import annotations

import collections
import contextvars
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog

T = TypeVar("T")

#: Name of the engine thread (seen in debuggers and py-spy dumps).
THREAD_NAME = "llama-engine"

log = structlog.get_logger("backend")


class Stepper(Protocol):
    """What the engine thread steps between calls (batching.Scheduler)."""

    #: Set by the engine thread while an exclusive call waits: start no new generation.
    hold: bool

    @property
    def running(self) -> int: ...

    def has_work(self) -> bool: ...

    def step(self) -> None: ...

    def abort(self, error: Exception) -> None: ...


@dataclass
class _Call:
    fn: Callable[[], Any]
    exclusive: bool
    done: Future[Any]


class EngineThread:
    """Runs callables on one dedicated thread, in the order submitted, and steps
    :attr:`stepper` in between. Work keeps the caller's contextvars (the request id bound
    for logging); an exception raised on the engine thread is raised again in the caller's.
    """

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._deferred: collections.deque[_Call] = collections.deque()
        #: The scheduler of the loaded model (None: nothing to step). Set on the engine thread.
        self.stepper: Stepper | None = None
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        """The engine thread's id (tests compare with it)."""
        return self._thread.ident

    def call(self, fn: Callable[..., T], *args: Any, exclusive: bool = True) -> T:
        """``fn(*args)`` on the engine thread; blocks until it is done and returns its result.

        ``exclusive``: wait until no generation runs (and start none meanwhile); otherwise
        it runs between two steps.
        """
        scope = contextvars.copy_context()
        done: Future[T] = Future()
        self._inbox.put(_Call(lambda: scope.run(fn, *args), exclusive, done))
        return done.result()

    def _running(self) -> int:
        return self.stepper.running if self.stepper is not None else 0

    def _has_work(self) -> bool:
        return self.stepper is not None and self.stepper.has_work()

    def _run(self) -> None:
        while True:
            if self.stepper is not None:
                self.stepper.hold = bool(self._deferred)
            if self._deferred and not self._running():
                self._execute(self._deferred.popleft())
                continue
            try:
                work = self._inbox.get(block=not self._has_work())
            except queue.Empty:
                work = None
            if work is not None:
                if work.exclusive and (self._running() or self._deferred):
                    self._deferred.append(work)
                    continue
                self._execute(work)
            stepper = self.stepper
            if stepper is not None and stepper.has_work():
                try:
                    stepper.step()
                except Exception as exc:  # a bug in a step must not stop the thread: its jobs get the error
                    log.exception("engine step failed")
                    stepper.abort(exc)

    @staticmethod
    def _execute(work: _Call) -> None:
        try:
            work.done.set_result(work.fn())
        except BaseException as exc:
            work.done.set_exception(exc)
