"""Issue 15: the mesh flags' bad input is one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess

import pytest

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
