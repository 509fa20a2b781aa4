"""`localp2p client`: join the network of TOKEN and serve its OpenAI API here, with no model.

Wiring only: the libp2p node (role ``client``: it looks the rendezvous keys up in the DHT
and browses mDNS), the :class:`~localp2p.p2p.federation.ServerDirectory` and the HTTP app
(:mod:`localp2p.client.app`). Nothing here or below imports llama.cpp.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from localp2p.errors import StartupError
from localp2p.logs import get_logger
from localp2p.netutil import check_port_free
from localp2p.p2p.federation import ServerDirectory
from localp2p.p2p.network import Network, P2PSettings, run_network

from .app import ClientApp

log = get_logger("client")

#: Seconds keep-alive HTTP connections stay open without a request.
KEEP_ALIVE = 30


@dataclass
class ClientSettings:
    p2p: P2PSettings
    address: str = "127.0.0.1:8080"


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StartupError(f"--address: expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


async def run_client(settings: ClientSettings, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Run until cancelled; prints one ready line (peer id, URL). Raises StartupError for a
    bad or busy address and for what :func:`~localp2p.p2p.network.run_network` refuses."""
    host, port = _host_port(settings.address)
    check_port_free(host, port)
    async with trio.open_nursery() as nursery:
        network: Network = await nursery.start(
            functools.partial(
                run_network, settings.p2p, role="client", hello={"name": settings.p2p.name}, advertise=False, search=True
            )
        )
        directory = ServerDirectory(network.node, network.gate, network.links)
        await nursery.start(directory.run, network.candidates)
        config = HypercornConfig()
        config.bind = [settings.address]
        config.accesslog = None
        config.errorlog = None
        config.keep_alive_timeout = KEEP_ALIVE
        urls = await nursery.start(functools.partial(hypercorn_serve, ClientApp(directory, network), config))  # type: ignore[arg-type]
        ready = (
            f"localp2p client ready: peer={network.node.peer_id} network={settings.p2p.token.network_id} "
            f"url={','.join(urls)}"
        )
        print(ready, flush=True)
        log.info("client ready", urls=urls)
        task_status.started(ready)
