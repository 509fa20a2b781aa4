"""Failover mid-generation: a generation outlives the backend process that started it.

llama.cpp aborts the backend process when an rpc-server dies mid-request; the
supervisor restarts it, and the restarted backend skips the dead worker (it loads on
the survivors, or locally). :func:`generate` hides that from the request: it waits
for the restarted backend and re-issues the generation with ``ContinueTokens`` = the
token ids received so far, so it goes on where it stopped (the backend recomputes
exactly what the first run computed: at temperature 0 the text equals an
uninterrupted run's). The text the client already has is not sent again.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import trio

from localp2p._proto import backend_pb2 as pb
from localp2p.logs import get_logger
from localp2p.server.backend_client import BACKEND_FAILED, BackendClient, BackendError
from localp2p.server.backend_state import BackendState
from localp2p.server.supervisor import BackendSupervisor

log = get_logger("failover")

#: Default seconds a request may spend recovering from one backend failure (waiting for
#: the restart, reloading on the survivors, replaying) before it gives up: a reload on
#: a slow link takes tens of seconds, and a client waiting longer is better told why.
DEFAULT_FAILOVER_TIMEOUT = 60.0
#: Backend processes one request may see die in a row without a new token before it gives
#: up: a request that itself crashes the backend must not crash-loop the server until
#: the timeout.
MAX_CRASHES_WITHOUT_PROGRESS = 3
#: Seconds between looks at the supervisor while the backend is replaced: right after a
#: crash it can still count as ready for a moment, so a retry can hit the dead process.
RETRY_INTERVAL = 0.1


def _attempt_options(options: pb.PredictOptions, ids: list[int]) -> pb.PredictOptions:
    attempt = pb.PredictOptions()
    attempt.CopyFrom(options)
    del attempt.ContinueTokens[:]
    attempt.ContinueTokens.extend(ids)
    return attempt


def _give_up(options: pb.PredictOptions, why: str, tokens: int, cause: BackendError) -> BackendError:
    """The error a request ends with when failover gives up (logged here)."""
    log.warning("failover gave up", request_id=options.RequestId or None, reason=why, tokens_so_far=tokens)
    return BackendError(
        502,
        f"the inference backend failed during the request and the generation could not be continued: {why} "
        f"({tokens} tokens had been generated; first failure: {cause.message})",
        "server_error",
        BACKEND_FAILED,
    )


def _down(supervisor: BackendSupervisor) -> str | None:
    """Why waiting for the backend is pointless now (the supervisor is FAILED: its restarts
    keep failing), or None."""
    if supervisor.status.state is not BackendState.FAILED:
        return None
    return f"the backend is down: its restarts keep failing ({supervisor.status.last_error or 'no error reported'})"


def _out_of_time(supervisor: BackendSupervisor, timeout: float) -> str:
    last = supervisor.status.last_error
    return f"no backend came back within {timeout:g} s (--failover-timeout)" + (f"; last backend error: {last}" if last else "")


async def _wait_for_backend(supervisor: BackendSupervisor, deadline: float) -> None:
    """Return once the supervisor counts as ready (or at ``deadline``, or when it has failed)."""
    with trio.move_on_at(deadline):
        await trio.sleep(RETRY_INTERVAL)
        while not supervisor.ready and supervisor.status.state is not BackendState.FAILED:
            await trio.sleep(RETRY_INTERVAL)


async def generate(
    supervisor: BackendSupervisor, model: str, options: pb.PredictOptions, timeout: float
) -> AsyncGenerator[pb.Reply, None]:
    """The replies of one generation: text chunks, then the final reply (``finish_reason``).

    Owns retrying: when the backend breaks (BackendError ``backend_failed``) before or
    during the generation, waits for the supervisor's restarted backend and continues
    from the ids received so far; text chunks replayed by the continued run are cut so
    that every byte is yielded once. The final reply's counts cover the whole generation
    (``prompt_tokens`` the original prompt's).

    Raises BackendError: any error other than ``backend_failed`` at once, as does
    ``backend_failed`` when ``timeout`` is 0 (failover off); a clear ``backend_failed``
    error (502) when the generation cannot go on within ``timeout`` seconds of a failure,
    and at once when the supervisor is FAILED (its restarts keep failing: see
    BackendState.FAILED), with its last error.
    """
    ids: list[int] = []
    sent = 0  # bytes of text yielded so far
    failed_at: float | None = None  # trio time of the failure being recovered from
    first_failure: BackendError | None = None
    continued_from = 0  # ids received before the failure being recovered from
    client: BackendClient | None = None  # the backend process of the current attempt
    crashed: BackendClient | None = None  # the last one that failed under this request
    crashes, progress_mark = 0, -1  # processes failed in a row with no new ids; len(ids) at the last failure
    while True:
        skip = sent
        try:
            async with supervisor.session(model) as client:
                async for reply in client.predict_stream(_attempt_options(options, ids)):
                    if reply.token_ids:
                        ids.extend(reply.token_ids)
                        supervisor.note_generated()
                    if reply.message and skip:
                        cut = min(skip, len(reply.message))
                        skip -= cut
                        reply.message = reply.message[cut:]
                    if not reply.message and not reply.finish_reason and not reply.logprobs:
                        continue  # ids only (text held back): nothing for the client yet
                    if failed_at is not None:
                        log.info(
                            "generation continued after failover",
                            request_id=options.RequestId or None,
                            tokens_before=continued_from,
                            pause_s=round(trio.current_time() - failed_at, 2),
                        )
                        failed_at = None
                    if not reply.finish_reason:
                        sent += len(reply.message)
                    yield reply
                    if reply.finish_reason:
                        return
            return  # ended without a final reply: the backend stopped (cancelled)
        except BackendError as exc:
            if exc.code != BACKEND_FAILED or timeout <= 0:
                raise
            now = trio.current_time()
            if client is not crashed:  # not a retry that reached the dead process again
                crashes = crashes + 1 if len(ids) == progress_mark else 1
                crashed, progress_mark = client, len(ids)
            if failed_at is None:
                failed_at, continued_from = now, len(ids)
                first_failure = first_failure or exc
                log.warning(
                    "backend failed mid-generation; failing over",
                    request_id=options.RequestId or None,
                    tokens_so_far=len(ids),
                    error=exc.message,
                    timeout_s=timeout,
                )
            assert first_failure is not None
            down = _down(supervisor)
            if down is not None:
                raise _give_up(options, down, len(ids), first_failure) from None
            if crashes >= MAX_CRASHES_WITHOUT_PROGRESS:
                why = f"the backend failed {crashes} times in a row on this request without producing a token"
                raise _give_up(options, why, len(ids), first_failure) from None
            if now - failed_at >= timeout:
                raise _give_up(options, _out_of_time(supervisor, timeout), len(ids), first_failure) from None
        assert failed_at is not None and first_failure is not None  # only a failure gets here
        await _wait_for_backend(supervisor, failed_at + timeout)
        down = _down(supervisor)
        if down is not None:
            raise _give_up(options, down, len(ids), first_failure)
        if not supervisor.ready and trio.current_time() >= failed_at + timeout:
            raise _give_up(options, _out_of_time(supervisor, timeout), len(ids), first_failure)
