"""Issue 15: delegation (``run --p2p --delegate-to``) and the provider's firewall, with real
processes in network namespaces, and API keys held end to end through a lite client.

Host 1 runs the provider (``--deny-peer`` the denied server); host 0 a server delegating to
it, a second one it denies, and a third with ``--fallback-to-local``; host 2 a lite client.
Every server has ``--api-key``. Needs root; skips with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from test_mesh_api import MESSAGES, MODEL, Node, chat_text, peer_id_for, start_client, start_server, streamed_text, wait_models

from localp2p.testing.cluster import new_token
from localp2p.testing.netns import Topology, netns_unavailable_reason, topology

pytestmark = pytest.mark.skipif(netns_unavailable_reason() is not None, reason=f"network namespaces: {netns_unavailable_reason()}")

KEY = "mesh-secret"
#: --delegate-timeout of the delegating servers (s): what "within the timeout" is measured against.
DELEGATE_TIMEOUT = 3.0


@dataclass
class Delegating:
    topo: Topology
    provider: Node
    provider_id: str
    allowed: Node
    allowed_id: str
    denied: Node
    fallback: Node
    client: Node


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Delegating]:
    log_dir = tmp_path_factory.mktemp("delegation")
    token = new_token()
    with topology(3) as topo, contextlib.ExitStack() as stack:
        ids = {name: peer_id_for(log_dir / f"state-{name}") for name in ("provider", "allowed", "denied")}
        provider = start_server(topo, 1, log_dir, token, "provider", "--deny-peer", ids["denied"], "--api-key", KEY)
        stack.callback(provider.close)
        delegate = ("--delegate-to", ids["provider"], "--delegate-timeout", str(DELEGATE_TIMEOUT), "--api-key", KEY)
        allowed = start_server(topo, 0, log_dir, token, "allowed", *delegate)
        stack.callback(allowed.close)
        denied = start_server(topo, 0, log_dir, token, "denied", *delegate)
        stack.callback(denied.close)
        fallback = start_server(topo, 0, log_dir, token, "fallback", *delegate, "--fallback-to-local")
        stack.callback(fallback.close)
        client = start_client(topo, 2, log_dir, token)
        stack.callback(client.close)
        yield Delegating(topo, provider, ids["provider"], allowed, ids["allowed"], denied, fallback, client)


def _peer_of(node: Node) -> str:
    return str(node.http.get("/api/p2p", headers={"Authorization": f"Bearer {KEY}"}).json()["node"]["peer_id"])


def _served_for(provider: Node, peer: str) -> int:
    """Requests the provider served for ``peer`` (its /api/p2p clients list)."""
    clients = provider.http.get("/api/p2p", headers={"Authorization": f"Bearer {KEY}"}).json()["clients"]
    return sum(c["requests_served"] for c in clients if c["peer_id"] == peer)


def test_allowed_peer_is_served_by_the_provider(cluster: Delegating) -> None:
    expected = chat_text(cluster.provider.sdk(api_key=KEY))
    before = _served_for(cluster.provider, cluster.allowed_id)
    # the caller's key goes through to the provider, which checks it
    assert chat_text(cluster.allowed.sdk(api_key=KEY)) == expected
    assert streamed_text(cluster.allowed.sdk(api_key=KEY)) == expected
    assert _served_for(cluster.provider, cluster.allowed_id) == before + 2
    with pytest.raises(openai.AuthenticationError):
        chat_text(cluster.allowed.sdk(api_key="wrong"))
    mesh = cluster.allowed.http.get("/api/p2p", headers={"Authorization": f"Bearer {KEY}"}).json()["mesh"]
    assert mesh["delegate_to"] == cluster.provider_id and mesh["requests_forwarded"] >= 2, mesh


def test_denied_peer_gets_403(cluster: Delegating) -> None:
    reply = cluster.denied.http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert reply.status_code == 403, reply.text
    assert reply.json()["error"]["code"] == "peer_not_allowed", reply.text


def test_api_key_holds_through_the_lite_client(cluster: Delegating) -> None:
    wait_models(cluster.client, 4)  # the provider and the three delegating servers
    # Whichever server the client picks (a request that came over the network is served
    # where it lands: never forwarded twice), that server checks the caller's key, passed
    # through by the client: with it, the answer; without it, 401 in OpenAI's shape.
    expected = chat_text(cluster.provider.sdk(api_key=KEY))
    for _ in range(4):
        assert chat_text(cluster.client.sdk(api_key=KEY)) == expected
        with pytest.raises(openai.AuthenticationError) as refused:
            chat_text(cluster.client.sdk())
        assert refused.value.body["code"] == "invalid_api_key"  # type: ignore[index]


def _delegated(node: Node) -> httpx.Response:
    """A chat request to ``node`` with the key; the client's own limit is far above the delegate timeout."""
    return node.http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=DELEGATE_TIMEOUT + 60,
    )


def test_provider_frozen_then_gone(cluster: Delegating) -> None:
    expected = chat_text(cluster.fallback.sdk(api_key=KEY))  # delegated: the provider answers
    assert _served_for(cluster.provider, _peer_of(cluster.fallback)) >= 1
    # Frozen (SIGSTOP): connected, but it answers nothing: the delegate timeout, not a hang.
    os.kill(cluster.provider.proc.pid, signal.SIGSTOP)
    try:
        reply = _delegated(cluster.allowed)
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "provider_unavailable", reply.text
        assert chat_text(cluster.fallback.sdk(api_key=KEY)) == expected  # served locally
    finally:
        os.kill(cluster.provider.proc.pid, signal.SIGCONT)
    cluster.provider.proc.kill()
    # gone: without --fallback-to-local a clear 503
    reply = _delegated(cluster.allowed)
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"]["code"] == "provider_unavailable", reply.text
    # with it: answered here, the same text
    assert chat_text(cluster.fallback.sdk(api_key=KEY)) == expected
    assert streamed_text(cluster.fallback.sdk(api_key=KEY)) == expected
    mesh = cluster.fallback.http.get("/api/p2p", headers={"Authorization": f"Bearer {KEY}"}).json()["mesh"]
    assert mesh["delegation_fallbacks"] >= 3
