"""Issue 3 acceptance, loopback variants: p2p discovery, live worker set, token-gated tunnels.

Every process runs on this host; the namespace variants in test_p2p_netns.py put the
server and each worker on a separate network stack.
"""

from __future__ import annotations

import pathlib
import re
import time

import pytest
import trio

from localp2p.llama import devices
from localp2p.testing.cluster import (
    Server,
    new_token,
    p2p_server,
    p2p_state,
    p2p_worker,
    rpc_server_connections,
    wait_for_workers,
    worker_peer_id,
)

CHAT = {"messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}], "temperature": 0, "max_tokens": 48}


def _answer(server: Server) -> str:
    reply = server.http.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["choices"][0]["message"]["content"])


def _loopback_bootstrap(server: Server) -> str:
    return next(a for a in p2p_state(server)["node"]["addrs"] if a.startswith("/ip4/127.0.0.1/"))


def test_mdns_only(tmp_path: pathlib.Path, local_server: Server) -> None:
    token = new_token()
    workers = [p2p_worker(tmp_path, token, f"w{i}", "--p2p-no-dht") for i in (1, 2)]
    server = p2p_server(tmp_path, token, "--p2p-no-dht")
    try:
        state = wait_for_workers(server, [worker_peer_id(w) for w in workers])
        assert {w["source"] for w in state["workers"]} == {"mdns"}
        assert state["network_id"] and token not in str(state)
        served = [(d.name, d.kind) for d in devices.select(devices.list_devices())]
        for worker in state["workers"]:  # the devices each worker announced (issue 20)
            assert [(d["name"], d["kind"]) for d in worker["devices"]] == served, worker
            assert all(d["memory_total"] > 0 for d in worker["devices"]), worker
        assert all(f" devices={served[0][0]}({served[0][1]}," in w.stdout[0] for w in workers)
        assert _answer(server) == _answer(local_server)
    finally:
        server.close()
        for w in workers:
            w.stop()


def test_dht_only(tmp_path: pathlib.Path, local_server: Server) -> None:
    token = new_token()
    server = p2p_server(tmp_path, token, "--p2p-no-mdns")
    bootstrap = _loopback_bootstrap(server)
    workers = [p2p_worker(tmp_path, token, f"w{i}", "--p2p-no-mdns", "--p2p-bootstrap", bootstrap) for i in (1, 2)]
    try:
        state = wait_for_workers(server, [worker_peer_id(w) for w in workers])
        assert {w["source"] for w in state["workers"]} == {"dht"}
        assert _answer(server) == _answer(local_server)
    finally:
        server.close()
        for w in workers:
            w.stop()


def test_worker_joins_and_leaves_without_restart(tmp_path: pathlib.Path, local_server: Server) -> None:
    token = new_token()
    first = p2p_worker(tmp_path, token, "w1")
    server = p2p_server(tmp_path, token)
    second = None
    try:
        wait_for_workers(server, [worker_peer_id(first)])
        expected = _answer(local_server)
        assert _answer(server) == expected
        server_pid = server.proc.pid

        second = p2p_worker(tmp_path, token, "w2")
        state = wait_for_workers(server, [worker_peer_id(first), worker_peer_id(second)])
        assert all(w["layers"] > 0 for w in state["workers"])
        assert _answer(server) == expected
        assert server.proc.pid == server_pid and server.proc.popen.poll() is None
        sent = {w["peer_id"]: w["bytes_sent"] for w in p2p_state(server)["workers"]}
        assert all(n > 1_000_000 for n in sent.values()), sent  # weights went through both tunnels

        # Kill the second worker: dropped within 10 s, and the next request runs on the first.
        second_id = worker_peer_id(second)
        second.kill()
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 10:
            workers = {w["peer_id"]: w for w in p2p_state(server)["workers"]}
            if not workers[second_id]["online"]:
                break
            time.sleep(0.2)
        dropped_after = time.monotonic() - killed_at
        assert dropped_after < 10, f"not dropped after {dropped_after:.1f}s"
        wait_for_workers(server, [worker_peer_id(first)])
        assert _answer(server) == expected

        # Restart it with the same state dir: same peer id, taken in again.
        second = p2p_worker(tmp_path, token, "w2")
        assert worker_peer_id(second) == second_id
        wait_for_workers(server, [worker_peer_id(first), second_id])
        assert _answer(server) == expected
    finally:
        server.close()
        first.stop()
        if second is not None:
            second.stop()


