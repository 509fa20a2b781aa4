"""Unit tests (no processes, trio's MockClock): a ping failure's typed kind
(localp2p.p2p.liveness) and how the attacher paces its pings by it (WorkerAttacher._watch).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from localp2p.p2p.auth import encode_frame
from localp2p.p2p.liveness import MAX_MISSED, PING_TIMEOUT, Pinger, PingFailed, PingFailure, failure_kind
from localp2p.server.worker_set import FAST_FAILURE_RETRY, ONLINE, Worker, WorkerAttacher, WorkerSet


def _run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


class _Stream:
    """A ping stream whose peer answers ``reply`` (a framed payload)."""

    def __init__(self, reply: bytes) -> None:
        self.reply = encode_frame(reply)

    async def write(self, data: bytes) -> None:
        pass

    async def read(self, n: int = -1) -> bytes:
        chunk, self.reply = self.reply[:n], self.reply[n:]
        return chunk

    async def reset(self) -> None:
        pass


class _Node:
    """What Pinger uses of a P2PNode: ``new_stream`` does ``behaviour`` (raise, hang, or a stream)."""

    def __init__(self, behaviour: Callable[[], Awaitable[Any]]) -> None:
        self.behaviour = behaviour

    async def new_stream(self, peer_id: Any, protocol: str) -> Any:
        return await self.behaviour()


def _ping_failure(behaviour: Callable[[], Awaitable[Any]]) -> tuple[PingFailed, float]:
    caught: list[PingFailed] = []

    async def main() -> None:
        with pytest.raises(PingFailed) as failed:
            await Pinger(_Node(behaviour), "peer").ping()  # type: ignore[arg-type]
        caught.append(failed.value)
        caught_at.append(trio.current_time())

    caught_at: list[float] = []
    _run(main)
    return caught[0], caught_at[0]


def test_ping_failures_are_typed() -> None:
    async def refused() -> Any:
        raise ConnectionRefusedError(111, "Connection refused")

    async def silent() -> Any:
        await trio.sleep_forever()

    async def lower_timeout() -> Any:
        try:
            raise TimeoutError("deadline of the muxer")
        except TimeoutError as exc:
            raise RuntimeError("stream failure") from exc  # wrapped, as py-libp2p does

    async def garbage() -> Any:
        return _Stream(b"x")  # not the nonce and a status byte

    failed, at = _ping_failure(refused)
    assert failed.kind is PingFailure.BROKEN and at == 0
    assert "ConnectionRefusedError" in str(failed)
    failed, at = _ping_failure(silent)
    assert failed.kind is PingFailure.TIMED_OUT and at == PING_TIMEOUT
    assert _ping_failure(lower_timeout)[0].kind is PingFailure.TIMED_OUT
    assert _ping_failure(garbage)[0].kind is PingFailure.MALFORMED
    assert failure_kind(OSError(110, "Connection timed out")) is PingFailure.TIMED_OUT  # ETIMEDOUT is a TimeoutError
    assert failure_kind(OSError(104, "Connection reset by peer")) is PingFailure.BROKEN


class _FailingPinger:
    """Fails every ping with ``kind``; a TIMED_OUT one takes PING_TIMEOUT, as a real one does."""

    def __init__(self, kind: PingFailure) -> None:
        self.kind = kind
        self.rtt = None

    async def ping(self) -> bool:
        if self.kind is PingFailure.TIMED_OUT:
            await trio.sleep(PING_TIMEOUT)
        raise PingFailed(self.kind, "no answer")  # the message says nothing of the kind


@pytest.mark.parametrize(
    ("kind", "pause"),
    [(PingFailure.TIMED_OUT, 0.0), (PingFailure.BROKEN, FAST_FAILURE_RETRY), (PingFailure.MALFORMED, FAST_FAILURE_RETRY)],
)
def test_the_attacher_paces_pings_by_the_failure_kind(kind: PingFailure, pause: float) -> None:
    """A timeout has waited already; a failure at once is followed by a pause, not a spin."""

    async def main() -> None:
        workers = WorkerSet()
        worker = workers.upsert(Worker(peer_id="a", tunnel_port=4001))
        workers.set_state(worker, ONLINE)
        attacher = WorkerAttacher(None, None, workers)  # type: ignore[arg-type]
        await attacher._watch(_FailingPinger(kind), worker)  # type: ignore[arg-type]
        wait = PING_TIMEOUT if kind is PingFailure.TIMED_OUT else 0.0
        assert trio.current_time() == pytest.approx(MAX_MISSED * (wait + pause))

    _run(main)
