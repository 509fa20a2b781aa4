"""`localp2p worker llama-cpp-rpc`: one llama.cpp rpc-server, supervised."""

from __future__ import annotations

import ipaddress
import socket

import trio

from localp2p.logs import get_logger
from localp2p.supervisor import RpcServerSpec, StartupError, supervise_rpc_server

log = get_logger("worker")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names that resolve only to them (``localhost``)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_port_free(host: str, port: int) -> None:
    """Raise StartupError if ``host:port`` cannot be bound right now (taken, or no such address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


async def run_static_worker(spec: RpcServerSpec, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the rpc-server until cancelled; prints one ready line on stdout when it answers."""
    if not is_loopback(spec.host):
        log.warning(
            "rpc-server is reachable from the network WITHOUT authentication: anyone who can "
            "connect can run code paths in llama.cpp's RPC server and read or write its memory. "
            "Bind 127.0.0.1 and use p2p mode (`worker p2p-llama-cpp-rpc`) across machines.",
            address=spec.host,
        )
    check_port_free(spec.host, spec.port)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(supervise_rpc_server, spec)
        ready = (
            f"localp2p worker ready: endpoint={spec.endpoint} rpc-protocol={info.version_text} "
            f"memory-free-mib={info.memory_free >> 20} cache={spec.cache_dir or 'off'}"
        )
        print(ready, flush=True)
        task_status.started(ready)
