"""The admission gate in front of the backend: how many requests are let in, and which are running.

A request is *admitted* from when it asks for the backend until it is done (waiting for a
(re)starting backend counts); beyond ``max_queue`` admitted requests the next one is
refused at once with 429 (:class:`QueueFull`). A request is *in flight* while it uses the
backend; a reload drains them (:meth:`AdmissionGate.wait_idle`) before it stops the process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import trio

from localp2p.server.backend_client import BackendError

#: Default bound on requests admitted at once (waiting for the backend + running): llama.cpp
#: serves one generation at a time, so beyond this a client is better told to retry (429).
DEFAULT_MAX_QUEUE = 64
#: Seconds a client refused for a full queue is asked to wait before retrying (Retry-After).
QUEUE_FULL_RETRY_AFTER = 2


class QueueFull(BackendError):
    """Admission control refused a request: ``max_queue`` requests are already admitted."""

    retry_after: int = QUEUE_FULL_RETRY_AFTER


class AdmissionGate:
    """Owns the admitted and in-flight counts and the idle signal a drain waits for.

    Both counts are decremented when their block exits, however it exits (a request
    cancelled because its client went away included).
    """

    def __init__(self, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        #: Most requests admitted at once; 0: no bound.
        self.max_queue = max_queue
        self._admitted = 0
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    @property
    def admitted(self) -> int:
        """Requests admitted right now: waiting for the backend or running."""
        return self._admitted

    @property
    def in_flight(self) -> int:
        """Requests using the backend right now."""
        return self._in_flight

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a queue slot for the block; raises QueueFull (429, ``queue_full``) at once when none is free."""
        if self.max_queue and self._admitted >= self.max_queue:
            raise QueueFull(
                429,
                f"the server is busy: {self._admitted} requests are already queued or running "
                f"(limit {self.max_queue}, --max-queue); retry shortly",
                "server_error",
                "queue_full",
            )
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Count the block as a request in flight (a drain waits for it)."""
        self._in_flight += 1
        if self._in_flight == 1:
            self._idle = trio.Event()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no request is in flight (at once if none is)."""
        await self._idle.wait()
