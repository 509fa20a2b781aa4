"""One node's membership of a localp2p network: identity, host, token gate, discovery.

Both roles start the same stack (:func:`run_network`); what they do with it differs
(the server attaches workers, a worker serves tunnels). Discovery candidates from
mDNS and the DHT arrive on one channel; every peer found by mDNS is also added to
the DHT, so a LAN neighbour can be a DHT entry point. :class:`~localp2p.p2p.links.Links`
finds relays among the peers this node is connected to and keeps this node reachable
through them when it is behind a NAT (``P2PSettings.relay`` makes it a relay too).
"""

from __future__ import annotations

import os
import pathlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.crypto.keys import KeyPair
from multiaddr import Multiaddr

from localp2p.errors import StartupError
from localp2p.logs import get_logger, quiet_libp2p_logging
from localp2p.p2p.auth import AuthGate
from localp2p.p2p.discovery import Candidate, NodeDHT, add_dht_peer, run_dht, run_dht_discovery, run_mdns
from localp2p.p2p.identity import IdentityClaim, claim_identity
from localp2p.p2p.links import Links
from localp2p.p2p.node import P2PNode, serve_node
from localp2p.p2p.relay import RelayLimits
from localp2p.p2p.token import NetworkToken

log = get_logger("p2p")
quiet_libp2p_logging()

#: Discovery events waiting for the consumer; beyond this producers wait.
CANDIDATE_BUFFER = 256
DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/0",)


