"""Progress of a model load: what ``/api/status`` shows while the backend loads, and the log lines.

The supervisor starts a :class:`LoadProgress` per load and runs :func:`follow_load` beside
the LoadModel call; the backend's Status replies feed it (:meth:`LoadProgress.note_status`).
Once the load is done, :func:`cached_load` judges whether the workers' tensor caches spared
the network (llama.cpp itself does not report cache hits).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from localp2p._proto import backend_pb2 as pb
from localp2p.logs import get_logger

#: The supervisor's logger: these lines are part of its story of a (re)start.
log = get_logger("supervisor")

#: Seconds between Status polls of the backend while it loads a model (progress).
LOAD_POLL = 0.5
#: Seconds between two "loading model" progress lines in the log.
LOAD_LOG_INTERVAL = 2.0
#: A load that sent the workers less than this share of their weights was served by
#: their tensor caches (hash offers and graph set-up still cross; weights do not).
CACHED_LOAD_SHARE = 0.05


@dataclass
class LoadProgress:
    """Progress of the current (or last) model load, from the backend's Status while it loads.

    ``bytes_total`` is the model file's size, standing for its weight data (the
    tensors llama.cpp loads, on the workers and locally), and ``bytes_sent`` the part
    loaded so far: llama.cpp reports progress over all tensors, not per device, so
    these count bytes loaded, of which the workers' share crosses the network.
    ``network_bytes`` counts what really crossed to the workers during this load, where
    the supervisor can see it (p2p: the tunnels' counters, plus the tensors the workers
    fetched from peers and the server before llama.cpp loaded; not their local copies), and ``from_cache`` says, once
    the load is done, whether the workers' tensor caches spared nearly all of their
    share (None where the bytes cannot be seen: static mode, or no layer on a worker).
    llama.cpp itself does not report cache hits.
    """

    active: bool = False
    fraction: float = 0.0
    bytes_sent: int = 0
    bytes_total: int = 0
    started: float = 0.0  # time.monotonic()
    seconds: float = 0.0
    from_cache: bool | None = None
    network_bytes: int | None = None
    weights_since: float | None = None  # seconds after ``started`` when llama.cpp began loading weights
    #: Per worker name: how its tensor cache was filled before llama.cpp loaded (bytes
    #: ``total``, ``cached``, ``local``, ``peers``, ``server``, ``missing`` ...; see
    #: localp2p.server.weight_plan). Empty when no plan ran (static mode, no index).
    weights: dict[str, dict[str, Any]] = field(default_factory=dict)

    def fetched_bytes(self) -> int:
        """Weight bytes the workers fetched before llama.cpp loaded (from peers and the server): network too."""
        return sum(int(w.get("peers") or 0) + int(w.get("server") or 0) for w in self.weights.values())

    @property
    def rate(self) -> float | None:
        """Bytes per second since the weights began to load (probing and parsing before that excluded)."""
        elapsed = self.seconds - (self.weights_since or 0.0)
        return self.bytes_sent / elapsed if elapsed > 0 and self.bytes_sent else None

    @property
    def eta(self) -> float | None:
        """Seconds left (0 once done, None while unknown: no rate yet, or a load that stopped short)."""
        if not self.active:
            return 0.0 if self.fraction >= 1.0 else None
        rate = self.rate
        return max(0.0, (self.bytes_total - self.bytes_sent) / rate) if rate else None

    def as_dict(self) -> dict[str, object]:
        """``load_progress`` of ``/api/status`` (field names are read by the page and the CLI)."""
        rate, eta = self.rate, self.eta
        return {
            "active": self.active,
            "fraction": round(self.fraction, 4),
            "bytes_sent": self.bytes_sent,
            "bytes_total": self.bytes_total,
            "rate_bytes_per_s": round(rate) if rate else None,
            "eta_s": None if eta is None else round(eta, 1),
            "from_cache": self.from_cache,
            "network_bytes": self.network_bytes,
            "weights": {name: dict(entry) for name, entry in self.weights.items()},
        }

    def note_status(self, reply: pb.StatusResponse) -> None:
        """Take the backend's load progress from a Status reply (of the load running now, or of the last one)."""
        if reply.load_bytes_total:
            self.bytes_total = reply.load_bytes_total
        if self.active and reply.loading:
            if self.weights_since is None:
                self.weights_since = time.monotonic() - self.started
            self.fraction = max(self.fraction, min(1.0, reply.load_fraction))
        self.bytes_sent = int(self.fraction * self.bytes_total)


def cached_load(progress: LoadProgress, layers_total: int, layers_local: int) -> bool | None:
    """Whether the workers' share of the weights came from their tensor caches.

    None when it cannot be told: the bytes that crossed are unknown, or no layer is on a worker.
    """
    on_workers = layers_total - layers_local
    if progress.network_bytes is None or on_workers <= 0 or not layers_total:
        return None
    share = progress.bytes_total * on_workers / layers_total
    return progress.network_bytes < CACHED_LOAD_SHARE * share


def log_progress(name: str, progress: LoadProgress, event: str) -> None:
    """One log line about the load of model ``name``: ``event`` with percent, MiB, rate, ETA."""
    rate, eta = progress.rate, progress.eta
    log.info(
        event,
        model=name,
        percent=round(progress.fraction * 100, 1),
        mib=f"{progress.bytes_sent / 2**20:.1f}/{progress.bytes_total / 2**20:.1f}",
        mib_per_s=round(rate / 2**20, 1) if rate else None,
        eta_s=round(eta, 1) if eta is not None else None,
        seconds=round(progress.seconds, 2),
        **({} if progress.network_bytes is None else {"network_mib": round(progress.network_bytes / 2**20, 1)}),
        **({} if progress.from_cache is None else {"from_cache": progress.from_cache}),
    )


async def follow_load(name: str, progress: LoadProgress, refresh: Callable[[], Awaitable[object]]) -> None:
    """Poll the loading backend (``refresh``: a Status call that feeds ``progress``) every
    LOAD_POLL s; log a line every LOAD_LOG_INTERVAL s.

    Runs until cancelled (when LoadModel returns). ``refresh`` must not raise for a
    Status call that fails: the load itself reports the real error.
    """
    logged = time.monotonic()
    while True:
        await trio.sleep(LOAD_POLL)
        await refresh()
        progress.seconds = time.monotonic() - progress.started
        if time.monotonic() - logged >= LOAD_LOG_INTERVAL:
            logged = time.monotonic()
            log_progress(name, progress, "loading model")
