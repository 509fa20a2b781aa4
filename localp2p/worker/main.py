"""Workers: a supervised llama.cpp rpc-server, reached directly (static) or through libp2p (p2p)."""

from __future__ import annotations

import functools

import trio

from localp2p.cpumode import CpuMode
from localp2p.llama.burst import RpcBurstFraming
from localp2p.llama.rpc import free_port
from localp2p.logs import get_logger
from localp2p.netutil import check_port_free, is_loopback
from localp2p.p2p.auth import AuthGate
from localp2p.p2p.liveness import PING_PROTOCOL, ping_handler
from localp2p.p2p.network import Network, P2PSettings, discard_candidates, run_network
from localp2p.p2p.node import P2PNode
from localp2p.p2p.tunnel import TUNNEL_PROTOCOL, Admission, tunnel_handler
from localp2p.worker.rpc_server import RpcServerSpec, devices_text, probe_devices, supervise_rpc_server

log = get_logger("worker")


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
    devices = await probe_devices(spec)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(supervise_rpc_server, spec)
        ready = (
            f"localp2p worker ready: endpoint={spec.endpoint} rpc-protocol={info.version_text} "
            f"memory-free-mib={info.memory_free >> 20} cpu-mode={spec.cpu_mode.value} cache={info.cache_dir or 'off'} "
            f"devices={devices_text(devices)}"
        )
        print(ready, flush=True)
        task_status.started(ready)


async def run_p2p_worker(
    p2p: P2PSettings,
    threads: int = 0,
    cache_dir: str | None = None,
    cpu_mode: CpuMode = CpuMode.DEFAULT,
    devices: tuple[str, ...] = (),
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Lend this machine to the network's server until cancelled.

    The rpc-server listens on 127.0.0.1 only, on a port chosen here; the only way in
    is a tunnel stream from an authenticated server (one server at a time). Prints
    one ready line on stdout. ``devices``: the ggml devices to serve (``--device``).
    """
    spec = RpcServerSpec(
        host="127.0.0.1", port=free_port(), threads=threads, cache_dir=cache_dir, cpu_mode=cpu_mode, devices=devices
    )
    served = await probe_devices(spec)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(supervise_rpc_server, spec)
        hello = {
            "name": p2p.name,
            "rpc_protocol": info.version_text,
            "memory_free": info.memory_free,
            "memory_total": info.memory_total,
            "devices": [d.as_dict() for d in served],
        }
        admission = Admission()

        def install_handlers(node: P2PNode, gate: AuthGate) -> None:
            admission.install(node)
            node.set_handler(TUNNEL_PROTOCOL, tunnel_handler(gate, spec.endpoint, admission, framing=RpcBurstFraming))
            node.set_handler(PING_PROTOCOL, ping_handler(gate, admission))

        network: Network = await nursery.start(
            functools.partial(
                run_network, p2p, role="worker", hello=hello, advertise=True, install_handlers=install_handlers
            )
        )
        nursery.start_soon(discard_candidates, network.candidates)
        ready = (
            f"localp2p worker ready: peer={network.node.peer_id} network={p2p.token.network_id} "
            f"rpc-protocol={info.version_text} memory-free-mib={info.memory_free >> 20} cpu-mode={cpu_mode.value} "
            f"devices={devices_text(served)} addrs={','.join(str(a) for a in network.node.p2p_addrs())}"
        )
        print(ready, flush=True)
        task_status.started(ready)

