"""`localp2p worker llama-cpp-rpc`: one llama.cpp rpc-server, supervised."""

from __future__ import annotations

import trio

from localp2p.logs import get_logger
from localp2p.netutil import check_port_free, is_loopback
from localp2p.errors import StartupError
from localp2p.supervisor import RpcServerSpec, supervise_rpc_server

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
    async with trio.open_nursery() as nursery:
        info = await nursery.start(supervise_rpc_server, spec)
        ready = (
            f"localp2p worker ready: endpoint={spec.endpoint} rpc-protocol={info.version_text} "
            f"memory-free-mib={info.memory_free >> 20} cache={spec.cache_dir or 'off'}"
        )
        print(ready, flush=True)
        task_status.started(ready)
