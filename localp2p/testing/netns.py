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

Usage::

    with topology(2) as topo:
        p = topo.run(0, [sys.executable, "-c", "print('hi')"], stdout=subprocess.PIPE)
        topo.link_down(1)   # unplug host 1's cable
        topo.link_up(1)
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import secrets
import shutil
import signal
import subprocess
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
        for ns in [h.ns for h in self.hosts] + [self.bridge_ns]:
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


def _setup(topo: Topology, n: int) -> None:
    br = topo.bridge_ns
    _ip("netns", "add", br)
    _ip("-n", br, "link", "set", "lo", "up")
    # mcast_snooping 0: forward all multicast to all ports (mDNS needs it; with
    # snooping on, the bridge may drop 224.0.0.251 until it saw IGMP joins).
    _ip("-n", br, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0", "stp_state", "0")
    _ip("-n", br, "link", "set", "br0", "multicast", "on", "up")
    for i in range(n):
        host = NetHost(
            index=i,
            ns=f"{NS_PREFIX}{topo.tag}-{i}",
            ip=f"{topo.subnet}.{i + 1}",
            bridge_port=f"v{i}",
        )
        topo.hosts.append(host)
        _ip("netns", "add", host.ns)
        for key in ("all", "default"):
            topo.exec(i, ["sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1"], check=False)
        _ip("-n", host.ns, "link", "set", "lo", "up")
        # Create the pair directly in the two namespaces: no name ever
        # appears in the root namespace, so nothing can clash there.
        _ip(
            "link", "add", host.ifname, "netns", host.ns, "type", "veth",
            "peer", "name", host.bridge_port, "netns", br,
        )  # fmt: skip
        _ip("-n", br, "link", "set", host.bridge_port, "master", "br0")
        _ip("-n", br, "link", "set", host.bridge_port, "multicast", "on", "up")
        _ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", host.ifname)
        _ip("-n", host.ns, "link", "set", host.ifname, "multicast", "on", "up")


@contextlib.contextmanager
def topology(n: int, *, subnet_octet: int | None = None) -> Iterator[Topology]:
    """Build ``n`` hosts on one bridge; tear everything down on exit.

    :param subnet_octet: the ``k`` of ``10.231.<k>.0/24`` (random if None).
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
