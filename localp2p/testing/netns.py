"""Real multi-host test topologies with Linux network namespaces.

Independent of the application: it only runs ``ip`` and ``sysctl`` and
starts processes with ``ip netns exec``.

Layout for ``topology(n)``::

    netns lp2p-<tag>-br:   br0 (bridge, no IP, multicast snooping off)
                            ├── v0 ─┐ veth pair
                            ├── v1 ─┼─┐
                            ...     │ │
    netns lp2p-<tag>-0:    eth0 ────┘ │   10.231.<k>.1/24, lo up
    netns lp2p-<tag>-1:    eth0 ──────┘   10.231.<k>.2/24, lo up

Host ``i`` (0-based) gets ``10.231.<k>.<i+1>`` (``.0`` is the network
address). The bridge lives in its own namespace and nothing is connected to
the root namespace, so test traffic cannot leak out, and two topologies (even
with the same ``k``) cannot see each other. IPv6 is disabled in the hosts so
that only the IPv4 addresses above exist (no DAD delays, no link-local
surprises).

Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2. When that is not
available, :func:`topology` calls ``pytest.skip`` with the reason (see
:func:`netns_unavailable_reason`).

:func:`nat_topology` builds the internet-and-two-homes case instead: a bridge for the
"internet" (``100.64.<k>.0/24``, carrier-grade NAT space: py-libp2p counts RFC 1918
addresses as private, and these must look public), public hosts on it, and LANs
behind router namespaces that masquerade with nftables and drop new inbound
connections, as a home router does (:data:`NAT_RULES`)::

    netns ...-br:   br0 (the internet)  ── public hosts 100.64.<k>.1, .2 ...
                        ├── router 0 wan0 100.64.<k>.200 ── nft masquerade ── lan0 10.231.<a>.254
                        │                                     netns ...-l0: br0 ── hosts 10.231.<a>.1 ...
                        └── router 1 wan0 100.64.<k>.201 ── ... 10.231.<b>.254 ...

Usage::

    with topology(2) as topo:
        p = topo.run(0, [sys.executable, "-c", "print('hi')"], stdout=subprocess.PIPE)
        topo.link_down(1)   # unplug host 1's cable
        topo.link_up(1)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

#: 10.231.0.0/16: an RFC 1918 range unlikely to be used by a real LAN or by
#: container/VPN tooling (which favour 10.0-10.100, 172.17+, 192.168).
SUBNET_PREFIX = "10.231"
#: Namespace name prefix, so leftovers are easy to spot (``ip netns list``).
NS_PREFIX = "lp2p-"
#: Seconds a process gets after SIGTERM before SIGKILL at cleanup.
TERM_GRACE = 3.0
#: Seconds any single ``ip`` command may take.
IP_TIMEOUT = 15.0
#: The simulated internet of :func:`nat_topology` (100.64.0.0/10, shared address space).
INTERNET_PREFIX = "100.64"
#: A home router: masquerade what leaves by wan0 (``{random}`` is ``random`` for a NAT
#: that picks a random source port instead of keeping the host's), drop new
#: connections that come in by wan0 (to the router or through it).
NAT_RULES = """
table ip nat {{
  chain postrouting {{ type nat hook postrouting priority 100; oifname "wan0" masquerade {random}; }}
}}
table ip filter {{
  chain input {{ type filter hook input priority 0; iifname "wan0" ct state new drop; }}
  chain forward {{ type filter hook forward priority 0; iifname "wan0" ct state new drop; }}
}}
"""


#: setns(2) flag for a network namespace.
_CLONE_NEWNET = 0x40000000


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no iproute2...)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip <args>``; raise ``RuntimeError`` with stderr on failure if ``check``."""
    proc = subprocess.run(
        ["ip", *args],
        capture_output=True,
        text=True,
        timeout=IP_TIMEOUT,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@functools.cache
def netns_unavailable_reason() -> str | None:
    """``None`` if namespaces, veths and bridges work here, else why not.

    Probes once per process by creating (and deleting) a namespace with a
    bridge in it.
    """
    if os.name != "posix" or not os.path.isdir("/proc/self/ns"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"{NS_PREFIX}probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except Exception as exc:
        return f"'ip netns add' failed: {exc}"
    try:
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "va", "type", "veth", "peer", "name", "vb")
    except Exception as exc:
        return f"cannot create bridge/veth in a namespace: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@functools.cache
def nat_unavailable_reason() -> str | None:
    """``None`` if :func:`nat_topology` can be built here (namespaces and nftables), else why not."""
    reason = netns_unavailable_reason()
    if reason is not None:
        return reason
    if shutil.which("nft") is None and not os.path.exists("/usr/sbin/nft"):
        return "nftables ('nft') is not installed (scripts/install.sh installs it with the dev extras)"
    return None


def require_netns() -> None:
    """``pytest.skip`` (with the reason) unless namespaces are usable."""
    reason = netns_unavailable_reason()
    if reason is not None:
        import pytest  # noqa: PLC0415 - only tests call this; the module also serves bench

        pytest.skip(reason)


@dataclass
class NetHost:
    """One simulated machine."""

    index: int
    #: namespace name (``ip netns exec <ns> ...``)
    ns: str
    #: its IPv4 address on the bridge
    ip: str
    #: interface name inside ``ns``
    ifname: str = "eth0"
    #: the bridge-side end of its veth pair (in the bridge namespace)
    bridge_port: str = ""


@dataclass
class Topology:
    """``n`` namespaces on one bridge. Build with :func:`topology`."""

    tag: str
    subnet: str
    bridge_ns: str
    hosts: list[NetHost] = field(default_factory=list)
    #: Namespaces besides the hosts' and the bridge's (routers, LAN bridges), deleted at close.
    extra_ns: list[str] = field(default_factory=list)
    #: :func:`nat_topology`: each router's WAN side (its ``ip`` is its public address).
    routers: list[NetHost] = field(default_factory=list)
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def run(self, i: int, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside host ``i``'s namespace (``ip netns exec``).

        The process gets its own session (``start_new_session=True`` unless
        given) so cleanup can signal its whole process group. It is killed
        when the topology closes, if still running.
        """
        popen_kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.hosts[i].ns, *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def exec(self, i: int, argv: Sequence[str], **run_kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` in host ``i``'s namespace to completion."""
        run_kwargs.setdefault("timeout", IP_TIMEOUT)
        return subprocess.run(["ip", "netns", "exec", self.hosts[i].ns, *argv], **run_kwargs)  # noqa: PLW1510 - callers choose check

    def link_down(self, i: int) -> None:
        """Unplug host ``i``: its bridge-side veth goes down (its eth0 loses carrier)."""
        _ip("-n", self.bridge_ns, "link", "set", self.hosts[i].bridge_port, "down")

    def link_up(self, i: int) -> None:
        """Plug host ``i`` back in."""
        _ip("-n", self.bridge_ns, "link", "set", self.hosts[i].bridge_port, "up")

    def stop_processes(self) -> None:
        """SIGTERM every started process group, SIGKILL after :data:`TERM_GRACE`."""
        live = [p for p in self._procs if p.poll() is None]
        for proc in live:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=TERM_GRACE)
        for proc in self._procs:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()

    def close(self) -> None:
        """Kill processes, then delete every namespace (and so every link).

        Best effort and idempotent: each step runs even if an earlier one failed.
        """
        with contextlib.suppress(Exception):
            self.stop_processes()
        for ns in [h.ns for h in self.hosts] + self.extra_ns + [self.bridge_ns]:
            _delete_ns(ns)


def _signal_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        proc.send_signal(sig)


def _delete_ns(ns: str) -> None:
    """Kill whatever still runs in ``ns`` (it would keep the namespace alive), delete it."""
    pids = _ip("netns", "pids", ns, check=False)
    for pid in pids.stdout.split() if pids.returncode == 0 else []:
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", ns, check=False)


def _add_bridge(ns: str) -> None:
    """Namespace ``ns`` with bridge br0 up in it."""
    _ip("netns", "add", ns)
    _ip("-n", ns, "link", "set", "lo", "up")
    # mcast_snooping 0: forward all multicast to all ports (mDNS needs it; with
    # snooping on, the bridge may drop 224.0.0.251 until it saw IGMP joins).
    _ip("-n", ns, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0", "stp_state", "0")
    _ip("-n", ns, "link", "set", "br0", "multicast", "on", "up")


def _add_host(host: NetHost, bridge_ns: str, *, new_ns: bool = True) -> None:
    """Create ``host.ns`` (unless it exists) and plug its ``host.ifname`` into ``bridge_ns``'s br0."""
    if new_ns:
        _ip("netns", "add", host.ns)
        _ip("netns", "exec", host.ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", check=False)
        _ip("netns", "exec", host.ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1", check=False)
        _ip("-n", host.ns, "link", "set", "lo", "up")
    # Create the pair directly in the two namespaces: no name ever
    # appears in the root namespace, so nothing can clash there.
    _ip(
        "link", "add", host.ifname, "netns", host.ns, "type", "veth",
        "peer", "name", host.bridge_port, "netns", bridge_ns,
    )  # fmt: skip
    _ip("-n", bridge_ns, "link", "set", host.bridge_port, "master", "br0")
    _ip("-n", bridge_ns, "link", "set", host.bridge_port, "multicast", "on", "up")
    _ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", host.ifname)
    _ip("-n", host.ns, "link", "set", host.ifname, "multicast", "on", "up")


def _setup(topo: Topology, n: int) -> None:
    _add_bridge(topo.bridge_ns)
    for i in range(n):
        host = NetHost(index=i, ns=f"{NS_PREFIX}{topo.tag}-{i}", ip=f"{topo.subnet}.{i + 1}", bridge_port=f"v{i}")
        topo.hosts.append(host)
        _add_host(host, topo.bridge_ns)


#: Bytes a shaped link may send at once above its rate (tbf): enough for 1 Gbit/s at a 4 ms tick.
SHAPE_BURST = "1000kb"
#: Longest a packet waits in a shaped link's queue before it is dropped (tbf).
SHAPE_LATENCY = "50ms"


def shape_links(topo: Topology, rate: str) -> None:
    """Give every host of ``topo`` a NIC of ``rate`` (tc syntax: ``1gbit``), both ways.

    Each host's sending is shaped on its eth0, its receiving on its bridge port (a token
    bucket each): several hosts sending to one share its downlink, as on a switch.
    """
    for host in topo.hosts:
        for ns, dev in ((host.ns, host.ifname), (topo.bridge_ns, host.bridge_port)):
            _tc(ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", SHAPE_BURST, "latency", SHAPE_LATENCY)


def _tc(ns: str, *args: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True, timeout=IP_TIMEOUT)  # noqa: PLW1510
    if done.returncode != 0:
        raise NetnsUnavailable(f"tc {' '.join(args)}: {done.stderr.strip()}")


@contextlib.contextmanager
def topology(n: int, *, subnet_octet: int | None = None, rate: str | None = None) -> Iterator[Topology]:
    """Build ``n`` hosts on one bridge; tear everything down on exit.

    :param subnet_octet: the ``k`` of ``10.231.<k>.0/24`` (random if None).
    :param rate: each host's NIC speed, both ways (``1gbit``; :func:`shape_links`); None: unshaped.
    :raises pytest.skip.Exception: when namespaces are unavailable here.
    """
    if not 1 <= n <= 250:
        raise ValueError("1 <= n <= 250")
    require_netns()
    tag = secrets.token_hex(4)
    k = random.randint(1, 254) if subnet_octet is None else subnet_octet
    topo = Topology(tag=tag, subnet=f"{SUBNET_PREFIX}.{k}", bridge_ns=f"{NS_PREFIX}{tag}-br")
    try:
        _setup(topo, n)
        _wait_links_up(topo)
        if rate is not None:
            shape_links(topo, rate)
        yield topo
    finally:
        topo.close()


def _wait_links_up(topo: Topology, timeout: float = 5.0) -> None:
    """Wait until every host's eth0 reports carrier (veth needs both ends up)."""
    deadline = time.monotonic() + timeout
    for host in topo.hosts:
        while True:
            out = _ip("-n", host.ns, "-o", "link", "show", host.ifname, check=False).stdout
            if "LOWER_UP" in out or time.monotonic() > deadline:
                break
            time.sleep(0.05)


@contextlib.contextmanager
def nat_topology(public: int, lans: Sequence[int], *, random_ports: bool = False) -> Iterator[Topology]:
    """The internet with ``public`` hosts on it, and one NAT'ed LAN per entry of ``lans``
    (that many hosts each, behind their own router); torn down on exit.

    Hosts are numbered public ones first, then each LAN's in order (``topo.run(i, ...)``);
    ``topo.routers[j]`` is LAN ``j``'s router (its public address is its ``ip``).
    ``random_ports``: the routers pick random source ports (``masquerade random``), which
    TCP hole punching cannot get through; else they keep the host's port when free (as
    Linux does by default).

    :raises pytest.skip.Exception: when namespaces or nftables are unavailable here.
    """
    reason = nat_unavailable_reason()
    if reason is not None:
        import pytest  # noqa: PLC0415 - only tests call this

        pytest.skip(reason)
    tag = secrets.token_hex(4)
    k = random.randint(1, 254)
    topo = Topology(tag=tag, subnet=f"{INTERNET_PREFIX}.{k}", bridge_ns=f"{NS_PREFIX}{tag}-br")
    try:
        _add_bridge(topo.bridge_ns)
        for i in range(public):
            host = NetHost(index=i, ns=f"{NS_PREFIX}{tag}-{i}", ip=f"{topo.subnet}.{i + 1}", bridge_port=f"v{i}")
            topo.hosts.append(host)
            _add_host(host, topo.bridge_ns)
        lan_octets = random.sample(range(1, 255), len(lans))
        for j, count in enumerate(lans):
            router = _add_router(topo, j, lan_octets[j], random_ports)
            for h in range(count):
                index = len(topo.hosts)
                host = NetHost(
                    index=index, ns=f"{NS_PREFIX}{tag}-{index}", ip=f"{SUBNET_PREFIX}.{lan_octets[j]}.{h + 1}", bridge_port=f"v{h}"
                )
                topo.hosts.append(host)
                _add_host(host, f"{NS_PREFIX}{tag}-l{j}")
                _ip("-n", host.ns, "route", "add", "default", "via", router)
        _wait_links_up(topo)
        yield topo
    finally:
        topo.close()


def _add_router(topo: Topology, j: int, lan_octet: int, random_ports: bool) -> str:
    """LAN ``j``: its bridge and its router (wan0 on the internet, lan0 on the LAN, nftables NAT).

    Returns the router's LAN address (the LAN hosts' default gateway).
    """
    lan_bridge = f"{NS_PREFIX}{topo.tag}-l{j}"
    topo.extra_ns.append(lan_bridge)
    _add_bridge(lan_bridge)
    wan = NetHost(index=j, ns=f"{NS_PREFIX}{topo.tag}-r{j}", ip=f"{topo.subnet}.{200 + j}", ifname="wan0", bridge_port=f"r{j}")
    topo.extra_ns.append(wan.ns)
    topo.routers.append(wan)
    _add_host(wan, topo.bridge_ns)
    gateway = f"{SUBNET_PREFIX}.{lan_octet}.254"
    lan = NetHost(index=j, ns=wan.ns, ip=gateway, ifname="lan0", bridge_port="router")
    _add_host(lan, lan_bridge, new_ns=False)
    _ip("netns", "exec", wan.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    rules = NAT_RULES.format(random="random" if random_ports else "")
    nft = subprocess.run(
        ["ip", "netns", "exec", wan.ns, "nft", "-f", "-"], input=rules, capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )
    if nft.returncode != 0:
        raise RuntimeError(f"nft failed in {wan.ns}: {nft.stderr.strip()}")
    return gateway


class NamespaceForward:
    """127.0.0.1:<port> in the root namespace → ``target`` as seen from inside ``ns``.

    setns(2) moves only the calling thread, so one thread enters the namespace and
    makes every upstream connection from there; the listener stays in ours.
    """

    def __init__(self, ns: str, target: tuple[str, int]) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.ns, self.target = ns, target
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        with open(f"/var/run/netns/{self.ns}") as handle:
            if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
