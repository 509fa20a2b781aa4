"""Logging: structlog everywhere, readable console lines or JSON lines.

The format is chosen once per process (``--log-format`` or ``LOCALP2P_LOG_FORMAT``)
and handed to child processes through that variable, so a backend's or rpc-server's
lines look like their parent's. Everything goes to stderr; stdout is left to the
few lines a user is meant to copy (a token, a ready line).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import structlog

LOG_FORMAT_ENV = "LOCALP2P_LOG_FORMAT"
LOG_LEVEL_ENV = "LOCALP2P_LOG_LEVEL"
FORMATS = ("console", "json")
#: Loggers (and their children) whose repeated lines are rate-limited: py-libp2p
#: logs some lines per message received (e.g. the DHT's "invalid-signed-record").
RATE_LIMITED_LOGGERS = ("libp2p",)
#: Seconds a library line (see :class:`RepeatLimitFilter`) is not repeated for;
#: the same as the project's own refusal logs.
LIBRARY_REPEAT_INTERVAL = 60.0
#: Distinct library lines :class:`RepeatLimitFilter` remembers; the least recent
#: are forgotten, so lines that differ every time cannot grow memory without bound.
LIBRARY_REPEAT_TRACK_MAX = 1024
#: Characters of a masked line used as its key (the rest of a long line adds nothing).
_REPEAT_KEY_CHARS = 240
#: Every word that contains a digit: peer ids, addresses, ports, counts, stream ids.
_VARIABLE_WORD = re.compile(r"\S*\d\S*")


def configure_logging(fmt: str | None = None, level: str | None = None, process: str | None = None) -> None:
    """Set up structlog for this process (idempotent) and export the choice to children."""
    fmt = fmt or os.environ.get(LOG_FORMAT_ENV) or "console"
    if fmt not in FORMATS:
        fmt = "console"
    level_name = (level or os.environ.get(LOG_LEVEL_ENV) or "info").upper()
    os.environ[LOG_FORMAT_ENV] = fmt
    os.environ[LOG_LEVEL_ENV] = level_name.lower()
    numeric = getattr(logging, level_name, logging.INFO)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso" if fmt == "json" else "%H:%M:%S", utc=fmt == "json"),
    ]
    if process:
        processors.append(_add_process(process))
    foreign_pre_chain = [structlog.stdlib.add_logger_name, *processors]  # for standard-library records
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (py-libp2p, hypercorn, zeroconf) log through the standard library; in JSON
    # mode their lines are JSON too, so every stderr line of every process parses.
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(),
                ],
                foreign_pre_chain=foreign_pre_chain,
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.addFilter(RepeatLimitFilter())
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler])


class RepeatLimitFilter(logging.Filter):
    """Lets each distinct library log line through at most once per ``interval`` seconds.

    For stdlib handlers (libraries log through :mod:`logging`; our structlog lines
    never pass here). Owns a bounded map from a line's key - logger name and
    message with every word containing a digit masked, so lines that differ only
    in a peer id, address or count are one line - to when it was last let through
    and how many copies were dropped since; beyond ``track_max`` keys the least
    recently seen are forgotten. A line let through after drops ends with the
    count. Only INFO and above of loggers under ``prefixes`` are limited. Never
    raises: a record whose message cannot be built passes untouched.
    """

    def __init__(
        self,
        interval: float = LIBRARY_REPEAT_INTERVAL,
        prefixes: tuple[str, ...] = RATE_LIMITED_LOGGERS,
        track_max: int = LIBRARY_REPEAT_TRACK_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.interval = interval
        self.prefixes = prefixes
        self.track_max = track_max
        self.clock = clock
        #: key -> [last time let through, copies dropped since]
        self._seen: OrderedDict[tuple[str, str], list[float]] = OrderedDict()

    def _limited(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return False
        name = record.name
        return any(name == p or name.startswith(p + ".") for p in self.prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._limited(record):
            return True
        try:
            message = record.getMessage()
        except Exception:
            return True
        key = (record.name, _VARIABLE_WORD.sub("#", message)[:_REPEAT_KEY_CHARS])
        now = self.clock()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            self._seen.move_to_end(key)
            return False
        dropped = int(entry[1]) if entry is not None else 0
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > self.track_max:
            self._seen.popitem(last=False)
        if dropped:
            record.msg = "%s [%d more like this suppressed]"
            record.args = (message, dropped)
        return True


def _add_process(name: str) -> Any:
    def add(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("proc", name)
        return event

    return add


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name) if name else structlog.get_logger()


def quiet_libp2p_logging() -> None:
    """Call after importing libp2p (its import resets its logger).

    py-libp2p warns about every peer that hangs up mid-DHT-query, which is normal
    churn; keep its errors, routed through our handler (where
    :class:`RepeatLimitFilter` drops repeats). Levels py-libp2p modules set on
    their own loggers are cleared so they inherit this one: the auto-connector's
    logger is set to INFO and would log every connection-manager cycle.
    """
    logger = logging.getLogger("libp2p")
    debug = os.environ.get(LOG_LEVEL_ENV, "info") == "debug"
    logger.setLevel(logging.DEBUG if debug else logging.ERROR)
    logger.propagate = True
    for name, child in list(logging.Logger.manager.loggerDict.items()):
        # propagate=False: configured through py-libp2p's LIBP2P_DEBUG; left as asked.
        if name.startswith("libp2p.") and isinstance(child, logging.Logger) and child.propagate:
            child.setLevel(logging.NOTSET)
