"""Unit tests (no processes, trio's MockClock): the worker set's change signal and
``settled``, and the debounce from worker-set changes to reloads (follow_worker_set).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
import trio
import trio.testing

from localp2p.server.follow_workers import RELOAD_DEBOUNCE, RELOAD_DEBOUNCE_MAX, follow_worker_set
from localp2p.server.weight_plan import worker_labels
from localp2p.server.worker_set import BUSY, CONNECTING, OFFLINE, ONLINE, Worker, WorkerSet

STATIC = ("10.0.0.9:50052",)


def _run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def _worker(workers: WorkerSet, peer_id: str, state: str, port: int | None = None) -> Worker:
    worker = workers.upsert(Worker(peer_id=peer_id, tunnel_port=port))
    workers.set_state(worker, state)
    return worker


# --- the set ---------------------------------------------------------------------------


def test_settled_means_nobody_is_on_the_way() -> None:
    async def main() -> None:
        workers = WorkerSet()
        assert workers.settled()
        a = _worker(workers, "a", CONNECTING)
        assert not workers.settled()
        workers.set_state(a, ONLINE)
        assert workers.settled()
        b = _worker(workers, "b", BUSY)  # serving another server: not on its way here
        assert workers.settled()
        workers.set_state(b, OFFLINE)
        assert not workers.settled()
        workers.set_state(b, ONLINE)
        with workers.attaching("c"):
            assert not workers.settled()
        assert workers.settled()
        with pytest.raises(RuntimeError), workers.attaching("d"):
            raise RuntimeError("the attempt failed")
        assert workers.settled()

    _run(main)


def test_version_moves_on_real_changes_only() -> None:
    async def main() -> None:
        workers = WorkerSet()
        worker = _worker(workers, "a", ONLINE, 4001)
        seen = workers.version
        workers.set_state(worker, ONLINE)  # no change
        assert workers.version == seen
        with trio.move_on_after(10):
            await workers.wait_changed(seen)
        assert trio.current_time() == 10  # nothing to wake for
        workers.set_state(worker, OFFLINE)
        assert await workers.wait_changed(seen) == seen + 1  # at once: already changed

    _run(main)


def test_endpoints_are_the_online_workers_tunnels_in_peer_order() -> None:
    workers = WorkerSet()
    _worker(workers, "b", ONLINE, 4002)
    _worker(workers, "a", ONLINE, 4001)
    _worker(workers, "c", BUSY, 4003)
    _worker(workers, "d", ONLINE, None)  # no tunnel yet
    assert workers.endpoints() == ("127.0.0.1:4001", "127.0.0.1:4002")


# --- debounce --------------------------------------------------------------------------


class Reloads:
    """Records the reloads follow_worker_set requests (a stand-in for the supervisor)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, tuple[str, ...]]] = []
        #: The calls' ``rebind``, in order.
        self.rebinds: list[bool] = []

    def request_reload(self, rpc_servers: Sequence[str], *, rebind: bool = False) -> None:
        self.calls.append((trio.current_time(), tuple(rpc_servers)))
        self.rebinds.append(rebind)


async def _follow(
    workers: WorkerSet, changes: Sequence[tuple[float, Callable[[], Any]]], until: float = 30.0, reloads: Reloads | None = None
) -> list[tuple[float, tuple[str, ...]]]:
    """Run follow_worker_set while ``changes`` (trio time, action) happen; the reloads it requested."""
    reloads = reloads or Reloads()
    async with trio.open_nursery() as nursery:
        await nursery.start(follow_worker_set, reloads, workers, STATIC)
        for at, change in changes:
            await trio.sleep_until(at)
            change()
        await trio.sleep_until(until)
        nursery.cancel_scope.cancel()
    return reloads.calls


def test_a_settled_set_reloads_at_once() -> None:
    async def main() -> None:
        workers = WorkerSet()
        a = workers.upsert(Worker(peer_id="a", tunnel_port=4001))
        calls = await _follow(workers, [(1.0, lambda: workers.set_state(a, ONLINE))])
        assert calls == [(1.0, (*STATIC, "127.0.0.1:4001"))]

    _run(main)


