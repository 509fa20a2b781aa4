"""Logging: structlog everywhere, readable console lines or JSON lines.

The format is chosen once per process (``--log-format`` or ``LOCALP2P_LOG_FORMAT``)
and handed to child processes through that variable, so a backend's or rpc-server's
lines look like their parent's. Everything goes to stderr; stdout is left to the
few lines a user is meant to copy (a token, a ready line).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

LOG_FORMAT_ENV = "LOCALP2P_LOG_FORMAT"
LOG_LEVEL_ENV = "LOCALP2P_LOG_LEVEL"
FORMATS = ("console", "json")


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
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler])



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
    churn; keep its errors, routed through our handler.
    """
    logger = logging.getLogger("libp2p")
    debug = os.environ.get(LOG_LEVEL_ENV, "info") == "debug"
    logger.setLevel(logging.DEBUG if debug else logging.ERROR)
    logger.propagate = True
