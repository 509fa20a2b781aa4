"""mDNS discovery on the LAN (python-zeroconf): announce this node, report peers announcing the same service.

See :mod:`localp2p.p2p.discovery` for what a candidate promises. mDNS can tell
when a peer leaves: a goodbye packet (TTL 0, sent when :func:`run_mdns` of that
peer stops cleanly) or the expiry of its cached records (:data:`MDNS_RECORD_TTL`
after its last announcement, e.g. after a crash or a partition). It is then
reported as a ``Candidate`` with ``gone=True``, ``source="mdns"`` and empty
``addrs``; a gone event is only emitted for a peer previously reported by the
same :func:`run_mdns`.

Threads
    python-zeroconf runs its own asyncio loop in a thread, and the threaded
    ``ServiceBrowser`` calls our handler on yet another thread. The handler
    only hands ``(name, state change)`` to trio with
    ``TrioToken.run_sync_soon`` (non-blocking, thread-safe) into a bounded
    memory channel; everything else (resolving, parsing, sending candidates)
    happens in a trio task. Zeroconf calls that block (constructor,
    ``register_service``, ``get_service_info``, ``close``) run in
    ``trio.to_thread``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr
from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    InterfacesType,
    IPVersion,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf import service_type_name as _zc_service_type_name

from localp2p.logs import get_logger

from ..addresses import advertisable_addrs, ip_of, is_tcp, strip_p2p
from ..node import P2PNode
from .candidate import Candidate

__all__ = [
    "MDNS_REANNOUNCE_INTERVAL",
    "MDNS_RECORD_TTL",
    "run_mdns",
]

_log: Any = get_logger(__name__)

#: TTL (s) of our mDNS records (PTR, SRV, TXT, A). zeroconf's defaults are
#: 75 min for PTR/TXT: a peer that crashed (no goodbye) would linger that
#: long in everyone's cache. 2 min bounds that, at the cost of one refresh
#: query per peer around 75 % of the TTL.
MDNS_RECORD_TTL = 120

#: Seconds between our unsolicited re-announcements. After its four start-up
#: queries zeroconf's browser only queries to refresh records it already has,
#: so a peer that missed our first announcements (a partition that healed, a
#: cache entry that expired) would otherwise not see us again for a long time.
MDNS_REANNOUNCE_INTERVAL = 30.0

#: How long (ms) one resolution of an announced service may wait for its
#: SRV/TXT/A records when they were not in the announcement packet already.
MDNS_RESOLVE_TIMEOUT_MS = 3000

#: Resolutions (threads) in flight at once; each may wait up to
#: MDNS_RESOLVE_TIMEOUT_MS for a peer that announced but does not answer.
MDNS_MAX_CONCURRENT_RESOLVES = 8

#: Buffer for zeroconf-thread -> trio events. The zeroconf thread must never
#: block on us; when this is full (a flood of announcements) events are
#: dropped with a warning (a later re-announcement brings the peer back).
MDNS_EVENT_BUFFER = 256

#: Upper bound (s) for the shielded shutdown (goodbye packets, threads).
MDNS_CLOSE_TIMEOUT = 5.0

#: TXT budget. RFC 6763 §6.1/6.2: each string <= 255 bytes and the record
#: should stay well below the 1300 bytes that fit in one packet together
#: with PTR/SRV/A; we stop adding addresses when this total is reached.
MDNS_TXT_MAX_BYTES = 900
#: At most this many multiaddrs are put in TXT (a host with many interfaces
#: does not need to advertise all of them for one to work).
MDNS_MAX_TXT_ADDRS = 16
#: ``name`` is truncated to this many UTF-8 bytes in TXT.
MDNS_MAX_NAME_BYTES = 64
#: Version of our TXT layout (``v`` key), so a future layout can be told apart.
MDNS_TXT_VERSION = "1"

#: mDNS over IPv4 only: IPv6 multicast needs per-interface scope ids and
#: link-local addresses that are not ready until DAD finishes, and gives us
#: nothing on a LAN that IPv4 does not. IPv6 *multiaddrs* are still
#: advertised in TXT when the node listens on IPv6.
MDNS_IP_VERSION = IPVersion.V4Only
#: Announce without RFC 6762 name probing: instance names are peer ids (unique), and
#: probing would delay every worker's discovery by ~1.7 s.
MDNS_SKIP_PROBE = True


def _truncate_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, never mid-character."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def _txt_properties(
    peer_id: ID, role: str, name: str, addrs: Sequence[Multiaddr]
) -> dict[str, str]:
    """TXT key/values: ``v``, ``id``, ``role``, ``name`` and ``a0``..``aN``.

    Stays under :data:`MDNS_TXT_MAX_BYTES` in total and 255 bytes per string
    (an address that does not fit is skipped).
    """
    props: dict[str, str] = {
        "v": MDNS_TXT_VERSION,
        "id": str(peer_id),
        "role": _truncate_utf8(role, 32),
        "name": _truncate_utf8(name, MDNS_MAX_NAME_BYTES),
    }

    def size(p: dict[str, str]) -> int:  # 1 length byte + "key=value"
        return sum(1 + len(k.encode()) + 1 + len(v.encode()) for k, v in p.items())

    total = size(props)
    index = 0
    for addr in addrs:
        if index >= MDNS_MAX_TXT_ADDRS:
            break
        key, value = f"a{index}", str(addr)
        entry = 1 + len(key) + 1 + len(value.encode())
        if entry > 256 or total + entry > MDNS_TXT_MAX_BYTES:
            continue
        props[key] = value
        total += entry
        index += 1
    return props


def _build_service_info(
    node: P2PNode, service_type: str, role: str, name: str
) -> ServiceInfo:
    """Our announcement: instance name = peer id, TXT as in :func:`_txt_properties`.

    SRV/A records carry the first advertised TCP port and the advertised IPv4
    addresses; TXT carries full multiaddrs (what consumers actually dial).
    """
    peer_id = node.peer_id
    addrs = advertisable_addrs(node.listen_addrs)
    port = 0
    ipv4: list[str] = []
    for addr in addrs:
        family, ip = ip_of(addr)
        if port == 0:
            port = int(addr.value_for_protocol("tcp"))
        if family == "ip4" and ip is not None and ip not in ipv4:
            ipv4.append(ip)
    return ServiceInfo(
        service_type,
        f"{peer_id}.{service_type}",
        port=port,
        properties=_txt_properties(peer_id, role, name, addrs),
        # Unique per node (not the machine's hostname): two nodes on one
        # machine must not fight over the host name or send goodbyes for
        # each other's address records.
        server=f"lp2p-{peer_id}.local.",
        parsed_addresses=ipv4,
        host_ttl=MDNS_RECORD_TTL,
        other_ttl=MDNS_RECORD_TTL,
    )


def _instance_label(name: str, service_type: str) -> str:
    """``"<label>"`` of ``"<label>.<service_type>"`` (case-insensitive match)."""
    if name.lower().endswith("." + service_type.lower()):
        return name[: -len(service_type) - 1]
    return name


def _decode_txt(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", errors="replace")


def _candidate_from_info(info: ServiceInfo, service_type: str) -> Candidate:
    """Parse a resolved announcement into a :class:`Candidate`.

    :raises ValueError: if the announcement is not one of ours or is
        malformed (missing/invalid ``id``, ``id`` not matching the instance
        name, no usable address).
    """
    props = {
        (k.decode("utf-8", errors="replace") if isinstance(k, bytes) else str(k)): v
        for k, v in (info.properties or {}).items()
    }
    raw_id = _decode_txt(props.get("id"))
    if not raw_id:
        raise ValueError("TXT has no id")
    peer_id = ID.from_base58(raw_id)  # ValueError on garbage
    label = _instance_label(info.name, service_type)
    # DNS names compare case-insensitively, base58 does not: check loosely.
    if label.lower() != raw_id.lower():
        raise ValueError(f"instance name {label!r} does not match TXT id {raw_id!r}")
    addrs: dict[str, Multiaddr] = {}
    for key in sorted(
        (k for k in props if k.startswith("a") and k[1:].isdigit()),
        key=lambda k: int(k[1:]),
    ):
        value = _decode_txt(props[key])
        if not value:
            continue
        try:
            addr = strip_p2p(Multiaddr(value))
        except Exception:
            _log.debug("mdns: bad multiaddr in TXT", peer_id=raw_id, value=value)
            continue
        if is_tcp(addr):
            addrs.setdefault(str(addr), addr)
    if not addrs and info.port:
        # No (valid) multiaddrs in TXT: fall back to the A records + SRV port.
        for ip in info.parsed_addresses(IPVersion.V4Only):
            addr = Multiaddr(f"/ip4/{ip}/tcp/{info.port}")
            addrs.setdefault(str(addr), addr)
    if not addrs:
        raise ValueError("announcement has no usable address")
    return Candidate(
        peer_id=peer_id,
        addrs=tuple(addrs.values()),
        source="mdns",
        role=_decode_txt(props.get("role")) or None,
        name=_decode_txt(props.get("name")),
    )


def _resolve_blocking(zc: Zeroconf, service_type: str, name: str) -> ServiceInfo | None:
    """Resolve SRV/TXT/A for ``name`` (cache first, then query). Blocks."""
    info = ServiceInfo(service_type, name)
    if info.load_from_cache(zc):
        return info
    if info.request(zc, MDNS_RESOLVE_TIMEOUT_MS):
        return info
    return None


def _close_blocking(zc: Zeroconf, browser: ServiceBrowser | None) -> None:
    """Stop the browser thread, send goodbyes, stop zeroconf's threads. Blocks."""
    try:
        if browser is not None:
            browser.cancel()
    finally:
        zc.close()  # unregister_all_services(): goodbye (TTL 0) x3


