"""Request facts and Prometheus metrics: one home for what each HTTP request did.

Every HTTP request gets a :class:`RequestRecord` (made by the ASGI middleware in
``localp2p.api.app``); the OpenAI routes fill in the model, the first token and the
token counts, and the middleware finishes it with the response status. A finished
record feeds both the Prometheus series of :class:`Metrics` and the list of recent
requests that ``/api/status`` shows, so the two never disagree.

Facts owned elsewhere (the worker set's tunnel counters, the supervisor's restarts,
readiness and model-load time) are not copied here: :class:`_LiveCollector` reads them
at scrape time. Each app has its own :class:`prometheus_client.CollectorRegistry`
(tests run several apps in one process; the global registry would clash).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Media type of the Prometheus text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Recent requests kept for ``/api/status`` (the page and `localp2p status` show them).
RECENT_REQUESTS = 20
#: TTFT spans a warm 135M model on one box (tens of ms) to a cold model over a slow link (minutes).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Per-token latency: ~1 ms for a tiny local model to ~1 s for a big model over the internet.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Endpoint label of a request no route matched (keeps the label set bounded).
UNMATCHED = "unmatched"


@dataclass
class RequestRecord:
    """What one HTTP request did. Times are ``time.monotonic()`` readings.

    The middleware creates it (``id``, ``endpoint``, ``started``) and calls
    :meth:`Metrics.finish`; routes call :meth:`describe` and :meth:`observe` (each
    backend reply). Every method is cheap and never raises.
    """

    id: str
    endpoint: str
    started: float
    model: str | None = None
    stream: bool = False
    first_token_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: int | None = None
    ended: float | None = None
    ended_wall: float | None = None
    inference: bool = False

    def describe(self, model: str, stream: bool = False) -> None:
        """An inference request for ``model``: it will be listed among the recent requests."""
        self.model, self.stream, self.inference = model, bool(stream), True

    def first_token(self) -> None:
        """The first generated text reached the client (idempotent: only the first call counts)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def usage(self, reply: Any) -> None:
        """Token counts of a final backend ``Reply`` (or an ``EmbeddingResult``).

        For an answer sent whole (no stream) the first token's time is estimated from
        the backend's own timing: arrival of the reply minus its generation time.
        """
        self.prompt_tokens = int(getattr(reply, "prompt_tokens", 0))
        self.completion_tokens = int(getattr(reply, "tokens", 0))
        if self.first_token_at is None and self.completion_tokens:
            generation = float(getattr(reply, "timing_token_generation", 0.0))
            self.first_token_at = max(self.started, time.monotonic() - generation)

    def observe(self, reply: Any) -> None:
        """One message from the backend: a streamed text chunk marks the first token; a
        final ``Reply`` (with ``finish_reason``) or an ``EmbeddingResult`` gives the counts."""
        if getattr(reply, "finish_reason", None) or not hasattr(reply, "finish_reason"):
            self.usage(reply)
        elif reply.message:
            self.first_token()

    # -- derived facts (valid once finished) ------------------------------------------

    @property
    def duration(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def time_per_output_token(self) -> float | None:
        """Seconds between output tokens after the first; None with fewer than two tokens."""
        if self.first_token_at is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return max(0.0, (self.ended or time.monotonic()) - self.first_token_at) / (self.completion_tokens - 1)

    def as_dict(self) -> dict[str, Any]:
        """The entry of ``recent_requests`` in ``/api/status`` (field names are read by the page and the CLI)."""
        per_token = self.time_per_output_token
        return {
            "id": self.id,
            "endpoint": self.endpoint,
            "model": self.model,
            "status": self.status,
            "stream": self.stream,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": None if self.ttft is None else round(self.ttft * 1000, 1),
            "duration_ms": round(self.duration * 1000, 1),
            "tokens_per_second": round(1.0 / per_token, 2) if per_token else None,
            "time": self.ended_wall,
        }


class Metrics:
    """The Prometheus registry of one app and its recent inference requests."""

    def __init__(self, app_state: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "localp2p_requests", "HTTP requests by route and status", ["endpoint", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("localp2p_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.completion_tokens = Counter("localp2p_completion_tokens", "Completion tokens generated", registry=self.registry)
        self.ttft = Histogram(
            "localp2p_time_to_first_token_seconds",
            "Seconds from request arrival to the first generated token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "localp2p_time_per_output_token_seconds",
            "Seconds per generated token after the first",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(app_state))
        self._recent: collections.deque[RequestRecord] = collections.deque(maxlen=RECENT_REQUESTS)

    def start(self, request_id: str, endpoint: str) -> RequestRecord:
        return RequestRecord(id=request_id, endpoint=endpoint, started=time.monotonic())

    def finish(self, record: RequestRecord, status: int) -> None:
        """Close ``record`` with the HTTP status and count it (once)."""
        if record.ended is not None:
            return
        record.ended, record.ended_wall = time.monotonic(), round(time.time(), 3)
        record.status = status
        self.requests.labels(endpoint=record.endpoint, status=str(status)).inc()
        if record.prompt_tokens:
            self.prompt_tokens.inc(record.prompt_tokens)
        if record.completion_tokens:
            self.completion_tokens.inc(record.completion_tokens)
        if record.ttft is not None:
            self.ttft.observe(record.ttft)
        if record.time_per_output_token is not None:
            self.tpot.observe(record.time_per_output_token)
        if record.inference:
            self._recent.appendleft(record)

    def recent(self) -> list[dict[str, Any]]:
        """The last RECENT_REQUESTS inference requests, newest first."""
        return [record.as_dict() for record in self._recent]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Series read at scrape time from their owners: the worker set and the supervisor."""

    def __init__(self, app_state: Any) -> None:
        self.state = app_state

    def collect(self) -> Iterator[Metric]:
        supervisor = getattr(self.state, "supervisor", None)
        workers = getattr(self.state, "workers", None)
        status = supervisor.status if supervisor is not None else None

        live = GaugeMetricFamily(
            "localp2p_workers_live",
            "Workers serving layers: online p2p workers, or in static mode the rpc-servers the backend uses",
        )
        if workers is not None:
            live.add_metric([], len(workers.live()))
        else:
            live.add_metric([], sum(1 for d in (status.devices if status else []) if d.get("used")))
        yield live

        sent = CounterMetricFamily("localp2p_tunnel_bytes_sent", "Bytes sent to a worker through its tunnel", labels=["peer"])
        received = CounterMetricFamily(
            "localp2p_tunnel_bytes_received", "Bytes received from a worker through its tunnel", labels=["peer"]
        )
        for worker in workers.all() if workers is not None else []:
            sent.add_metric([worker.peer_id], worker.stats.bytes_sent)
            received.add_metric([worker.peer_id], worker.stats.bytes_received)
        yield sent
        yield received

        if status is None or supervisor is None:
            return
        restarts = CounterMetricFamily("localp2p_backend_restarts", "Backend process restarts (crashes and reloads)")
        restarts.add_metric([], status.restarts)
        yield restarts
        ready = GaugeMetricFamily("localp2p_backend_ready", "1 when the backend serves requests, else 0")
        ready.add_metric([], 1.0 if supervisor.ready else 0.0)
        yield ready
        load = GaugeMetricFamily("localp2p_model_load_seconds", "Seconds the last model load took")
        load.add_metric([], status.load_seconds)
        yield load
        progress = getattr(status, "load_progress", None)
        if progress is not None:
            fraction = GaugeMetricFamily("localp2p_model_load_progress", "Fraction of the current (or last) model load done")
            fraction.add_metric([], progress.fraction)
            yield fraction
        in_flight = GaugeMetricFamily("localp2p_requests_admitted", "Requests waiting for or using the backend")
        in_flight.add_metric([], supervisor.admitted)
        yield in_flight
