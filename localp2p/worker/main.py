"""Workers: a supervised llama.cpp rpc-server, reached directly (static) or through libp2p (p2p)."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import trio

from localp2p.cpumode import CpuMode
from localp2p.llama.burst import RpcBurstFraming
from localp2p.llama.rpc import free_port
from localp2p.logs import get_logger
from localp2p.netutil import check_port_free, is_loopback
from localp2p.p2p.auth import AuthGate
from localp2p.p2p.liveness import PING_PROTOCOL, ping_handler
from localp2p.p2p.network import Network, P2PSettings, default_state_dir, discard_candidates, run_network
from localp2p.p2p.node import P2PNode
from localp2p.p2p.tensor_stream import TENSOR_PROTOCOL, WEIGHTS_PROTOCOL, tensor_handler
from localp2p.p2p.tunnel import TUNNEL_PROTOCOL, Admission, tunnel_handler
from localp2p.worker.rpc_server import RpcServerSpec, devices_text, probe_devices, supervise_rpc_server
from localp2p.worker.tensor_cache import CacheGuard, cache_min_free
from localp2p.worker.weight_fetch import open_worker_weights, weights_handler

#: The tensor cache dir under the state dir when ``--models-path`` is given without ``--cache-dir``.
DEFAULT_CACHE_SUBDIR = "tensor-cache"

log = get_logger("worker")


async def run_static_worker(
    spec: RpcServerSpec,
    models_path: str | None = None,
    state_dir: pathlib.Path | None = None,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the rpc-server until cancelled; prints one ready line on stdout when it answers.

    ``models_path``: GGUF files whose big tensors are copied into the tensor cache
    before the ready line (all of them: no server tells a static worker its layers),
    so a load sends almost none of their weights. The cache dir defaults to
    ``state_dir``/tensor-cache then.
    """
    if not is_loopback(spec.host):
        log.warning(
            "rpc-server is reachable from the network WITHOUT authentication: anyone who can "
            "connect can run code paths in llama.cpp's RPC server and read or write its memory. "
            "Bind 127.0.0.1 and use p2p mode (`worker p2p-llama-cpp-rpc`) across machines.",
            address=spec.host,
        )
    check_port_free(spec.host, spec.port)
    devices = await probe_devices(spec)
    if models_path and not spec.cache_dir:
        spec = dataclasses.replace(spec, cache_dir=str((state_dir or default_state_dir()) / DEFAULT_CACHE_SUBDIR))
    guard = CacheGuard(spec.cache_dir, cache_min_free()) if spec.cache_dir else None
    if models_path and spec.cache_dir:
        weights = await open_worker_weights(spec.cache_dir, models_path, state_dir or default_state_dir(), guard)
        if weights is not None:
            report = await weights.place_all()
            log.info(
                "local weights in the tensor cache",
                copied_mib=round(report.local / 2**20, 1),
                cached_mib=round(report.cached / 2**20, 1),
                seconds=report.as_dict()["seconds"],
            )
    async with trio.open_nursery() as nursery:
        info = await nursery.start(functools.partial(supervise_rpc_server, spec, guard=guard))
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
    models_path: str | None = None,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Lend this machine to the network's server until cancelled.

    The rpc-server listens on 127.0.0.1 only, on a port chosen here; the only way in
    is a tunnel stream from an authenticated server (one server at a time). Prints
    one ready line on stdout. ``devices``: the ggml devices to serve (``--device``).

    With a tensor cache (``cache_dir``; ``models_path`` implies one under the state
    dir), the worker fills it as each load starts, as the server's plan says, from the
    GGUF files under ``models_path``, from peers and from the server
    (localp2p.worker.weight_fetch), and serves its tensors to other token holders.
    """
    if models_path and not cache_dir:
        cache_dir = str(p2p.state_dir / DEFAULT_CACHE_SUBDIR)
    spec = RpcServerSpec(
        host="127.0.0.1", port=free_port(), threads=threads, cache_dir=cache_dir, cpu_mode=cpu_mode, devices=devices
    )
    served = await probe_devices(spec)
    guard = CacheGuard(cache_dir, cache_min_free()) if cache_dir else None
    weights = await open_worker_weights(cache_dir, models_path, p2p.state_dir, guard) if cache_dir else None
    async with trio.open_nursery() as nursery:
        info = await nursery.start(functools.partial(supervise_rpc_server, spec, guard=guard))
        hello = {
            "name": p2p.name,
            "rpc_protocol": info.version_text,
            "memory_free": info.memory_free,
            "memory_total": info.memory_total,
            "devices": [d.as_dict() for d in served],
        }
        if weights is not None:
            hello["models"] = weights.announce()
            hello["fills_cache"] = True
        admission = Admission()

        def install_handlers(node: P2PNode, gate: AuthGate) -> None:
            admission.install(node)
            framing = weights.gate.framing if weights is not None else RpcBurstFraming  # holds requests a fill is serving
            node.set_handler(TUNNEL_PROTOCOL, tunnel_handler(gate, spec.endpoint, admission, framing=framing))
            node.set_handler(PING_PROTOCOL, ping_handler(gate, admission))
            if weights is not None:
                node.set_handler(TENSOR_PROTOCOL, tensor_handler(gate, weights.locate()))
                node.set_handler(
                    WEIGHTS_PROTOCOL,
                    weights_handler(gate, lambda: node, weights.store, lambda: weights.local, tensor_gate=weights.gate),
                )

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

