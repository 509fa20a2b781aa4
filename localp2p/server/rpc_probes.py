"""Probes of the backend's rpc-servers from the server (HELLO, in a thread).

Two questions the supervisor asks about them: which rpc-servers do not answer now (to
tell a CPU crash from a lost worker, see BackendSupervisor._fall_back_to_safe_mode), and
when does one the backend skipped at its start answer again (then a reload takes it in).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from localp2p.llama import rpc

#: Seconds one probe of a backend's rpc-server may take when telling a CPU crash from a
#: lost worker (a live rpc-server answers HELLO in milliseconds).
CRASH_PROBE_TIMEOUT = 2.0
#: Seconds after a load before a wanted rpc-server it skipped (unreachable at its start: a
#: worker whose rpc-server was restarting) is probed again; doubling up to the max while it
#: stays unreachable. One that answers brings a reload that takes it in.
SKIPPED_PROBE_MIN = 0.5
SKIPPED_PROBE_MAX = 30.0
#: Seconds one probe of a skipped rpc-server may take.
SKIPPED_PROBE_TIMEOUT = 1.0


async def unreachable(endpoints: Sequence[str], timeout: float = CRASH_PROBE_TIMEOUT) -> list[str]:
    """The rpc-servers among ``endpoints`` that do not answer HELLO within ``timeout`` now (probed together)."""
    lost: list[str] = []

    async def probe(endpoint: str) -> None:
        try:
            await trio.to_thread.run_sync(rpc.probe, endpoint, timeout)
        except rpc.RPCError:
            lost.append(endpoint)

    async with trio.open_nursery() as nursery:
        for endpoint in endpoints:
            nursery.start_soon(probe, endpoint)
    return lost


async def wait_skipped_back(skipped: Sequence[str], wanted: Callable[[], Sequence[str]]) -> str | None:
    """Return the first of ``skipped`` that answers HELLO again while ``wanted()`` still lists it.

    Probes wait SKIPPED_PROBE_MIN s at first, doubling to SKIPPED_PROBE_MAX while none
    answers. Returns None once none of ``skipped`` is wanted any more (a dead worker
    dropped from the worker set). Runs until then, or until cancelled.
    """
    delay = SKIPPED_PROBE_MIN
    while True:
        pending = [e for e in skipped if e in wanted()]
        if not pending:
            return None
        await trio.sleep(delay)
        for endpoint in pending:
            try:
                await trio.to_thread.run_sync(rpc.probe, endpoint, SKIPPED_PROBE_TIMEOUT)
            except rpc.RPCError:
                continue
            if endpoint in wanted():
                return endpoint
        delay = min(delay * 2, SKIPPED_PROBE_MAX)
