"""Issue 15: the mesh API with real processes in network namespaces.

A lite client (``localp2p client``, run with llama_cpp made unimportable) in host 0 and two
``run --p2p`` servers in hosts 1 (``--max-queue 4``) and 2; the official ``openai`` SDK talks to
the client and to a server directly. A third server in host 0 serves the same weights under
another name only (a model the others lack). Delegation: tests/test_mesh_delegation.py.
Needs root; skips with the reason otherwise.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from libp2p.peer.id import ID

from localp2p.config import embedded_model_path
from localp2p.p2p.identity import load_or_create_identity
from localp2p.testing.cluster import Proc, Server, free_port, netns_prefix, new_token, stopped_on_error
from localp2p.testing.netns import NamespaceForward, Topology, netns_unavailable_reason, topology

pytestmark = pytest.mark.skipif(netns_unavailable_reason() is not None, reason=f"network namespaces: {netns_unavailable_reason()}")

MODEL = "smollm2-135m-instruct"
#: --max-queue of server 1 (its default --parallel: a full queue is one that runs this many).
QUEUE = 4
#: The third server's only model: the same weights under another name.
ALIAS = "smollm2-alias"
MESSAGES = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
#: Seconds the client may take to see both servers (discovery by mDNS, then announcements).
DISCOVERY_LIMIT = 60.0


@dataclass
class Node:
    """A process in a namespace and its HTTP API, reached through a forwarder in ours."""

    proc: Proc
    http: httpx.Client
    base_url: str
    forward: NamespaceForward

    def sdk(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)

    def p2p(self) -> dict[str, Any]:
        reply = self.http.get("/api/p2p")
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def close(self) -> None:
        self.http.close()
        self.proc.stop()
        self.forward.close()


def _start(topo: Topology, i: int, log_dir: pathlib.Path, name: str, args: list[str], env: dict[str, str], ready: str) -> Node:
    """Start ``localp2p ARGS --address <host i>:<port>`` in host ``i``; wait for ``ready`` (a
    stdout line, or "/readyz": the server's readiness)."""
    port = free_port()
    host = topo.hosts[i].ip
    proc = Proc(
        [*args, "--address", f"{host}:{port}", "--state-dir", str(log_dir / f"state-{name}"), "--node-name", name],
        log_dir,
        name,
        env,
        prefix=netns_prefix(topo, i),
    )
    with stopped_on_error(proc):
        forward = NamespaceForward(topo.hosts[i].ns, (host, port))
        base = f"http://127.0.0.1:{forward.port}"
        node = Node(proc, httpx.Client(base_url=base, timeout=120.0), base, forward)
        try:
            if ready == "/readyz":
                Server(proc, base).wait_ready()
            else:
                proc.wait_line(ready)
        except BaseException:
            node.http.close()
            forward.close()
            raise
    return node


def start_server(topo: Topology, i: int, log_dir: pathlib.Path, token: str, name: str, *flags: str, dht: bool = False) -> Node:
    """``run --p2p`` found by mDNS only (``dht``: by the DHT only)."""
    args = ["run", "--p2p", "--threads", "1", "--p2p-no-mdns" if dht else "--p2p-no-dht", *flags]
    return _start(topo, i, log_dir, name, args, {"P2P_TOKEN": token, "LLAMACPP_GRPC_SERVERS": ""}, "/readyz")


def start_client(topo: Topology, i: int, log_dir: pathlib.Path, token: str, name: str = "client", *flags: str) -> Node:
    """``localp2p client`` with llama_cpp unimportable (a package on PYTHONPATH that raises); ``flags``
    replace its discovery flag (default ``--p2p-no-dht``: mDNS only)."""
    poison = log_dir / "no-llama"
    (poison / "llama_cpp").mkdir(parents=True, exist_ok=True)
    (poison / "llama_cpp" / "__init__.py").write_text("raise ImportError('the lite client must not import llama_cpp')\n")
    env = {"TOKEN": token, "PYTHONPATH": str(poison)}
    return _start(topo, i, log_dir, name, ["client", *(flags or ("--p2p-no-dht",))], env, "localp2p client ready")


def peer_id_for(state_dir: pathlib.Path) -> str:
    """Create the server identity a ``run --state-dir state_dir`` will use; its peer id."""
    state_dir.mkdir(parents=True, exist_ok=True)
    key_pair = load_or_create_identity(state_dir / "server-identity.key")
    return str(ID.from_pubkey(key_pair.public_key))


def wait_models(client: Node, servers: int, limit: float = DISCOVERY_LIMIT, **others: int) -> dict[str, Any]:
    """Wait until the client's /v1/models counts ``servers`` servers for MODEL (and ``others``:
    model -> count, for the models besides it); the answer."""
    deadline = time.monotonic() + limit
    body: dict[str, Any] = {}
    want = sorted({MODEL: servers, **others}.items())
    while time.monotonic() < deadline:
        body = client.http.get("/v1/models").json()
        if sorted((m["id"], m["servers"]) for m in body["data"]) == want:
            return body
        time.sleep(0.2)
    raise AssertionError(f"/v1/models never counted {want}: {body}\n{client.proc.stderr()[-3000:]}")


def chat_text(sdk: openai.OpenAI, **params: Any) -> str:
    reply = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=24, **params)  # type: ignore[arg-type]
    return reply.choices[0].message.content or ""


