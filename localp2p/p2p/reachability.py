"""Is this node reachable from outside? Asked of a relay, answered by a dial back.

Protocol ``/localp2p/reachability/1.0.0`` (relays answer it; token holders only):
the asker sends one frame, a JSON list of its listen addresses; the relay tries a
plain TCP connection to each of them whose IP is the one the asker's connection
came from (so a relay cannot be made to connect anywhere else), and answers one
frame ``{"observed": ip, "reachable": [addrs that accepted]}``.

Behind a NAT the relay sees the router's address, which is none of the node's own:
the node is unreachable and keeps reservations on relays (:mod:`localp2p.p2p.links`).
A node with a public address that a firewall shields is found out by the dial back.
This is AutoNAT's idea without its protocol: py-libp2p 0.8.1's AutoNAT v1 dials
every address the asker names, and is wired to nothing either.
"""

from __future__ import annotations

import enum
import json
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from localp2p.logs import get_logger

from .addresses import ip_of, strip_p2p
from .auth import AuthGate, encode_frame, read_frame, shielded_write
from .node import P2PNode
from .relay import is_circuit

__all__ = ["REACHABILITY_PROTOCOL", "Reachability", "ask_reachability", "reachability_handler"]

REACHABILITY_PROTOCOL = "/localp2p/reachability/1.0.0"
#: Addresses a relay dials back at most per question.
MAX_DIAL_BACKS = 8
#: Seconds one dial back may take (a NAT drops the SYN: this is how long "no" takes).
DIAL_BACK_TIMEOUT = 2.0
#: Seconds the whole question may take.
ASK_TIMEOUT = DIAL_BACK_TIMEOUT + 3.0

_log = get_logger(__name__)


class Reachability(enum.Enum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


def reachability_handler(gate: AuthGate):
    """Relay side: dial the asker back on its addresses at the IP it came from."""

    async def handle(stream: INetStream) -> None:
        if not await gate.require(stream):
            return
        remote = stream.get_remote_address()
        observed = remote[0] if remote else None
        try:
            asked = json.loads(await read_frame(stream))
        except Exception:
            return
        candidates = []
        for text in asked if isinstance(asked, list) else []:
            try:
                addr = strip_p2p(Multiaddr(str(text)))
                _family, ip = ip_of(addr)
                port = int(addr.value_for_protocol("tcp"))
            except Exception:
                continue
            if ip is not None and ip == observed and not is_circuit(addr):
                candidates.append((str(addr), ip, port))
        reachable: list[str] = []
        for text, ip, port in candidates[:MAX_DIAL_BACKS]:
            with trio.move_on_after(DIAL_BACK_TIMEOUT):
                try:
                    sock = await trio.open_tcp_stream(ip, port)
                except OSError:
                    continue
                await sock.aclose()
                reachable.append(text)
        await shielded_write(stream, encode_frame(json.dumps({"observed": observed, "reachable": reachable}).encode()))

    return handle


async def ask_reachability(node: P2PNode, relay_id: ID) -> tuple[Reachability, dict[str, Any]]:
    """Ask ``relay_id`` (authenticated already) whether it can reach us; PUBLIC or PRIVATE, and its answer.

    :raises Exception: the relay does not answer (UNKNOWN then, for the caller).
    """
    with trio.fail_after(ASK_TIMEOUT):
        stream = await node.new_stream(relay_id, REACHABILITY_PROTOCOL)
        try:
            own = [str(a) for a in node.listen_addrs]
            await shielded_write(stream, encode_frame(json.dumps(own).encode()))
            answer = json.loads(await read_frame(stream))
        finally:
            await stream.close()
    if not isinstance(answer, dict):
        raise ValueError("malformed reachability answer")
    state = Reachability.PUBLIC if answer.get("reachable") else Reachability.PRIVATE
    return state, answer
