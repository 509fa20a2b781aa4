"""Unit tests (no processes, trio's MockClock): the admission gate (localp2p.server.admission)
and the load-progress arithmetic (localp2p.server.load_progress)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from localp2p.server.admission import QUEUE_FULL_RETRY_AFTER, AdmissionGate, QueueFull
from localp2p.server.load_progress import CACHED_LOAD_SHARE, LoadProgress, cached_load


def _run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_gate_refuses_beyond_max_queue_and_frees_slots_however_a_request_ends() -> None:
    gate = AdmissionGate(max_queue=2)
    with gate.admit(), gate.admit():
        assert gate.admitted == 2
        with pytest.raises(QueueFull) as refused, gate.admit():
            pass
        assert refused.value.status == 429 and refused.value.code == "queue_full"
        assert refused.value.retry_after == QUEUE_FULL_RETRY_AFTER
        assert "limit 2, --max-queue" in refused.value.message
    assert gate.admitted == 0
    with pytest.raises(RuntimeError), gate.admit():
        raise RuntimeError("the request failed")
    assert gate.admitted == 0


def test_max_queue_zero_is_no_bound() -> None:
    gate = AdmissionGate(max_queue=0)
    with gate.admit(), gate.admit(), gate.admit():
        assert gate.admitted == 3


def test_a_cancelled_request_frees_its_slot() -> None:
    async def main() -> None:
        gate = AdmissionGate(max_queue=1)
        with trio.move_on_after(1):
            with gate.admit():
                await trio.sleep_forever()  # a client that went away
        assert gate.admitted == 0

    _run(main)


def test_a_drain_waits_for_the_requests_in_flight() -> None:
    async def main() -> None:
        gate = AdmissionGate()
        await gate.wait_idle()  # none in flight: at once
        assert trio.current_time() == 0

        async def request(seconds: float) -> None:
            with gate.running():
                await trio.sleep(seconds)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(request, 3)
            nursery.start_soon(request, 5)
            await trio.sleep(1)
            assert gate.in_flight == 2
            await gate.wait_idle()
            assert trio.current_time() == 5 and gate.in_flight == 0

    _run(main)


def test_progress_rate_eta_and_the_status_fields() -> None:
    progress = LoadProgress(active=True, bytes_total=1000, bytes_sent=250, seconds=3.0, weights_since=1.0)
    assert progress.rate == 125.0  # bytes since the weights began to load, not since the start
    assert progress.eta == 6.0
    fields = progress.as_dict()
    assert fields["rate_bytes_per_s"] == 125 and fields["eta_s"] == 6.0 and fields["active"] is True
    progress.active, progress.fraction = False, 1.0
    assert progress.eta == 0.0
    assert LoadProgress(active=False, fraction=0.5).eta is None  # a load that stopped short


def test_a_cached_load_sent_almost_none_of_the_workers_share() -> None:
    progress = LoadProgress(bytes_total=30_000_000, network_bytes=None)
    assert cached_load(progress, layers_total=30, layers_local=10) is None  # bytes not seen (static mode)
    share = 30_000_000 * 20 / 30
    progress.network_bytes = int(CACHED_LOAD_SHARE * share) - 1
    assert cached_load(progress, layers_total=30, layers_local=10) is True
    progress.network_bytes = int(share)
    assert cached_load(progress, layers_total=30, layers_local=10) is False
    assert cached_load(progress, layers_total=30, layers_local=30) is None  # nothing on the workers
