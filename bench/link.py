"""Tunnel link vs direct TCP: bulk throughput, small-message round trip, connection set-up.

Three processes (bench.tunnel_peer): the worker side (libp2p node, tunnel_handler and
a TCP echo server), the server side (libp2p node, AuthGate.authenticate, serve_tunnel),
and this one, the client. The client runs the same payloads against the echo server
directly and through the tunnel port, interleaved so machine noise hits both alike.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any

from localp2p.llama.rpc import recv_exact
from localp2p.p2p.token import NetworkToken

from .procs import Procs
from .stats import CpuWatch, percentile, process_cpu_s, summary

MB = 1_000_000


@dataclass
class LinkPlan:
    bulk_bytes: int = 64 * MB
    bulk_reps: int = 3
    rtt_messages: int = 2000
    rtt_reps: int = 3
    connect_reps: int = 20
    message_size: int = 64


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def bulk_mb_s(port: int, size: int) -> float:
    """Send ``size`` bytes one way and wait for the one-byte ack; MB/s (10^6 bytes)."""
    chunk = memoryview(bytes(1 << 20))
    with _connect(port) as sock:
        sock.sendall(b"E")  # a first echo round trip: the tunnel is admitted and warm
        sock.sendall(b"x")
        recv_exact(sock, 1)
    with _connect(port) as sock:
        sock.sendall(b"S" + struct.pack("<Q", size))
        started = time.perf_counter()
        left = size
        while left:
            n = min(left, len(chunk))
            sock.sendall(chunk[:n])
            left -= n
        if recv_exact(sock, 1) != b"K":
            raise ConnectionError("bad ack")
        return size / (time.perf_counter() - started) / MB


def round_trips_us(port: int, messages: int, size: int) -> list[float]:
    """Round-trip times (µs) of ``messages`` messages of ``size`` bytes, one at a time."""
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    out = []
    with _connect(port) as sock:
        sock.sendall(b"E")
        for _ in range(50):  # warm-up
            sock.sendall(payload)
            recv_exact(sock, size)
        for _ in range(messages):
            started = time.perf_counter()
            sock.sendall(payload)
            recv_exact(sock, size)
            out.append((time.perf_counter() - started) * 1e6)
    return out


def connect_ms(port: int) -> float:
    """TCP connect until the first echoed byte (through the tunnel: stream open + admission)."""
    started = time.perf_counter()
    with _connect(port) as sock:
        sock.sendall(b"Ex")
        recv_exact(sock, 1)
        return (time.perf_counter() - started) * 1000


def run(procs: Procs, plan: LinkPlan, log: Any = print) -> dict[str, Any]:
    token = NetworkToken.generate().encode()
    with procs.group():
        worker = procs.command([sys.executable, "-m", "bench.tunnel_peer", "worker"], "tunnel-worker", {"TOKEN": token})
        winfo = json.loads(worker.wait_line('"ready"', timeout=60))
        server = procs.command(
            [sys.executable, "-m", "bench.tunnel_peer", "server", winfo["peer_id"], *winfo["addrs"]],
            "tunnel-server",
            {"TOKEN": token},
        )
        sinfo = json.loads(server.wait_line('"ready"', timeout=60))
        ports = {"direct": int(winfo["echo_port"]), "tunnel": int(sinfo["tunnel_port"])}
        bulk: dict[str, list[float]] = {k: [] for k in ports}
        rtts: dict[str, list[float]] = {k: [] for k in ports}
        p50: dict[str, list[float]] = {k: [] for k in ports}
        p99: dict[str, list[float]] = {k: [] for k in ports}
        connects: dict[str, list[float]] = {k: [] for k in ports}
        # CPU µs per round trip of each tunnel end: the relays' cost, which on a machine
        # whose cores llama.cpp also uses is taken from the model's compute.
        cpu_us: dict[str, list[float]] = {"server": [], "worker": []}
        pids = {"server": server.popen.pid, "worker": worker.popen.pid}
        with CpuWatch() as cpu:
            for rep in range(max(plan.bulk_reps, plan.rtt_reps)):
                for path, port in ports.items():  # interleaved: noise falls on both paths alike
                    if rep < plan.bulk_reps:
                        bulk[path].append(bulk_mb_s(port, plan.bulk_bytes))
                    if rep < plan.rtt_reps:
                        tunnel = path == "tunnel"
                        before = {end: process_cpu_s(pid) for end, pid in pids.items()} if tunnel else {}
                        sample = round_trips_us(port, plan.rtt_messages, plan.message_size)
                        if tunnel:
                            for end, pid in pids.items():
                                cpu_us[end].append((process_cpu_s(pid) - before[end]) * 1e6 / len(sample))
                        rtts[path].extend(sample)
                        p50[path].append(percentile(sample, 50))
                        p99[path].append(percentile(sample, 99))
                log(
                    f"  link rep {rep + 1}: bulk MB/s direct={bulk['direct'][-1]:.0f} tunnel={bulk['tunnel'][-1]:.1f}; "
                    f"rtt p50 µs direct={p50['direct'][-1]:.0f} tunnel={p50['tunnel'][-1]:.0f}"
                )
            for _ in range(plan.connect_reps):
                for path, port in ports.items():
                    connects[path].append(connect_ms(port))
    return {
        "plan": plan.__dict__,
        "other_cores": cpu.other_cores,
        # the worker end also runs the echo server (a few µs of it per round trip)
        "tunnel_cpu_us_per_round_trip": {end: summary(values) for end, values in cpu_us.items()},
        "paths": {
            path: {
                "bulk_mb_s": summary(bulk[path]),
                "rtt_p50_us": summary(p50[path]),
                "rtt_p99_us": summary(p99[path]),
                "rtt_all": {
                    "p50": percentile(rtts[path], 50),
                    "p99": percentile(rtts[path], 99),
                    "n": len(rtts[path]),
                },
                "connect_ms": summary(connects[path]),
            }
            for path in ports
        },
    }