def streamed_text(sdk: openai.OpenAI, max_tokens: int = 24) -> str:
    stream = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=max_tokens, stream=True)  # type: ignore[arg-type]
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


@dataclass
class Mesh:
    topo: Topology
    client: Node
    servers: list[Node]  # the two serving MODEL
    peers: list[str]
    alias: Node  # the one serving ALIAS only
    alias_peer: str


def alias_models(log_dir: pathlib.Path) -> pathlib.Path:
    """A models dir with one YAML: ALIAS on the embedded model's file."""
    models = log_dir / "alias-models"
    models.mkdir(exist_ok=True)
    (models / "weights.gguf").symlink_to(embedded_model_path())
    (models / "alias.yaml").write_text(f"name: {ALIAS}\nparameters:\n  model: weights.gguf\n")
    return models


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    log_dir = tmp_path_factory.mktemp("mesh")
    token = new_token()
    with topology(3) as topo, contextlib.ExitStack() as stack:
        peers = [peer_id_for(log_dir / f"state-server{i}") for i in (1, 2)]
        alias_peer = peer_id_for(log_dir / "state-alias")
        servers = [start_server(topo, i, log_dir, token, f"server{i}", *(["--max-queue", str(QUEUE)] if i == 1 else [])) for i in (1, 2)]
        for server in servers:
            stack.callback(server.close)
        alias = start_server(topo, 0, log_dir, token, "alias", "--models-path", str(alias_models(log_dir)))
        stack.callback(alias.close)
        client = start_client(topo, 0, log_dir, token)
        stack.callback(client.close)
        wait_models(client, 2, **{ALIAS: 1})
        yield Mesh(topo, client, servers, peers, alias, alias_peer)


def test_client_imports_nothing_from_llama_cpp() -> None:
    code = (
        "import sys, localp2p.cli, localp2p.client.main, localp2p.client.app\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'backends', 'grpc')"
        " or m.startswith(('localp2p.llama', 'localp2p.server', 'localp2p.api', 'localp2p.worker')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_sdk_through_client_equals_server(mesh: Mesh) -> None:
    client, direct = mesh.client.sdk(), mesh.servers[0].sdk()
    # models: the union, with how many servers serve each
    listed = client.models.list()
    assert sorted(m.id for m in listed.data) == sorted([MODEL, ALIAS])
    assert mesh.client.http.get(f"/v1/models/{MODEL}").json()["servers"] == 2
    missing = mesh.client.http.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    # chat, streamed chat, completions, embeddings: byte-identical to a server's own answer
    assert chat_text(client) == chat_text(direct)
    assert streamed_text(client) == streamed_text(direct) == chat_text(direct)
    prompt = "The capital of France is"
    through = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16)
    straight = direct.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16)
    assert through.choices[0].text == straight.choices[0].text and through.choices[0].text
    e_through = client.embeddings.create(model=MODEL, input="hello mesh").data[0].embedding
    e_straight = direct.embeddings.create(model=MODEL, input="hello mesh").data[0].embedding
    assert e_through == e_straight and len(e_through) > 0
    # a model no server has: the servers' own error shape, with the parameter named
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)  # type: ignore[arg-type]
    assert refused.value.body["param"] == "model"  # type: ignore[index]
    # a bad request is the server's 400, passed through
    bad = mesh.client.http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "temperature": "hot"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature", bad.text