def default_state_dir() -> pathlib.Path:
    """``$LOCALP2P_STATE_DIR``, else ``$XDG_STATE_HOME/localp2p``, else ``~/.local/state/localp2p``."""
    if os.environ.get("LOCALP2P_STATE_DIR"):
        return pathlib.Path(os.environ["LOCALP2P_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return pathlib.Path(base) / "localp2p"


@dataclass
class P2PSettings:
    token: NetworkToken
    state_dir: pathlib.Path = field(default_factory=default_state_dir)
    listen: tuple[str, ...] = DEFAULT_LISTEN
    bootstrap: tuple[str, ...] = ()
    mdns: bool = True
    dht: bool = True
    name: str = field(default_factory=socket.gethostname)
    #: Relay for token holders with these limits (``--p2p-relay``); None: no relay service.
    relay: RelayLimits | None = None


@dataclass
class Network:
    """What :func:`run_network` hands its caller while it runs."""

    node: P2PNode
    gate: AuthGate
    dht: NodeDHT | None
    candidates: trio.MemoryReceiveChannel[Candidate]
    settings: P2PSettings
    links: Links

    def describe(self) -> dict[str, Any]:
        return {
            "peer_id": str(self.node.peer_id),
            "addrs": [str(a) for a in self.node.p2p_addrs()],
            "network_id": self.settings.token.network_id,
            "mdns": self.settings.mdns,
            "dht": self.settings.dht,
            **self.links.describe(),
        }


def load_identity(state_dir: pathlib.Path, role: str) -> IdentityClaim:
    """Claim this node's persistent Ed25519 key (``<role>-identity.key`` in ``state_dir``).

    The claim locks the file for as long as it is held (release it when the node
    stops); if another live process of this role holds it, a separate identity file
    in the same dir is claimed instead (see :func:`~localp2p.p2p.identity.claim_identity`),
    so two processes never share a peer id. A state dir we cannot use is a StartupError.
    """
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        return claim_identity(state_dir / f"{role}-identity.key")
    except PermissionError as exc:
        raise StartupError(f"state dir {state_dir} is not writable: {exc.strerror}") from None
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot load identity from {state_dir}: {exc}") from None


def _parse_multiaddrs(texts: tuple[str, ...], what: str) -> list[Multiaddr]:
    out = []
    for text in texts:
        try:
            out.append(Multiaddr(text))
        except Exception as exc:  # multiaddr raises several types
            raise StartupError(f"{what}: not a multiaddr: {text!r} ({exc})") from None
    return out


async def run_network(
    settings: P2PSettings,
    *,
    role: str,
    hello: dict[str, Any],
    advertise: bool,
    search: bool | None = None,
    install_handlers: Callable[[P2PNode, AuthGate], None] | None = None,
    task_status: trio.TaskStatus[Network] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run this node's libp2p host, token gate and discovery until cancelled.

    ``advertise`` (workers) provides the rendezvous keys in the DHT; the server
    searches for them instead; ``search`` (default: ``not advertise``) says whether to look
    up the keys' providers (a server does both: clients find it by them). mDNS both announces and browses. ``install_handlers``
    registers the caller's protocols before discovery starts, so a peer that finds
    us at once never meets a node without them. Raises StartupError for an unusable
    state dir, bad listen or bootstrap addresses, or a port in use. The identity
    file stays locked until this returns (or the process dies).
    """
    with load_identity(settings.state_dir, role) as identity:
        listen = _parse_multiaddrs(settings.listen, "--p2p-listen")
        bootstrap = _parse_multiaddrs(settings.bootstrap, "--p2p-bootstrap")
        await _run_network(
            settings,
            identity.key_pair,
            role=role,
            hello=hello,
            advertise=advertise,
            search=(not advertise) if search is None else search,
            install_handlers=install_handlers,
            bootstrap=bootstrap,
            listen=listen,
            task_status=task_status,
        )


async def _run_network(
    settings: P2PSettings,
    key_pair: KeyPair,
    *,
    role: str,
    hello: dict[str, Any],
    advertise: bool,
    search: bool,
    install_handlers: Callable[[P2PNode, AuthGate], None] | None,
    bootstrap: list[Multiaddr],
    listen: list[Multiaddr],
    task_status: trio.TaskStatus[Network],
) -> None:
    """:func:`run_network`'s body, run while the identity ``key_pair`` is claimed."""
    token = settings.token
    send, receive = trio.open_memory_channel[Candidate](CANDIDATE_BUFFER)
    async with trio.open_nursery() as nursery:
        try:
            node: P2PNode = await nursery.start(serve_node, key_pair, listen)
        except OSError as exc:
            raise StartupError(f"cannot listen for p2p on {settings.listen}: {exc.strerror or exc}") from None
        gate = AuthGate(token, hello, role)  # type: ignore[arg-type]
        gate.install(node)
        if install_handlers is not None:
            install_handlers(node, gate)
        links = Links(node, gate, settings.relay)
        await nursery.start(links.run)
        dht: NodeDHT | None = None
        if settings.dht:
            dht = await nursery.start(run_dht, node)
            await nursery.start(
                lambda task_status: run_dht_discovery(
                    node,
                    dht,
                    token.rendezvous_keys,
                    advertise=advertise,
                    search=search,
                    send_channel=send.clone(),
                    bootstrap=bootstrap,
                    task_status=task_status,
                )
            )
        if settings.mdns:
            mdns_send, mdns_receive = trio.open_memory_channel[Candidate](CANDIDATE_BUFFER)
            await nursery.start(
                lambda task_status: run_mdns(
                    node,
                    token.mdns_service,
                    role=role,
                    name=settings.name,
                    send_channel=mdns_send,
                    task_status=task_status,
                )
            )
            nursery.start_soon(_forward_mdns, mdns_receive, send.clone(), dht)
        log.info(
            "p2p node up",
            role=role,
            peer_id=str(node.peer_id),
            network=token.network_id,
            addrs=[str(a) for a in node.p2p_addrs()],
            mdns=settings.mdns,
            dht=settings.dht,
            relay=settings.relay is not None,
        )
        task_status.started(Network(node=node, gate=gate, dht=dht, candidates=receive, settings=settings, links=links))


async def _forward_mdns(
    receive: trio.MemoryReceiveChannel[Candidate],
    send: trio.MemorySendChannel[Candidate],
    dht: NodeDHT | None,
) -> None:
    """Pass mDNS candidates on; every LAN peer found also becomes a DHT peer."""
    async with send:
        async for candidate in receive:
            if dht is not None and not candidate.gone:
                await add_dht_peer(dht, candidate)
            await send.send(candidate)


async def discard_candidates(candidates: trio.MemoryReceiveChannel[Candidate]) -> None:
    """For nodes that wait to be found (workers, relays): what they discover only feeds their DHT routing table."""
    async for _ in candidates:
        pass
