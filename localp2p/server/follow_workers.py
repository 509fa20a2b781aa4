"""From worker-set changes to backend reloads: one reload per wave of changes (p2p mode).

:func:`follow_worker_set` watches the worker set (localp2p.server.worker_set.WorkerSet)
and asks the supervisor for a reload with the new list of rpc-servers, debounced:
workers arriving together cause one reload, not one each. A worker whose link moved from
a relay to a direct path (a hole punch) asks for a reload with the same list: the new
backend process opens its rpc connections afresh, on the direct path (see
localp2p.p2p.links).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import trio

#: Seconds of quiet after a worker-set change before reloading: workers arriving together
#: cause one reload, not one each. Not waited when the set is settled (every known worker
#: online, nobody attaching): then nobody else is on the way.
RELOAD_DEBOUNCE = 1.5
#: Longest a stream of changes can hold a reload back.
RELOAD_DEBOUNCE_MAX = 5.0


class WorkerSource(Protocol):
    """What the supervisor reads from the worker set (see localp2p.server.worker_set.WorkerSet)."""

    version: int
    #: Times a live worker's link moved from a relay to a direct path.
    upgrades: int

    async def wait_changed(self, seen_version: int) -> int: ...

    def settled(self) -> bool: ...

    def endpoints(self) -> tuple[str, ...]: ...


class ReloadTarget(Protocol):
    """What takes the reloads (see localp2p.server.supervisor.BackendSupervisor.request_reload)."""

    def request_reload(self, rpc_servers: Sequence[str], *, rebind: bool = False) -> None: ...


async def follow_worker_set(
    supervisor: ReloadTarget,
    workers: WorkerSource,
    static_servers: Sequence[str] = (),
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reload the backend whenever the set of live workers changes, debounced unless settled.

    After a change, waits for RELOAD_DEBOUNCE s without another change (at most
    RELOAD_DEBOUNCE_MAX s from the first), unless the set is settled; then requests one
    reload with ``static_servers`` (LLAMACPP_GRPC_SERVERS) followed by the live workers'
    tunnel endpoints, with ``rebind`` when a worker's link was upgraded meanwhile (the
    backend restarts even if the list is the same, so the tunnel moves to the direct path).
    Changes before ``task_status.started()`` are not seen. Runs until cancelled; raises
    nothing of its own.
    """
    seen, upgrades = workers.version, workers.upgrades
    task_status.started()
    while True:
        seen = await workers.wait_changed(seen)
        deadline = trio.current_time() + RELOAD_DEBOUNCE_MAX
        while not workers.settled() and trio.current_time() < deadline:
            with trio.move_on_at(min(deadline, trio.current_time() + RELOAD_DEBOUNCE)) as quiet:
                seen = await workers.wait_changed(seen)
            if quiet.cancelled_caught:
                break
        supervisor.request_reload((*static_servers, *workers.endpoints()), rebind=workers.upgrades != upgrades)
        upgrades = workers.upgrades