def test_min_workers_waits_for_workers(tmp_path: pathlib.Path) -> None:
    token = new_token()
    workers = [p2p_worker(tmp_path, token, f"w{i}") for i in (1, 2)]
    server = p2p_server(tmp_path, token, "--min-workers", "2")
    try:
        log = server.proc.stderr()
        loads = [line for line in log.splitlines() if "model loaded" in line]
        assert loads and "on_workers=30" in loads[0], loads  # the first load already used both
        wait_for_workers(server, [worker_peer_id(w) for w in workers])
    finally:
        server.close()
        for w in workers:
            w.stop()


def test_worker_serves_one_server_at_a_time(tmp_path: pathlib.Path) -> None:
    token = new_token()
    worker = p2p_worker(tmp_path, token, "w1")
    first = p2p_server(tmp_path, token, name="first")
    second = None
    try:
        wait_for_workers(first, [worker_peer_id(worker)])
        second = p2p_server(tmp_path, token, name="second")
        deadline = time.monotonic() + 20
        states: list[str] = []
        while time.monotonic() < deadline:
            states = [w["state"] for w in p2p_state(second)["workers"]]
            if states == ["busy"]:
                break
            time.sleep(0.25)
        assert states == ["busy"], states
        assert p2p_state(second)["backend_rpc_servers"] == []
        assert second.chat("What is 2+2?", max_tokens=4).status_code == 200  # served locally, no hang
        # When the first server goes, the second takes the worker over.
        first.close()
        wait_for_workers(second, [worker_peer_id(worker)])
    finally:
        first.close()
        if second is not None:
            second.close()
        worker.stop()


def _rpc_port(worker_stderr: str) -> int:
    return int(re.search(r"endpoint\s+: 127\.0\.0\.1:(\d+)", worker_stderr).group(1))  # type: ignore[union-attr]


