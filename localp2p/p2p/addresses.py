"""Multiaddr helpers: the one place that knows how localp2p reads and filters addresses.

Used by :mod:`localp2p.p2p.node` (what a host listens on and advertises) and by
discovery (what goes into mDNS TXT records and DHT candidates). Everything here is
pure: no I/O except :func:`expand_wildcard`, which asks psutil for the interfaces.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

from libp2p.utils.address_validation import get_available_interfaces
from multiaddr import Multiaddr

__all__ = [
    "advertisable_addrs",
    "expand_addrs",
    "expand_wildcard",
    "ip_of",
    "is_loopback",
    "is_tcp",
    "strip_p2p",
]

Family = Literal["ip4", "ip6"]

#: The IP protocols a localp2p multiaddr may carry, in the order :func:`ip_of` looks for them.
FAMILIES: tuple[Family, ...] = ("ip4", "ip6")
#: The "any interface" addresses: bound to, never dialable.
WILDCARDS: dict[Family, str] = {"ip4": "0.0.0.0", "ip6": "::"}


def strip_p2p(addr: Multiaddr) -> Multiaddr:
    """Return ``addr`` without a trailing ``/p2p/<peer id>`` component.

    A relayed address keeps its relay: ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>``
    becomes ``<relay addr>/p2p/<relay>/p2p-circuit`` (cutting at the first ``/p2p``, as for
    a plain address, would leave the relay's own address, dialed as if it were the peer's).
    """
    text = str(addr)
    if "/p2p-circuit" in text:
        return Multiaddr(text.split("/p2p-circuit", 1)[0] + "/p2p-circuit")
    try:
        value = addr.value_for_protocol("p2p")
    except Exception:
        value = None
    if value:
        return addr.decapsulate(Multiaddr(f"/p2p/{value}"))
    return addr


def is_tcp(addr: Multiaddr) -> bool:
    """True if ``addr`` has a ``/tcp`` component (the only transport localp2p uses)."""
    return "tcp" in [p.name for p in addr.protocols()]


def ip_of(addr: Multiaddr) -> tuple[Family | None, str | None]:
    """``(family, ip)`` of a multiaddr: family is ``"ip4"``/``"ip6"``, or ``(None, None)`` without an IP."""
    for family in FAMILIES:
        try:
            return family, addr.value_for_protocol(family)
        except Exception:
            continue
    return None, None


def is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8 and ``::1``."""
    return ip.startswith("127.") or ip == "::1"


def expand_wildcard(addr: Multiaddr) -> list[Multiaddr]:
    """Expand a bound ``/ip4/0.0.0.0/tcp/N`` (or ``/ip6/::/tcp/N``) address into concrete ones.

    Uses ``libp2p.utils.address_validation.get_available_interfaces`` (psutil
    based, includes loopback; ~0.3 ms a call). Non-wildcard addresses, and a
    wildcard whose interfaces cannot be listed, are returned unchanged.
    """
    if not is_tcp(addr):
        return [addr]
    family, ip = ip_of(addr)
    if family is None or ip != WILDCARDS[family]:
        return [addr]
    port = int(addr.value_for_protocol("tcp"))
    try:
        expanded = [a for a in get_available_interfaces(port, "tcp") if a.protocols()[0].name == family]
    except Exception:  # pragma: no cover - defensive, psutil problems
        expanded = []
    return expanded or [addr]


def expand_addrs(addrs: Sequence[Multiaddr]) -> list[Multiaddr]:
    """Expand wildcard addresses (:func:`expand_wildcard`) and de-duplicate, keeping order."""
    seen: dict[str, Multiaddr] = {}
    for addr in addrs:
        for concrete in expand_wildcard(addr):
            seen.setdefault(str(concrete), concrete)
    return list(seen.values())


def advertisable_addrs(addrs: Iterable[Multiaddr]) -> list[Multiaddr]:
    """The subset of ``addrs`` worth announcing to other hosts.

    Drops wildcards (``0.0.0.0``, ``::``), IPv6 link-local addresses (not
    dialable without a zone) and non-TCP addresses, strips ``/p2p``, and drops
    loopback addresses *unless nothing else is left* (a loopback-only host,
    as in tests, still announces ``127.0.0.1``). Order is kept, duplicates
    removed.
    """
    kept: dict[str, Multiaddr] = {}
    loopback: dict[str, Multiaddr] = {}
    for raw in addrs:
        addr = strip_p2p(raw)
        if not is_tcp(addr):
            continue
        family, ip = ip_of(addr)
        if family is None or ip is None:
            continue
        if ip in WILDCARDS.values() or ip.lower().startswith("fe80:"):
            continue
        target = loopback if is_loopback(ip) else kept
        target.setdefault(str(addr), addr)
    return list((kept or loopback).values())
