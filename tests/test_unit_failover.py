"""Unit tests (no processes, trio's MockClock): failover's retry and crash counting
(localp2p.server.failover.generate).

The supervisor and the backend processes are stand-ins here, the one place they are: the
unit under test is generate()'s bookkeeping (crashes in a row without a new token, a
retry that reaches the dead process again, the timeout, a FAILED supervisor). The real
path is covered by tests/test_static_faults.py, tests/test_p2p_failover.py and
tests/test_backend_down.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from localp2p._proto import backend_pb2 as pb
from localp2p.server import failover
from localp2p.server.backend_client import BACKEND_FAILED, BackendError
from localp2p.server.backend_state import BackendState, BackendStatus

#: Tokens of the whole generation; token ``i``'s text is one letter.
TOKENS = 12
#: Seconds between two tokens of a stand-in backend.
TOKEN_TIME = 0.05
#: The stand-in supervisor's bound on waiting for a ready backend (the real one's default).
READY_WAIT = 120.0
#: The last error of a supervisor whose restarts keep failing.
LOAD_ERROR = "not a GGUF model file: /models/m.gguf"


def _text(i: int) -> bytes:
    return bytes([ord("a") + i])


FULL_TEXT = b"".join(_text(i) for i in range(TOKENS))


class FakeProcess:
    """One backend process: replays the text of ``ContinueTokens`` (as the real one does), then
    generates ``produce`` new tokens and dies; ``produce`` None: finishes the generation."""

    def __init__(self, supervisor: FakeSupervisor, produce: int | None) -> None:
        self.supervisor = supervisor
        self.produce = produce
        self.dead = False

    def _die(self) -> BackendError:
        return BackendError(502, "the inference backend failed during the request", "server_error", BACKEND_FAILED)

    async def predict_stream(self, options: Any) -> AsyncIterator[Any]:
        if self.dead:
            raise self._die()
        done = list(options.ContinueTokens)
        for i in done:
            yield pb.Reply(message=_text(i))  # replayed: the text again, no new ids
        for new, i in enumerate(range(len(done), TOKENS)):
            if new == self.produce:
                self.dead = True
                self.supervisor.crashed()
                raise self._die()
            await trio.sleep(TOKEN_TIME)
            yield pb.Reply(message=_text(i), token_ids=[i])
        yield pb.Reply(finish_reason="length", tokens=TOKENS)


class FakeSupervisor:
    """Serves the processes of ``plan`` one after the other, each ``restart_s`` after the
    last one died (None: never again); FAILED ``failed_after`` s after a death when set.
    Right after a death it still counts as ready for ``stale`` sessions, which get the dead
    process (as the real supervisor may for a moment)."""

    def __init__(
        self, plan: list[int | None], *, restart_s: float | None = 1.0, failed_after: float | None = None, stale: int = 0
    ) -> None:
        self._plan = iter(plan)
        self._restart_s, self._failed_after, self._stale_per_crash = restart_s, failed_after, stale
        self._status = BackendStatus(state=BackendState.READY, model="m")
        self.process = FakeProcess(self, next(self._plan))
        self.started = 1  # processes started
        self._died_at: float | None = None
        self._stale = 0

    def crashed(self) -> None:
        self._died_at = trio.current_time()
        self._stale = self._stale_per_crash
        self._status.state = BackendState.RESTARTING
        self._status.last_error = "backend process exited with code -9"

    def _advance(self) -> None:
        if self._died_at is None:
            return
        since = trio.current_time() - self._died_at
        if self._failed_after is not None and since >= self._failed_after:
            self._status.state, self._status.last_error = BackendState.FAILED, LOAD_ERROR
        if self._restart_s is not None and since >= self._restart_s:
            self.process, self._died_at, self._stale = FakeProcess(self, next(self._plan)), None, 0
            self.started += 1
            self._status.state = BackendState.READY

    @property
    def status(self) -> BackendStatus:
        self._advance()
        return self._status

    @property
    def ready(self) -> bool:
        self._advance()
        return self._died_at is None or self._stale > 0

    def note_generated(self) -> None:
        pass

    @contextlib.asynccontextmanager
    async def session(self, model: str) -> AsyncIterator[FakeProcess]:
        with trio.move_on_after(READY_WAIT):
            while not self.ready:
                await trio.sleep(0.01)
        if not self.ready:
            raise BackendError(503, f"the inference backend is not ready: {self.status.state.value}", code="backend_not_ready")
        if self._stale:
            self._stale -= 1
        yield self.process


def _run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


async def _generate(supervisor: FakeSupervisor, timeout: float = 60.0) -> tuple[bytes, list[Any]]:
    """The text yielded and every reply, of a generation through ``supervisor``."""
    replies = []
    options = pb.PredictOptions(RequestId="r1")
    async for reply in failover.generate(supervisor, "m", options, timeout):  # type: ignore[arg-type]
        replies.append(reply)
    return b"".join(r.message for r in replies), replies


def test_each_byte_once_across_crashes_with_progress() -> None:
    """Crashes that each come after a new token are no crash loop: the generation completes."""

    async def main() -> None:
        supervisor = FakeSupervisor([2, 1, 1, 1, 1, None])
        text, replies = await _generate(supervisor)
        assert text == FULL_TEXT
        assert replies[-1].finish_reason == "length"
        assert supervisor.started == 6

    _run(main)


def test_gives_up_after_three_crashes_in_a_row_without_a_token() -> None:
    async def main() -> None:
        supervisor = FakeSupervisor([2, 0, 0, None])
        text = b""
        with pytest.raises(BackendError) as caught:
            async for reply in failover.generate(supervisor, "m", pb.PredictOptions(), 60.0):  # type: ignore[arg-type]
                text += reply.message
        assert text == FULL_TEXT[:2]
        assert caught.value.code == BACKEND_FAILED and caught.value.status == 502
        assert f"failed {failover.MAX_CRASHES_WITHOUT_PROGRESS} times in a row" in caught.value.message
        assert "(2 tokens had been generated" in caught.value.message
        assert supervisor.started == failover.MAX_CRASHES_WITHOUT_PROGRESS  # the fourth was never asked for

    _run(main)


def test_a_retry_that_reaches_the_dead_process_again_is_not_a_crash() -> None:
    """Two retries hit each dead process (still counted ready for a moment): two crashes, not six."""

    async def main() -> None:
        supervisor = FakeSupervisor([1, 0, None], stale=2)
        text, _ = await _generate(supervisor)
        assert text == FULL_TEXT
        assert supervisor.started == 3

    _run(main)


def test_a_failed_supervisor_ends_the_failover_at_once_with_its_last_error() -> None:
    async def main() -> None:
        supervisor = FakeSupervisor([3], restart_s=None, failed_after=2.0)
        with pytest.raises(BackendError) as caught:
            await _generate(supervisor, timeout=60.0)
        assert trio.current_time() < 3.0  # not the 60 s timeout, nor the 120 s wait for a ready backend
        assert caught.value.code == BACKEND_FAILED
        assert "its restarts keep failing" in caught.value.message
        assert LOAD_ERROR in caught.value.message
        assert "(3 tokens had been generated" in caught.value.message

    _run(main)


def test_gives_up_when_no_backend_comes_back_in_time() -> None:
    async def main() -> None:
        supervisor = FakeSupervisor([1], restart_s=None)
        with pytest.raises(BackendError) as caught:
            await _generate(supervisor, timeout=5.0)
        assert 5.0 <= trio.current_time() < 5.5
        assert caught.value.code == BACKEND_FAILED
        assert "no backend came back within 5 s" in caught.value.message

    _run(main)


def test_failover_off_raises_the_failure_itself() -> None:
    async def main() -> None:
        supervisor = FakeSupervisor([1, None])
        with pytest.raises(BackendError) as caught:
            await _generate(supervisor, timeout=0)
        assert caught.value.code == BACKEND_FAILED
        assert caught.value.message == "the inference backend failed during the request"
        assert supervisor.started == 1

    _run(main)