def _listeners(port: int) -> list[str]:
    """Local addresses listening on ``port`` (IPv4 and IPv6) from /proc/net/tcp*."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in pathlib.Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:
                found.append(address)
    return found


def test_rpc_server_listens_on_loopback_only(tmp_path: pathlib.Path) -> None:
    worker = p2p_worker(tmp_path, new_token(), "w1")
    try:
        port = _rpc_port(worker.stderr())
        assert _listeners(port) == ["0100007F"]  # 127.0.0.1, nothing else
    finally:
        worker.stop()


def test_wrong_token_and_unauthenticated_peers_get_nothing(tmp_path: pathlib.Path) -> None:
    """A peer with the wrong token, announcing itself on the right mDNS service, and a raw
    libp2p client that skips the proof: the honest worker's rpc-server sees nothing from
    them, and the server lists neither."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo
    from multiaddr import Multiaddr

    from localp2p.p2p.auth import AuthError
    from localp2p.p2p.network import P2PSettings, run_network
    from localp2p.p2p.node import open_node
    from localp2p.p2p.token import NetworkToken
    from localp2p.p2p.tunnel import TUNNEL_PROTOCOL

    token = new_token()
    honest = NetworkToken.parse(token)
    worker = p2p_worker(tmp_path, token, "honest")
    server = p2p_server(tmp_path, token)
    worker_id = worker_peer_id(worker)
    wait_for_workers(server, [worker_id])
    before = rpc_server_connections(worker)
    worker_addr = next(a for a in worker.stdout[0].split("addrs=")[1].split(",") if "/127.0.0.1/" in a)
    forged = NetworkToken.generate()
    forged = NetworkToken.parse(forged.encode())
    object.__setattr__(forged, "mdns_service", honest.mdns_service)  # same LAN service, wrong secret

    results: dict[str, object] = {}

    async def attack() -> None:
        settings = P2PSettings(token=forged, state_dir=tmp_path / "intruder", listen=("/ip4/127.0.0.1/tcp/0",), dht=False, name="intruder")
        async with trio.open_nursery() as nursery:
            network = await nursery.start(
                lambda task_status: run_network(settings, role="worker", hello={"name": "intruder"}, advertise=True, task_status=task_status)
            )
            results["intruder"] = str(network.node.peer_id)
            info = PeerInfo(ID.from_base58(worker_id), [Multiaddr(worker_addr.rsplit("/p2p/", 1)[0])])
            await network.node.connect(info)
            with pytest.raises(AuthError):
                await network.gate.authenticate(network.node, info.peer_id)
            # The raw client: no proof at all, straight to the tunnel and the ping protocol.
            async with open_node(create_new_key_pair()) as raw:
                await raw.connect(info)
                results["raw"] = str(raw.peer_id)
                for _ in range(3):
                    try:
                        stream = await raw.new_stream(info.peer_id, TUNNEL_PROTOCOL)
                        await stream.write(b"\x0e" + b"\x18" + b"\x00" * 7 + b"\x00" * 24)  # a ggml HELLO
                        results.setdefault("raw_reads", []).append(await stream.read(1))  # type: ignore[union-attr]
                    except Exception as exc:  # reset: what we expect
                        results.setdefault("raw_errors", []).append(type(exc).__name__)  # type: ignore[union-attr]
            # A raw TCP client speaking ggml-RPC at the worker's libp2p port: no Noise, no entry.
            host, port = worker_addr.split("/")[2], int(worker_addr.split("/")[4])
            raw_tcp = await trio.open_tcp_stream(host, port)
            with trio.move_on_after(3):
                await raw_tcp.send_all(b"\x0e" + (24).to_bytes(8, "little") + bytes(24))
                results["raw_tcp_reply"] = await raw_tcp.receive_some(4096)
            await raw_tcp.aclose()
            await trio.sleep(6)  # the server's mDNS browser has seen the intruder by now
            nursery.cancel_scope.cancel()

    try:
        trio.run(attack)
        assert results.get("raw_reads", []) in ([], [b""], [b""] * 3), results
        assert rpc_server_connections(worker) == before
        assert b"\x07\x00\x00" not in results.get("raw_tcp_reply", b"")  # never a HELLO answer
        listed = [w["peer_id"] for w in p2p_state(server)["workers"]]
        assert listed == [worker_id], listed
        assert "token proof failed" in server.proc.stderr() or "refused" in server.proc.stderr()
        assert server.chat("What is 2+2?", max_tokens=4).status_code == 200
    finally:
        server.close()
        worker.stop()


def test_token_is_generated_printed_and_checked(tmp_path: pathlib.Path) -> None:
    from localp2p.testing.cluster import LOCALP2P, Proc, free_port

    proc = Proc(["run", "--p2p", "--address", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "s")], tmp_path, "gen", {"P2P_TOKEN": "", "TOKEN": ""})
    try:
        token_line = proc.wait_line("lp2p1.", timeout=60).strip()
        command = proc.wait_line("localp2p worker p2p-llama-cpp-rpc", timeout=10).strip()
        assert command == f"TOKEN={token_line} localp2p worker p2p-llama-cpp-rpc"
    finally:
        proc.stop()
    assert "lp2p1." not in proc.stderr()  # the token is printed once, on stdout, never logged
    import subprocess

    bad = subprocess.run([*LOCALP2P, "run", "--p2p", "--p2ptoken", "lp2p1.AAAA"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("localp2p: error: network token:") and len(bad.stderr.strip().splitlines()) == 1