@dataclass
class _MdnsState:
    """Per-:func:`run_mdns` bookkeeping (owned by its trio tasks only)."""

    #: lower-cased service instance name -> the candidate we reported for it
    reported: dict[str, Candidate] = field(default_factory=dict)
    #: lower-cased service instance name -> number of its latest event
    generation: dict[str, int] = field(default_factory=dict)
    registered: bool = False


async def run_mdns(
    node: P2PNode,
    service_type: str,
    *,
    role: str,
    name: str,
    send_channel: trio.MemorySendChannel[Candidate],
    interfaces: InterfacesType = InterfaceChoice.All,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Announce ``node`` via mDNS and report peers announcing the same service type.

    Owns one ``Zeroconf`` instance (its sockets on ``interfaces``, IPv4 only,
    its threads) and one ``ServiceBrowser``, for as long as it runs. Our
    service instance is named after our peer id, with TXT ``id``, ``role``,
    ``name`` and ``a0..aN`` (our advertisable listen multiaddrs, see
    :func:`advertisable_addrs`). It is re-announced every
    :data:`MDNS_REANNOUNCE_INTERVAL` seconds (rebuilt, so changed listen
    addresses are picked up).

    Sends a :class:`Candidate` (``source="mdns"``) to ``send_channel`` for
    every added or updated service of ``service_type`` other than our own,
    and a ``gone=True`` candidate when a reported one is removed. The channel
    is not closed here (the caller owns it; several producers may share it).
    If its receiver is closed, this task logs and returns.

    ``task_status.started()`` is called once browsing runs and our service
    is registered (announced at once, no name probing). Runs until cancelled;
    then, shielded and bounded by :data:`MDNS_CLOSE_TIMEOUT`, it sends
    goodbye packets and stops zeroconf.

    Errors after start (a malformed announcement, a failed resolution, a
    failed registration or re-announcement) are logged and survived.

    :param service_type: e.g. ``"_lp2p-1a2b3c4d._tcp.local."``.
    :param role: ``"server"`` or ``"worker"`` (put in TXT).
    :param name: human-readable node name (put in TXT, truncated).
    :param interfaces: zeroconf interface choice (default: all).
    :raises ValueError: ``service_type`` is not a valid mDNS service type
        (before ``started``).
    :raises OSError: zeroconf could not open its sockets (before ``started``).
    """
    try:
        _zc_service_type_name(service_type, strict=True)
    except BadTypeInNameException as exc:
        raise ValueError(f"invalid mDNS service type {service_type!r}: {exc}") from exc

    own_label = str(node.peer_id).lower()
    token = trio.lowlevel.current_trio_token()
    events_send, events_recv = trio.open_memory_channel[tuple[str, ServiceStateChange]](
        MDNS_EVENT_BUFFER
    )

    def deliver(event: tuple[str, ServiceStateChange]) -> None:
        # Runs in the trio thread (via run_sync_soon) - must never raise.
        try:
            events_send.send_nowait(event)
        except trio.WouldBlock:
            _log.warning("mdns: event buffer full, dropping event", service=event[0])
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        except Exception as exc:  # pragma: no cover - defensive
            _log.error("mdns: cannot deliver event", error=repr(exc))

    def on_state_change(
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        # Runs on zeroconf's ServiceBrowser thread: touch no trio object here.
        try:
            token.run_sync_soon(deliver, (name, state_change))
        except trio.RunFinishedError:
            pass

    zc: Zeroconf = await trio.to_thread.run_sync(
        functools.partial(Zeroconf, interfaces=interfaces, ip_version=MDNS_IP_VERSION)
    )
    browser: ServiceBrowser | None = None
    state = _MdnsState()
    try:
        # Browse before registering: finding others need not wait for our
        # announcement.
        browser = await trio.to_thread.run_sync(
            functools.partial(
                ServiceBrowser, zc, service_type, handlers=[on_state_change]
            )
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _mdns_consume_events,
                zc,
                service_type,
                own_label,
                events_recv,
                send_channel,
                state,
                nursery.cancel_scope,
            )
            info = _build_service_info(node, service_type, role, name)
            info = await _mdns_register(zc, info, state)
            _log.info(
                "mdns started",
                service_type=service_type,
                peer_id=str(node.peer_id),
                role=role,
                registered=state.registered,
                addrs=[_decode_txt(v) for k, v in info.properties.items() if k.startswith(b"a")],
            )
            task_status.started()
            nursery.start_soon(
                _mdns_reannounce_loop, zc, node, service_type, role, name, info, state
            )
    finally:
        events_send.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(MDNS_CLOSE_TIMEOUT) as scope:
                try:
                    await trio.to_thread.run_sync(
                        _close_blocking, zc, browser, abandon_on_cancel=True
                    )
                except Exception as exc:
                    _log.warning("mdns: error while closing zeroconf", error=repr(exc))
            if scope.cancelled_caught:
                _log.warning("mdns: zeroconf did not close in time")
        _log.info("mdns stopped", service_type=service_type, peer_id=str(node.peer_id))


async def _mdns_register(zc: Zeroconf, info: ServiceInfo, state: _MdnsState) -> ServiceInfo:
    """Register (first time) or re-announce ``info``; log failures, never raise."""
    try:
        if state.registered:
            await trio.to_thread.run_sync(zc.update_service, info)
        else:
            await trio.to_thread.run_sync(
                # No name probing (~1.7 s): our instance name is our peer id, unique by
                # construction, so announcing at once is safe and makes discovery fast.
                functools.partial(
                    zc.register_service, info, allow_name_change=False, cooperating_responders=MDNS_SKIP_PROBE
                )
            )
            state.registered = True
    except NonUniqueNameException:
        _log.error(
            "mdns: another responder already announces our peer id "
            "(same identity running twice?); will retry",
            name=info.name,
        )
    except Exception as exc:
        _log.warning("mdns: (re)announcement failed; will retry", error=repr(exc))
    return info


async def _mdns_reannounce_loop(
    zc: Zeroconf,
    node: P2PNode,
    service_type: str,
    role: str,
    name: str,
    info: ServiceInfo,
    state: _MdnsState,
) -> None:
    """Every :data:`MDNS_REANNOUNCE_INTERVAL`: rebuild our record and announce it."""
    while True:
        await trio.sleep(MDNS_REANNOUNCE_INTERVAL)
        try:
            new_info = _build_service_info(node, service_type, role, name)
        except Exception as exc:
            _log.warning("mdns: cannot build announcement", error=repr(exc))
            continue
        if new_info.properties != info.properties or new_info.port != info.port:
            _log.info("mdns: our addresses changed; updating announcement")
        info = await _mdns_register(zc, new_info, state)


async def _mdns_consume_events(
    zc: Zeroconf,
    service_type: str,
    own_label: str,
    events: trio.MemoryReceiveChannel[tuple[str, ServiceStateChange]],
    send_channel: trio.MemorySendChannel[Candidate],
    state: _MdnsState,
    cancel_scope: trio.CancelScope,
) -> None:
    """Turn browser events into candidates.

    Removals are handled inline; each add/update is resolved in its own task
    (at most :data:`MDNS_MAX_CONCURRENT_RESOLVES` at a time), so an
    announcement that never resolves cannot hold up the others. Every event
    takes a new generation number for its service name; a resolution whose
    name has seen a newer event since is discarded, so per name the last
    event wins. If the consumer of ``send_channel`` went away, cancels
    ``cancel_scope`` (the whole :func:`run_mdns`).
    """
    limiter = trio.CapacityLimiter(MDNS_MAX_CONCURRENT_RESOLVES)
    counter = 0

    async def send(candidate: Candidate) -> None:
        try:
            await send_channel.send(candidate)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            _log.warning("mdns: candidate receiver closed; stopping mdns")
            cancel_scope.cancel()

    async def resolve(service_name: str, change: ServiceStateChange, generation: int) -> None:
        key = service_name.lower()
        try:
            info = await trio.to_thread.run_sync(
                _resolve_blocking, zc, service_type, service_name,
                abandon_on_cancel=True, limiter=limiter,
            )  # fmt: skip
            if state.generation.get(key) != generation:
                return  # superseded by a newer event for this name
            if info is None:
                _log.debug("mdns: could not resolve service", service=service_name)
                return
            candidate = _candidate_from_info(info, service_type)
        except Exception as exc:
            _log.warning(
                "mdns: ignoring bad announcement",
                service=service_name,
                change=change.name,
                error=repr(exc),
            )
            return
        if state.reported.get(key) == candidate:
            return  # nothing new (e.g. only an A record was refreshed)
        state.reported[key] = candidate
        _log.debug(
            "mdns: candidate",
            peer_id=str(candidate.peer_id),
            role=candidate.role,
            addrs=[str(a) for a in candidate.addrs],
        )
        await send(candidate)

    async with events, trio.open_nursery() as nursery:
        async for service_name, change in events:
            if _instance_label(service_name, service_type).lower() == own_label:
                continue
            key = service_name.lower()
            counter += 1
            state.generation[key] = counter
            if change is not ServiceStateChange.Removed:
                nursery.start_soon(resolve, service_name, change, counter)
                continue
            del state.generation[key]
            previous = state.reported.pop(key, None)
            if previous is None:
                continue
            _log.info("mdns: peer gone", peer_id=str(previous.peer_id))
            await send(
                Candidate(
                    peer_id=previous.peer_id,
                    addrs=(),
                    source="mdns",
                    role=previous.role,
                    name=previous.name,
                    gone=True,
                )
            )
