"""gRPC client for a backend process, usable from trio.

grpcio has no trio API, so each call runs in a worker thread; cancelling the trio
task cancels the gRPC call, which the backend sees (``context.is_active()``) and stops
generating. Every gRPC failure becomes a :class:`BackendError` carrying the HTTP
status the API should answer with.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import trio

from localp2p._proto import backend_pb2 as pb
from localp2p._proto import backend_pb2_grpc as pb_grpc

#: Large enough for a 1 MB prompt and a batch of embeddings.
GRPC_MAX_MESSAGE = 64 * 1024 * 1024
#: A model load may stream gigabytes to workers; generous, but not forever.
LOAD_TIMEOUT = 1800.0
#: Health/Status must answer quickly or the backend counts as not ready.
PROBE_TIMEOUT = 2.0
#: Threads for blocking gRPC calls: unbounded here, because admission control
#: (``--max-queue``) bounds the calls. They must not share trio's default limiter (40):
#: queued requests each block a thread until their turn, and would starve both the
#: running generation's reader (a deadlock) and the rest of the app (discovery).
CALL_THREADS = math.inf
#: BackendError code of a backend that broke mid-call (the process died or hung up).
BACKEND_FAILED = "backend_failed"


@dataclass
class BackendError(Exception):
    """A backend call failed; ``status`` is the HTTP status the API should use."""

    status: int
    message: str
    error_type: str = "server_error"
    code: str | None = None

    def __str__(self) -> str:
        return self.message


_STATUS_MAP: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (503, "server_error", "backend_not_ready"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "server_error", "overloaded"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}


def map_rpc_error(exc: grpc.RpcError) -> BackendError:
    """Translate a gRPC failure; anything unexpected means the backend broke mid-call (502)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    if code in _STATUS_MAP:
        status, kind, err_code = _STATUS_MAP[code]
        return BackendError(status, details, kind, err_code)
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and "Exception calling application" in details:
        # The backend is alive; the call itself raised (a bug or an unusual input).
        return BackendError(500, f"the inference backend could not serve the request: {details}", "server_error")
    return BackendError(
        502,
        f"the inference backend failed during the request ({code.name.lower()}: {details}); "
        "it is being restarted, retry shortly",
        "server_error",
        BACKEND_FAILED,
    )


def _next_reply(iterator: Any) -> pb.Reply | None:
    try:
        return next(iterator)
    except StopIteration:
        return None


class BackendClient:
    """One channel to one backend process. Cheap to create; close it when the process goes."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
                ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
            ],
        )
        self._stub = pb_grpc.BackendStub(self._channel)
        self._threads = trio.CapacityLimiter(CALL_THREADS)

    def close(self) -> None:
        self._channel.close()

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        future = method.future(request, timeout=timeout)
        try:
            return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True, limiter=self._threads)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc) from None
        finally:
            future.cancel()

    async def health(self) -> bool:
        try:
            reply = await self._unary(self._stub.Health, pb.HealthMessage(), PROBE_TIMEOUT)
        except BackendError:
            return False
        return bool(reply.message == b"OK")

    async def status(self) -> pb.StatusResponse:
        return await self._unary(self._stub.Status, pb.HealthMessage(), PROBE_TIMEOUT)

    async def load_model(self, options: pb.ModelOptions) -> pb.Result:
        return await self._unary(self._stub.LoadModel, options, LOAD_TIMEOUT)

    async def predict(self, options: pb.PredictOptions) -> pb.Reply:
        return await self._unary(self._stub.Predict, options, None)

    async def embedding(self, options: pb.PredictOptions) -> pb.EmbeddingResult:
        return await self._unary(self._stub.Embedding, options, None)

    async def tokenize(self, options: pb.PredictOptions) -> pb.TokenizationResponse:
        return await self._unary(self._stub.TokenizeString, options, PROBE_TIMEOUT * 5)

    async def predict_stream(self, options: pb.PredictOptions) -> AsyncIterator[pb.Reply]:
        """Yield replies as the backend produces them; leaving early cancels the generation."""
        call = self._stub.PredictStream(options)
        try:
            while True:
                try:
                    reply = await trio.to_thread.run_sync(
                        _next_reply, call, abandon_on_cancel=True, limiter=self._threads
                    )
                except grpc.RpcError as exc:
                    raise map_rpc_error(exc) from None
                if reply is None:
                    return
                yield reply
        finally:
            call.cancel()