def test_eight_streams_spread_over_both_servers(mesh: Mesh) -> None:
    def forwarded() -> dict[str, int]:
        return {s["peer_id"]: s["requests_forwarded"] for s in mesh.client.p2p()["servers"]}

    def served(server: Node) -> int:
        clients = server.p2p()["clients"]
        return sum(c["requests_served"] for c in clients if c["role"] == "client")

    before, served_before = forwarded(), [served(s) for s in mesh.servers]
    sdk = mesh.client.sdk()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda _: streamed_text(sdk, max_tokens=16), range(8)))
    assert len(set(texts)) == 1 and texts[0]
    after = forwarded()
    counts = {peer: after[peer] - before.get(peer, 0) for peer in mesh.peers}
    assert sum(counts.values()) == 8 and all(n > 0 for n in counts.values()), counts
    # the servers count them too, as requests from the client
    assert [served(s) - b for s, b in zip(mesh.servers, served_before, strict=True)] == [counts[p] for p in mesh.peers]
    states = {s["peer_id"]: s for s in mesh.client.p2p()["servers"]}
    assert all(states[p]["online"] and states[p]["models"] == [MODEL] for p in mesh.peers), states


def _mesh_of(node: Node) -> dict[str, Any]:
    return dict(node.p2p()["mesh"])


def test_a_server_forwards_a_model_it_lacks(mesh: Mesh) -> None:
    server1 = mesh.servers[0]
    before = _mesh_of(server1)["requests_forwarded"]
    # server 1 has no ALIAS: the alias server answers, as it answers directly
    through = server1.sdk().chat.completions.create(model=ALIAS, messages=MESSAGES, temperature=0, max_tokens=16)  # type: ignore[arg-type]
    direct = mesh.alias.sdk().chat.completions.create(model=ALIAS, messages=MESSAGES, temperature=0, max_tokens=16)  # type: ignore[arg-type]
    assert through.choices[0].message.content == direct.choices[0].message.content and through.model == ALIAS
    assert _mesh_of(server1)["requests_forwarded"] == before + 1
    served = {c["peer_id"]: c["requests_served"] for c in mesh.alias.p2p()["clients"]}
    assert served.get(mesh.peers[0], 0) >= 1, served
    # and the other way: the alias server has no MODEL
    assert chat_text(mesh.alias.sdk()) == chat_text(server1.sdk())


def test_a_server_with_a_full_queue_forwards(mesh: Mesh) -> None:
    server1, server2 = mesh.servers
    before = _mesh_of(server1)["requests_forwarded"]
    expected = streamed_text(server2.sdk(), max_tokens=48)
    # server 1 has --max-queue QUEUE: one more request while QUEUE run goes to server 2
    sdk = server1.sdk()
    running = [
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=48, stream=True)  # type: ignore[arg-type]
        for _ in range(QUEUE)
    ]
    parts = [[next(iter(stream)).choices[0].delta.content or ""] for stream in running]  # each one is admitted
    assert _mesh_of(server1)["announcement"]["admitted"] == QUEUE
    assert streamed_text(sdk, max_tokens=48) == expected
    assert _mesh_of(server1)["requests_forwarded"] == before + 1
    for stream, part in zip(running, parts, strict=True):
        part += [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(part) == expected


def _cancelled(servers: list[Node]) -> int:
    """Requests the servers recorded as ended by their caller going away (499)."""
    return sum(1 for s in servers for r in s.http.get("/api/status").json()["recent_requests"] if r["status"] == 499)


def test_client_disconnect_cancels_the_generation(mesh: Mesh) -> None:
    before = _cancelled(mesh.servers)
    sdk = mesh.client.sdk()
    stream = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=2000, stream=True)  # type: ignore[arg-type]
    for _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    # The server that ran it ends it as a request whose caller went away (499), not a 2000-token run.
    deadline = time.monotonic() + 60
    while _cancelled(mesh.servers) == before:
        assert time.monotonic() < deadline, "no server recorded the request as cancelled"
        time.sleep(0.2)


def test_server_killed_requests_go_to_the_other(mesh: Mesh) -> None:
    sdk = mesh.client.sdk()
    # The victim is the server the client's choice would take next (fewest of its requests,
    # then peer id): the next request meets the dead server first and must fail over.
    states = [s for s in mesh.client.p2p()["servers"] if MODEL in s["models"]]
    victim = min(states, key=lambda s: (s["requests_forwarded"], s["peer_id"]))["peer_id"]
    survivor = next(i for i, p in enumerate(mesh.peers) if p != victim)
    expected = chat_text(mesh.servers[survivor].sdk())
    mesh.servers[mesh.peers.index(victim)].proc.kill()
    killed = time.monotonic()
    assert chat_text(sdk) == expected
    assert streamed_text(sdk) == expected
    # the killed server leaves /v1/models counts within 10 s of the kill
    wait_models(mesh.client, 1, limit=max(0.0, 10.0 - (time.monotonic() - killed)), **{ALIAS: 1})
    states = {s["peer_id"]: s for s in mesh.client.p2p()["servers"]}
    assert not states[victim]["online"] and states[mesh.peers[survivor]]["online"], states
    for _ in range(3):
        assert chat_text(sdk) == expected
