"""Every change localp2p makes to py-libp2p's own code, for the one py-libp2p it was written for.

Nothing here runs at import time. :func:`install` puts the process-wide patches in
(``open_node`` calls it first, on every node start; it is idempotent) after checking
that the installed py-libp2p is :data:`LIBP2P_VERSION`; :func:`patch_host` applies
the per-host ones to a host built by ``new_host`` before it runs. Each module says
which upstream behaviour it fixes (with its notes/libp2p.md section) and what
upstream code it relies on; ``tests/test_libp2p_patches.py`` has a canary for each.

Process-wide (:func:`install`):

* :mod:`.yamux` - ``ReaderNeverBlocksYamux`` (reader deadlock, inbound stream cap,
  reset streams' data freed) swapped into ``muxer_multistream``, and
  ``PY_YAMUX_RELEASE_ON_READ=0`` by default with ``credit_in_batches`` (window updates
  in batches, not after every other small read).
* :mod:`.hotpath` - buffered TCP reads and locks that do not yield when free.
* :mod:`.log_limits` - py-libp2p's "Failed to open stream to peer" error once per
  peer per minute.
* :mod:`.dcutr` - hole-punch dials leave from the bound listen address (and
  ``TunnelSafeDCUtR``, run instead of py-libp2p's DCUtR: a relayed connection is
  closed after an upgrade only once no tunnel uses it).
* :mod:`.relay_circuits` - ``CircuitSafeRelayProtocol``, run instead of py-libp2p's
  ``CircuitV2Protocol``: each relayed circuit closes its own streams when it ends, not
  those of the newest circuit to the same peer (checked here, used by ``p2p/relay.py``).

Per host (:func:`patch_host`):

* :mod:`.connmgr` - the auto-connector stays off unless asked for.
* :mod:`.identify` - identify/push bounded and quiet about bad peers.

Not here: :func:`localp2p.logs.quiet_libp2p_logging` (log levels only) and the
wrappers ``open_node`` puts around py-libp2p's public API (handlers, shutdown,
listen checks), which change no py-libp2p code.
"""

from __future__ import annotations

import importlib.metadata

from libp2p.abc import IHost

from localp2p.errors import StartupError

from . import connmgr, dcutr, hotpath, identify, log_limits, relay_circuits, yamux

__all__ = ["LIBP2P_DISTRIBUTION", "LIBP2P_VERSION", "install", "installed_version", "patch_host"]

#: The py-libp2p release every patch here was written for and checked against.
LIBP2P_VERSION = "0.8.1"
#: py-libp2p's distribution name (what ``pip`` and ``importlib.metadata`` call it).
LIBP2P_DISTRIBUTION = "libp2p"

_installed = False


def installed_version() -> str | None:
    """The installed py-libp2p version, or None if its package metadata cannot be found."""
    try:
        return importlib.metadata.version(LIBP2P_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def install() -> None:
    """Check py-libp2p's version, then put every process-wide patch in (once per process).

    Call before building a host (``open_node`` does). Checks the version on every
    call, so a process never runs patches against a py-libp2p they were not written for.

    :raises StartupError: (one line for the user) if the installed py-libp2p is not
        :data:`LIBP2P_VERSION`, or if a patch finds py-libp2p's code not as it expects.
    """
    global _installed  # noqa: PLW0603 - once per process, like the patches themselves
    found = installed_version()
    if found != LIBP2P_VERSION:
        raise StartupError(
            f"py-libp2p {found or 'of unknown version'} is installed, but localp2p's patches to it were written "
            f"for {LIBP2P_VERSION}; install libp2p=={LIBP2P_VERSION} (make install)"
        )
    if _installed:
        return
    try:
        yamux.install()
        hotpath.install()
        log_limits.install()
        dcutr.install()
        relay_circuits.check()
    except (AttributeError, KeyError, TypeError) as exc:
        raise StartupError(f"py-libp2p {found} does not fit localp2p's patches: {exc}") from exc
    _installed = True


def patch_host(host: IHost, *, auto_connect: bool) -> None:
    """Apply the per-host patches to ``host`` (built by ``new_host``, not yet running).

    :param auto_connect: let py-libp2p's auto-connector run (see :mod:`.connmgr`).
    :raises StartupError: if the host is not built as the patches expect.
    """
    try:
        connmgr.tune_connection_manager(host, auto_connect=auto_connect)
        identify.replace_identify_push(host)
    except (AttributeError, KeyError) as exc:
        raise StartupError(f"py-libp2p {LIBP2P_VERSION} host does not fit localp2p's patches: {exc}") from exc
