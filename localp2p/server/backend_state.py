"""What the supervisor knows about its backend: the state it is in and the status record.

The supervisor (localp2p.server.supervisor) is the only writer; ``/api/status``,
``/readyz``, ``/metrics``, the web page and ``localp2p status`` read it. The values of
:class:`BackendState` are what they show: keep them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from localp2p.cpumode import CpuMode
from localp2p.server.load_progress import LoadProgress


class BackendState(enum.StrEnum):
    """The backend's state, as the supervisor's state machine moves it (see BackendSupervisor).

    A ``str``: its value is what ``/api/status`` and ``/readyz`` send.
    """

    #: A backend process is starting (until it answers Health).
    STARTING = "starting"
    #: The model is loading: in a fresh process, or switched in place (then requests may be served around it).
    LOADING = "loading"
    #: Serving requests.
    READY = "ready"
    #: The serving process ended without being asked to (a crash, a lost worker); the next one is on its way.
    RESTARTING = "restarting"
    #: A reload waits for the requests in flight before it stops the process.
    DRAINING = "draining"
    #: After the backend first served: its last FAILED_AFTER_FAILED_STARTS starts (start or load)
    #: failed in a row. The supervisor keeps trying with backoff and the state stays FAILED
    #: through those tries until one serves; requests failing over give up at once.
    FAILED = "failed"


@dataclass
class BackendStatus:
    """What the supervisor knows, for /api/status, /readyz and `localp2p status`."""

    state: BackendState = BackendState.STARTING
    model: str = ""
    pid: int | None = None
    restarts: int = 0
    last_error: str = ""
    rpc_servers: tuple[str, ...] = ()
    devices: list[dict[str, object]] = field(default_factory=list)
    layers_total: int = 0
    layers_local: int = 0
    load_seconds: float = 0.0
    load_progress: LoadProgress = field(default_factory=LoadProgress)
    cpu_mode: CpuMode = CpuMode.DEFAULT
    cpu_mode_reason: str = ""  # why the backend runs in safe mode, when it was switched there
    weight_buffers: dict[str, float] = field(default_factory=dict)  # llama.cpp buffer type -> MiB
