"""Issue 15: the API stream protocol and federation between real libp2p hosts in one process.

Toy ASGI apps stand in for servers (the netns tests run the real ones): they show what the
processes cannot easily: a server dying mid-stream, a caller going away, a peer without the
token, and the choice rule itself.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair

from localp2p.p2p.api_stream import API_PROTOCOL, INFO_PROTOCOL, ApiCallFailed, RequestHead, call, serve_asgi, write_info
from localp2p.p2p.auth import AuthGate
from localp2p.p2p.discovery import Candidate
from localp2p.p2p.federation import ONLINE, ServerDirectory, ServerEntry, forward_http
from localp2p.p2p.node import P2PNode, open_node
from localp2p.p2p.token import NetworkToken

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
HEAD = RequestHead("POST", "/v1/chat/completions", "", (("content-type", "application/json"),))
BODY = json.dumps({"model": "m", "stream": True}).encode()


class ToyApp:
    """An ASGI app that streams SSE events; ``die_after`` events it raises (the server dying)."""

    def __init__(self, events: int = 3, die_after: int | None = None, delay: float = 0.0) -> None:
        self.events, self.die_after, self.delay = events, die_after, delay
        self.calls = 0
        self.cancelled = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls += 1
        body = (await receive())["body"]
        assert json.loads(body)["model"] == "m"
        try:
            if self.die_after == 0:
                raise RuntimeError("died before answering")
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            for i in range(self.events):
                if self.die_after is not None and i == self.die_after:
                    raise RuntimeError("died mid-stream")
                await send({"type": "http.response.body", "body": f"data: {i}\n\n".encode(), "more_body": True})
                await trio.sleep(self.delay)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except trio.Cancelled:
            self.cancelled.set()
            raise


@asynccontextmanager
async def toy_server(token: NetworkToken, app: ToyApp, models: list[str]) -> AsyncIterator[tuple[P2PNode, AuthGate]]:
    async with open_node(create_new_key_pair(), LOOPBACK) as node:
        gate = AuthGate(token, {"name": "toy"}, "server")
        gate.install(node)

        async def api(stream: INetStream) -> None:
            if await gate.require(stream):
                await serve_asgi(stream, app, {})

        async def info(stream: INetStream) -> None:
            if await gate.require(stream):
                await write_info(stream, {"models": models, "admitted": 0, "running": 0, "max_queue": 8, "ready": True})

        node.set_handler(API_PROTOCOL, api, close_on_return=False)
        node.set_handler(INFO_PROTOCOL, info)
        yield node, gate


@asynccontextmanager
async def client_of(token: NetworkToken, *servers: P2PNode) -> AsyncIterator[ServerDirectory]:
    async with open_node(create_new_key_pair(), LOOPBACK) as node, trio.open_nursery() as nursery:
        gate = AuthGate(token, {"name": "client"}, "client")
        gate.install(node)
        directory = ServerDirectory(node, gate)
        send, receive = trio.open_memory_channel[Candidate](8)
        await nursery.start(directory.run, receive)
        for server in servers:
            await send.send(Candidate(server.peer_id, tuple(server.listen_addrs), "mdns", role="server"))
        with trio.fail_after(10):
            while len(directory.online()) < len(servers):
                await trio.sleep(0.01)
        yield directory
        nursery.cancel_scope.cancel()


async def relay(directory: ServerDirectory, disconnect: trio.Event | None = None) -> tuple[int | None, bytes]:
    """forward_http into a list; ``disconnect``: the caller goes away when it is set."""
    sent: list[dict[str, Any]] = []
    disconnect = disconnect if disconnect is not None else trio.Event()

    async def receive() -> dict[str, Any]:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await forward_http(directory, HEAD, BODY, receive, send)
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_stream_passes_through_and_a_mid_stream_death_ends_with_an_error_event() -> None:
    token = NetworkToken.generate()

    async def main() -> None:
        with trio.fail_after(60):
            async with toy_server(token, ToyApp(), ["m"]) as (server, _):
                async with client_of(token, server) as directory:
                    assert await relay(directory) == (200, b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n")
            async with toy_server(token, ToyApp(die_after=2), ["m"]) as (server, _):
                async with client_of(token, server) as directory:
                    status, body = await relay(directory)
                    assert status == 200 and body.startswith(b"data: 0\n\ndata: 1\n\ndata: {")
                    events = body.decode().split("\n\n")
                    assert json.loads(events[2][len("data: ") :])["error"]["code"] == "server_gone"
                    assert events[3] == "data: [DONE]"

    trio.run(main)


def test_failover_before_the_first_byte() -> None:
    token = NetworkToken.generate()

    async def main() -> None:
        with trio.fail_after(60):
            dying, healthy = ToyApp(die_after=0), ToyApp()
            async with toy_server(token, dying, ["m"]) as (a, _), toy_server(token, healthy, ["m"]) as (b, _):
                async with client_of(token, a, b) as directory:
                    # whichever the rule picks first, every request is answered whole
                    for _ in range(3):
                        assert await relay(directory) == (200, b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n")
                    assert dying.calls >= 1 and healthy.calls == 3

    trio.run(main)


def test_caller_going_away_cancels_the_remote_app() -> None:
    token = NetworkToken.generate()

    async def main() -> None:
        with trio.fail_after(60):
            app = ToyApp(events=1000, delay=0.05)
            async with toy_server(token, app, ["m"]) as (server, _), client_of(token, server) as directory:
                gone = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(relay, directory, gone)
                    while app.calls == 0:
                        await trio.sleep(0.01)
                    gone.set()
                await app.cancelled.wait()  # the remote generation stopped
                assert directory.online()[0].in_flight == 0

    trio.run(main)


def test_unauthenticated_peer_gets_nothing() -> None:
    token = NetworkToken.generate()

    async def main() -> None:
        with trio.fail_after(60):
            app = ToyApp()
            async with toy_server(token, app, ["m"]) as (server, _), open_node(create_new_key_pair(), LOOPBACK) as stranger:
                await stranger.connect(server.peer_info)
                try:
                    await call(stranger, server.peer_id, HEAD, BODY, timeout=5)
                except ApiCallFailed:
                    pass
                else:
                    raise AssertionError("a peer without the token got an answer")
                assert app.calls == 0

    trio.run(main)


def test_choice_rule() -> None:
    def entry(peer: str, **fields: Any) -> ServerEntry:
        return ServerEntry(peer_id=peer, state=ONLINE, models=fields.pop("models", ["m"]), ready=True, **fields)

    directory = ServerDirectory.__new__(ServerDirectory)
    directory._servers = {}
    for e in (
        entry("a", admitted=3, max_queue=8),
        entry("b", admitted=1, max_queue=8),
        entry("c", admitted=0, models=["other"]),
        entry("d", admitted=0, admits_us=False),
    ):
        directory._servers[e.peer_id] = e
    assert directory.choose("m").peer_id == "b"  # type: ignore[union-attr]  # least busy with the model
    assert directory.choose("other").peer_id == "c"  # type: ignore[union-attr]
    assert directory.choose("missing") is None
    b = directory._servers["b"]
    b.in_flight = 3  # ours, sent since its last announcement: now b counts 4, a 3
    assert directory.choose("m").peer_id == "a"  # type: ignore[union-attr]
    b.in_flight_at_report = 3  # an announcement saying 1 while 3 of ours were in flight: ours count once
    assert b.load == 3
    a = directory._servers["a"]
    a.admitted = 8  # full: last, whatever the loads
    assert directory.choose("m").peer_id == "b"  # type: ignore[union-attr]
    assert directory.choose("m", exclude={"b"}).peer_id == "a"  # type: ignore[union-attr]