def test_workers_arriving_together_cause_one_reload_after_a_quiet_spell() -> None:
    async def main() -> None:
        workers = WorkerSet()
        _worker(workers, "z", OFFLINE, 4009)  # known, not back: the set is not settled
        a = workers.upsert(Worker(peer_id="a", tunnel_port=4001))
        b = workers.upsert(Worker(peer_id="b", tunnel_port=4002))
        calls = await _follow(workers, [(1.0, lambda: workers.set_state(a, ONLINE)), (2.0, lambda: workers.set_state(b, ONLINE))])
        assert calls == [(pytest.approx(2.0 + RELOAD_DEBOUNCE), (*STATIC, "127.0.0.1:4001", "127.0.0.1:4002"))]

    _run(main)


def test_a_stream_of_changes_holds_a_reload_back_at_most_the_max() -> None:
    async def main() -> None:
        workers = WorkerSet()
        _worker(workers, "z", OFFLINE)
        every = RELOAD_DEBOUNCE * 0.8  # never quiet long enough
        changes = [(i * every, workers.notify) for i in range(1, 9)]
        calls = await _follow(workers, changes)
        first = changes[0][0]
        assert calls[0][0] == pytest.approx(first + RELOAD_DEBOUNCE_MAX)
        assert len(calls) == 2  # the changes after the first reload make one more
        assert calls[1][0] == pytest.approx(changes[-1][0] + RELOAD_DEBOUNCE)

    _run(main)


def test_becoming_settled_ends_the_wait() -> None:
    async def main() -> None:
        workers = WorkerSet()
        z = _worker(workers, "z", OFFLINE, 4009)
        a = workers.upsert(Worker(peer_id="a", tunnel_port=4001))
        calls = await _follow(workers, [(1.0, lambda: workers.set_state(a, ONLINE)), (1.5, lambda: workers.set_state(z, ONLINE))])
        assert calls == [(1.5, (*STATIC, "127.0.0.1:4001", "127.0.0.1:4009"))]

    _run(main)


def test_a_peer_attaching_is_waited_for() -> None:
    async def main() -> None:
        workers = WorkerSet()
        a = workers.upsert(Worker(peer_id="a", tunnel_port=4001))
        with workers.attaching("b"):
            calls = await _follow(workers, [(1.0, lambda: workers.set_state(a, ONLINE))])
        assert calls == [(pytest.approx(1.0 + RELOAD_DEBOUNCE), (*STATIC, "127.0.0.1:4001"))]

    _run(main)


def test_a_link_moved_off_a_relay_reloads_with_the_same_list_rebinding() -> None:
    async def main() -> None:
        workers = WorkerSet()
        a = _worker(workers, "a", ONLINE, 4001)
        b = _worker(workers, "b", BUSY, 4002)
        reloads = Reloads()
        calls = await _follow(
            workers,
            [(1.0, lambda: workers.note_upgrade(b)), (2.0, lambda: workers.note_upgrade(a)), (10.0, workers.notify)],
            reloads=reloads,
        )
        # b serves another server: its upgrade is nobody's reload; a's is, with the list unchanged; later changes are plain again
        assert calls == [(2.0, (*STATIC, "127.0.0.1:4001")), (10.0, (*STATIC, "127.0.0.1:4001"))]
        assert reloads.rebinds == [True, False]

    _run(main)


def test_weight_labels_tell_apart_workers_with_one_name() -> None:
    """Two workers started on one machine both take its host name; their fills must not share one entry."""
    workers = [Worker("12D3KooWaaaaaa111111", "vm"), Worker("12D3KooWbbbbbb222222", "vm"), Worker("12D3KooWcccccc333333", "gpu")]
    labels = worker_labels(workers)
    assert labels == {"12D3KooWaaaaaa111111": "vm@111111", "12D3KooWbbbbbb222222": "vm@222222", "12D3KooWcccccc333333": "gpu"}
