"""Tests for localp2p.p2p.discovery: mDNS (zeroconf) and DHT rendezvous.

Loopback tests run several nodes in one ``trio.run``; the netns tests run one
probe process (tests/discovery_probe.py) per network namespace on a bridge
(localp2p/testing/netns.py, needs root; skipped otherwise). Discovery times are printed
(``pytest -s`` shows them).

Run: .venv/bin/pytest -q tests/test_p2p_discovery.py
"""

from __future__ import annotations

import functools
import json
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from multiaddr import Multiaddr
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, Zeroconf

from localp2p.p2p.discovery import (
    Candidate,
    add_dht_peer,
    advertisable_addrs,
    run_dht,
    run_dht_discovery,
    run_mdns,
)
from localp2p.p2p.node import open_node
from localp2p.testing.netns import netns_unavailable_reason, topology

PROBE = Path(__file__).with_name("discovery_probe.py")


def random_service_type() -> str:
    """A fresh mDNS service type, so concurrent test runs never see each other."""
    return f"_lp2p-{secrets.token_hex(4)}._tcp.local."


async def cancellable(
    fn: Callable[..., Awaitable[None]], *, task_status: trio.TaskStatus[trio.CancelScope]
) -> None:
    """Run ``fn`` (a ``task_status`` service); ``started`` gives a scope that stops it."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(fn)
            task_status.started(scope)


async def wait_for(
    recv: trio.MemoryReceiveChannel[Candidate],
    pred: Callable[[Candidate], bool],
    seen: list[Candidate] | None = None,
) -> Candidate:
    """The first candidate matching ``pred`` (all received ones go to ``seen``)."""
    async for candidate in recv:
        if seen is not None:
            seen.append(candidate)
        if pred(candidate):
            return candidate
    raise AssertionError("channel closed")


# --------------------------------------------------------------------------
# unit bits
# --------------------------------------------------------------------------


def test_advertisable_addrs_prefers_non_loopback() -> None:
    lo = Multiaddr("/ip4/127.0.0.1/tcp/1")
    lan = Multiaddr("/ip4/10.231.1.1/tcp/1")
    assert advertisable_addrs([lo, lan]) == [lan]
    assert advertisable_addrs([lo]) == [lo]
    assert advertisable_addrs([Multiaddr("/ip4/0.0.0.0/tcp/1")]) == []
    assert advertisable_addrs([Multiaddr("/ip6/fe80::1/tcp/1"), lo]) == [lo]


def test_a_relayed_address_keeps_its_relay() -> None:
    """A peer's ``/p2p-circuit`` address loses only the peer's own ``/p2p``: cut at the first
    ``/p2p`` it became the relay's address, which a server then dialed as the worker's."""
    relay = "12D3KooWP6hf6vbSabV4xZipBX7H525ee7y5ZAd5rWk8vZ3ce1Pq"
    peer = "12D3KooWDUyXiciRmtL6aFTLQySyj9a5uXzb1fDp48J8Yj1dbDiE"
    circuit = Multiaddr(f"/ip4/100.64.1.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{peer}")
    direct = Multiaddr(f"/ip4/10.231.1.1/tcp/1/p2p/{peer}")
    kept = Multiaddr(f"/ip4/100.64.1.1/tcp/4001/p2p/{relay}/p2p-circuit")
    assert advertisable_addrs([circuit, direct]) == [kept, Multiaddr("/ip4/10.231.1.1/tcp/1")]


# --------------------------------------------------------------------------
# mDNS on loopback
# --------------------------------------------------------------------------


def test_mdns_loopback_find_other_type_and_gone() -> None:
    service, other_service = random_service_type(), random_service_type()

    async def main() -> None:
        with trio.fail_after(40):
            async with (
                open_node(create_new_key_pair()) as a,
                open_node(create_new_key_pair()) as b,
                open_node(create_new_key_pair()) as c,
            ):
                send_a, recv_a = trio.open_memory_channel[Candidate](100)
                send_b, recv_b = trio.open_memory_channel[Candidate](100)
                send_c, recv_c = trio.open_memory_channel[Candidate](100)
                seen_a: list[Candidate] = []
                async with trio.open_nursery() as nursery:
                    bogus_done = trio.Event()

                    async def bogus() -> None:
                        await register_bogus(bogus_zc, service)
                        bogus_done.set()

                    nursery.start_soon(bogus)
                    t0 = trio.current_time()
                    start_a = functools.partial(
                        run_mdns, a, service, role="server", name="node-a", send_channel=send_a
                    )
                    start_b = functools.partial(
                        run_mdns, b, service, role="worker", name="node-b", send_channel=send_b
                    )
                    start_c = functools.partial(
                        run_mdns, c, other_service, role="worker", name="node-c",
                        send_channel=send_c,
                    )  # fmt: skip
                    # start the three concurrently
                    scopes: dict[str, trio.CancelScope] = {}

                    async def start(key: str, fn: Any) -> None:
                        scopes[key] = await nursery.start(cancellable, fn)

                    async with trio.open_nursery() as starters:
                        for key, fn in (("a", start_a), ("b", start_b), ("c", start_c)):
                            starters.start_soon(start, key, fn)

                    found_b = await wait_for(recv_a, lambda x: x.peer_id == b.peer_id, seen_a)
                    t_ab = trio.current_time() - t0
                    found_a = await wait_for(recv_b, lambda x: x.peer_id == a.peer_id)
                    t_ba = trio.current_time() - t0
                    print(f"\nmDNS loopback: A found B after {t_ab:.2f} s, B found A after {t_ba:.2f} s")
                    assert found_b.source == "mdns" and not found_b.gone
                    assert found_b.role == "worker" and found_b.name == "node-b"
                    assert tuple(found_b.addrs) == tuple(b.listen_addrs)
                    assert found_a.role == "server" and found_a.name == "node-a"
                    assert tuple(found_a.addrs) == tuple(a.listen_addrs)

                    # A goes away cleanly -> B hears the goodbye.
                    scopes["a"].cancel()
                    t_stop = trio.current_time()
                    gone = await wait_for(recv_b, lambda x: x.peer_id == a.peer_id and x.gone)
                    print(f"mDNS loopback: 'gone' arrived {trio.current_time() - t_stop:.3f} s after stop")
                    assert gone.addrs == () and gone.source == "mdns"

                    # C (other service type) saw neither; nobody saw itself; the
                    # bogus announcements were dropped (logged), not fatal.
                    await bogus_done.wait()
                    await trio.sleep(0.5)
                    leaked: list[Candidate] = []
                    while True:
                        try:
                            leaked.append(recv_c.receive_nowait())
                        except trio.WouldBlock:
                            break
                    assert not leaked, leaked
                    while True:
                        try:
                            seen_a.append(recv_a.receive_nowait())
                        except trio.WouldBlock:
                            break
                    assert {x.peer_id for x in seen_a} == {b.peer_id}, seen_a
                    nursery.cancel_scope.cancel()

    bogus_zc = Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
    try:
        trio.run(main)
    finally:
        bogus_zc.close()


async def register_bogus(zc: Zeroconf, service: str) -> None:
    """Announce malformed services of our type: bad id, mismatched id, no address."""
    def new_id() -> str:
        return str(ID.from_pubkey(create_new_key_pair().public_key))

    stranger, other = new_id(), new_id()
    bad = [
        ("not-a-peer", {"id": "garbage!!", "a0": "/ip4/127.0.0.1/tcp/9"}),
        (stranger, {"id": new_id(), "a0": "/ip4/127.0.0.1/tcp/9"}),
        (other, {"id": other, "a0": "/not/a/multiaddr"}),
    ]
    for label, txt in bad:
        info = ServiceInfo(
            service, f"{label}.{service}", port=0, properties=txt, server=f"{label}.local.",
            parsed_addresses=["127.0.0.1"],
        )  # fmt: skip
        await trio.to_thread.run_sync(zc.register_service, info)


# --------------------------------------------------------------------------
# DHT on loopback
# --------------------------------------------------------------------------


def test_dht_loopback_rendezvous() -> None:
    """A advertises, B only bootstraps, C searches: C finds A within 10 s.

    Then D (advertise + search) joins: C finds D too (a searcher with cached
    results must still see new providers) and D finds A (a node that
    provides the key itself must still look at the network).
    """
    keys = [b"epoch-now-" + secrets.token_bytes(8), b"epoch-prev-" + secrets.token_bytes(8)]

    def rendezvous() -> list[bytes]:
        return list(keys)

    async def main() -> None:
        with trio.fail_after(40):
            async with (
                open_node(create_new_key_pair()) as a,
                open_node(create_new_key_pair()) as b,
                open_node(create_new_key_pair()) as c,
                open_node(create_new_key_pair()) as d,
            ):
                async with trio.open_nursery() as nursery:
                    da = await nursery.start(run_dht, a)
                    await nursery.start(run_dht, b)
                    dc = await nursery.start(run_dht, c)
                    dd = await nursery.start(run_dht, d)
                    boot = b.p2p_addrs()
                    # an unreachable bootstrap peer must not get in the way
                    dead = ID.from_pubkey(create_new_key_pair().public_key)
                    boot_c = [Multiaddr(f"/ip4/127.0.0.1/tcp/1/p2p/{dead}"), *boot]
                    send_a, recv_a = trio.open_memory_channel[Candidate](100)
                    send_c, recv_c = trio.open_memory_channel[Candidate](100)
                    send_d, recv_d = trio.open_memory_channel[Candidate](100)
                    t0 = trio.current_time()
                    await nursery.start(
                        functools.partial(
                            run_dht_discovery, a, da, rendezvous, advertise=True, search=False,
                            send_channel=send_a, bootstrap=boot,
                        )
                    )  # fmt: skip
                    await nursery.start(
                        functools.partial(
                            run_dht_discovery, c, dc, rendezvous, advertise=False, search=True,
                            send_channel=send_c, bootstrap=boot_c,
                        )
                    )  # fmt: skip
                    with trio.fail_after(10):
                        found = await wait_for(recv_c, lambda x: x.peer_id == a.peer_id)
                    t_found = trio.current_time() - t0
                    print(f"\nDHT loopback: C found A after {t_found:.2f} s")
                    assert found.source == "dht" and found.role is None and not found.gone
                    assert set(map(str, a.listen_addrs)) <= set(map(str, found.addrs))

                    t1 = trio.current_time()
                    await nursery.start(
                        functools.partial(
                            run_dht_discovery, d, dd, rendezvous, advertise=True, search=True,
                            send_channel=send_d, bootstrap=boot,
                        )
                    )  # fmt: skip
                    with trio.fail_after(15):
                        await wait_for(recv_c, lambda x: x.peer_id == d.peer_id)
                    t_cd = trio.current_time() - t1
                    with trio.fail_after(10):
                        await wait_for(recv_d, lambda x: x.peer_id == a.peer_id)
                    print(f"DHT loopback: C found late joiner D after {t_cd:.2f} s")
                    assert recv_a.statistics().current_buffer_used == 0  # A does not search
                    nursery.cancel_scope.cancel()

    trio.run(main)


def test_add_dht_peer_survives_unreachable_candidate() -> None:
    async def main() -> None:
        with trio.fail_after(30):
            async with open_node(create_new_key_pair()) as a, open_node(create_new_key_pair()) as b:
                async with trio.open_nursery() as nursery:
                    da = await nursery.start(run_dht, a)
                    await nursery.start(run_dht, b)
                    dead = Candidate(
                        peer_id=ID.from_pubkey(create_new_key_pair().public_key),
                        addrs=(Multiaddr("/ip4/127.0.0.1/tcp/1"),),
                        source="mdns",
                    )
                    assert await add_dht_peer(da, dead) is False
                    live = Candidate(peer_id=b.peer_id, addrs=tuple(b.listen_addrs), source="mdns")
                    assert await add_dht_peer(da, live) is True
                    assert b.peer_id in da.routing_table_peers()
                    nursery.cancel_scope.cancel()

    trio.run(main)


def test_dht_discovery_rejects_bootstrap_without_peer_id() -> None:
    async def main() -> None:
        async with open_node(create_new_key_pair()) as a:
            async with trio.open_nursery() as nursery:
                da = await nursery.start(run_dht, a)
                send, _recv = trio.open_memory_channel[Candidate](1)
                with pytest.raises(ValueError, match="/p2p/"):
                    await nursery.start(
                        functools.partial(
                            run_dht_discovery, a, da, lambda: [b"k"], advertise=True, search=True,
                            send_channel=send, bootstrap=["/ip4/127.0.0.1/tcp/4001"],
                        )
                    )  # fmt: skip
                nursery.cancel_scope.cancel()

    trio.run(main)


# --------------------------------------------------------------------------
# network namespaces: two "machines" on one bridge
# --------------------------------------------------------------------------


class Probe:
    """A discovery_probe.py process in a namespace; its JSON lines in a queue."""

    def __init__(self, topo: Any, i: int, args: list[str], log_dir: Path) -> None:
        self.i = i
        self.stderr_path = log_dir / f"probe{i}.stderr.log"
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.proc = topo.run(
            i,
            [sys.executable, str(PROBE), *args],
            stdout=subprocess.PIPE,
            stderr=self.stderr_path.open("wb"),
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.events: list[dict[str, Any]] = []

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                pass

    def expect(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                msg = self.lines.get(timeout=max(0.01, left))
            except queue.Empty:
                tail = self.stderr_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"probe {self.i}: no {what} within {timeout} s\n{tail}") from None
            self.events.append(msg)
            if pred(msg):
                return msg

    def first(self, event: str) -> dict[str, Any]:
        return next(m for m in self.events if m["event"] == event)


def _other_found(probe: Probe, peer_id: str, ip: str, source: str, timeout: float) -> dict[str, Any]:
    return probe.expect(
        lambda m: m["event"] == "candidate"
        and m["peer_id"] == peer_id
        and m["source"] == source
        and not m["gone"],
        timeout,
        f"{source} candidate for {peer_id} ({ip})",
    )


needs_netns = pytest.mark.skipif(
    netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason())
)


@pytest.mark.netns
@needs_netns
def test_netns_mdns_two_hosts(tmp_path: Path) -> None:
    service = random_service_type()
    with topology(2) as topo:
        probes = [
            Probe(topo, i, ["--mdns", service, "--role", ("server", "worker")[i], "--name", f"h{i}"], tmp_path)
            for i in range(2)
        ]
        ready = [p.expect(lambda m: m["event"] == "ready", 30, "ready") for p in probes]
        starts = [p.first("starting")["wall"] for p in probes]
        for i, p in enumerate(probes):
            other = 1 - i
            found = _other_found(p, ready[other]["peer_id"], topo.hosts[other].ip, "mdns", 20)
            assert found["addrs"], found
            assert all(a.startswith(f"/ip4/{topo.hosts[other].ip}/tcp/") for a in found["addrs"]), found
            assert found["role"] == ("server", "worker")[other] and found["name"] == f"h{other}"
            print(
                f"\nmDNS netns: host{i} found host{other} {found['wall'] - max(starts):.2f} s after "
                f"both started ({found['t']:.2f} s after its own start, node+registration "
                f"ready at {p.first('ready')['t']:.2f} s)"
            )
        # host 0 stops cleanly: host 1 is told it is gone
        t_stop = time.monotonic()
        probes[0].proc.terminate()
        gone = probes[1].expect(
            lambda m: m["event"] == "candidate" and m["peer_id"] == ready[0]["peer_id"] and m["gone"],
            10,
            "gone event",
        )
        print(f"mDNS netns: 'gone' after {time.monotonic() - t_stop:.3f} s")
        assert gone["addrs"] == []


@pytest.mark.netns
@needs_netns
def test_netns_dht_two_hosts(tmp_path: Path) -> None:
    key = secrets.token_hex(16)
    common = ["--dht", "--advertise", "--search", "--key", key]
    with topology(2) as topo:
        boot = Probe(topo, 0, common, tmp_path)
        ready0 = boot.expect(lambda m: m["event"] == "ready", 30, "ready")
        boot_addr = next(a for a in ready0["addrs"] if f"/ip4/{topo.hosts[0].ip}/" in a)
        joiner = Probe(topo, 1, [*common, "--bootstrap", boot_addr], tmp_path)
        ready1 = joiner.expect(lambda m: m["event"] == "ready", 30, "ready")
        start1 = joiner.first("starting")["wall"]
        f10 = _other_found(joiner, ready0["peer_id"], topo.hosts[0].ip, "dht", 15)
        f01 = _other_found(boot, ready1["peer_id"], topo.hosts[1].ip, "dht", 15)
        assert f10["addrs"] == [boot_addr.split("/p2p/")[0]], f10
        assert all(a.startswith(f"/ip4/{topo.hosts[1].ip}/tcp/") for a in f01["addrs"]), f01
        print(
            f"\nDHT netns: host1 found host0 {f10['wall'] - start1:.2f} s after host1 started; "
            f"host0 found host1 {f01['wall'] - start1:.2f} s after host1 started"
        )


@pytest.mark.netns
@needs_netns
def test_netns_topology_link_down_up_and_cleanup() -> None:
    """The helpers themselves: isolated hosts reach each other, a downed link
    partitions, bringing it up heals, and nothing is left behind."""
    server = (
        "import socket,sys;s=socket.socket();s.bind(('0.0.0.0',7000));s.listen();print('up',flush=True)\n"
        "while True:\n c,_=s.accept();c.close()"
    )

    def reachable(topo: Any, src: int, dst_ip: str) -> bool:
        code = (
            "import socket,sys\ntry:\n socket.create_connection((sys.argv[1],7000),timeout=1).close()\n"
            "except OSError: sys.exit(1)"
        )
        return topo.exec(src, [sys.executable, "-c", code, dst_ip], timeout=10).returncode == 0

    with topology(3) as topo:
        names = [h.ns for h in topo.hosts] + [topo.bridge_ns]
        listener = topo.run(0, [sys.executable, "-c", server], stdout=subprocess.PIPE, text=True)
        assert listener.stdout is not None and listener.stdout.readline().strip() == "up"
        assert reachable(topo, 1, topo.hosts[0].ip)
        topo.link_down(0)
        assert not reachable(topo, 1, topo.hosts[0].ip)
        assert not reachable(topo, 2, topo.hosts[0].ip)
        topo.link_up(0)
        deadline = time.monotonic() + 5
        while not reachable(topo, 2, topo.hosts[0].ip):
            assert time.monotonic() < deadline, "link_up did not heal the partition"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names), listed
    assert listener.poll() is not None
