"""Issue 15: the mesh flags' bad input is one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess

import pytest

from localp2p.status import render
from localp2p.testing.cluster import LOCALP2P, new_token

PEER = "12D3KooWQU8i1RiXwopPhwydhLTYVLwMs9ZKDARnBae5hc2Anufq"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["client"], "a client needs the network token"),
        (["run", "--delegate-to", PEER], "--delegate-to needs --p2p"),
        (["run", "--allow-peer", PEER], "--allow-peer needs --p2p"),
        (["run", "--p2p", "--delegate-to", "xyz"], "--delegate-to: not a peer id: 'xyz'"),
        (["run", "--p2p", "--deny-peer", "12D3KooWnot-a-peer"], "--deny-peer: not a peer id"),
        (["run", "--p2p", "--fallback-to-local"], "--fallback-to-local needs --delegate-to"),
        (["run", "--p2p", "--delegate-to", PEER, "--delegate-timeout", "0"], "--delegate-timeout: must be more than 0 seconds"),
        (["client", "--address", "nowhere"], "--address: expected HOST:PORT"),
    ],
)
def test_bad_mesh_flags_are_one_line(args: list[str], needle: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    token = new_token()
    if args[0] == "run":
        args = [*args, "--p2ptoken", token] if "--p2p" in args else args
    elif "--address" in args:
        env["TOKEN"] = token
    out = subprocess.run([*LOCALP2P, *args], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_status_lists_servers_and_clients() -> None:
    data = {
        "url": "http://127.0.0.1:8080",
        "status": {"model": "m", "models": ["m"], "backend": {"state": "ready"}, "recent_requests": []},
        "p2p": {
            "network_id": "net",
            "node": {"peer_id": PEER},
            "workers": [],
            "servers": [{"peer_id": PEER, "name": "box-a", "online": True, "models": ["m", "n"], "admitted": 2, "requests_forwarded": 5}],
            "clients": [{"peer_id": PEER, "name": "laptop", "role": "client", "requests_served": 3, "requests_in_flight": 1, "admitted": False}],
        },
    }
    text = render(data)
    server = next(line for line in text.splitlines() if "box-a" in line)
    assert "online" in server and "m, n" in server and "2 queued or running" in server and "5 sent there" in server, text
    client = next(line for line in text.splitlines() if "laptop" in line)
    assert "client" in client and "3 served" in client and "refused by the firewall" in client, text
    assert "servers:" in text and "clients:" in text
