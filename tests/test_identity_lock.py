"""Issue 13 (A): two processes sharing a state dir never share a peer id.

Each process locks (``flock``) the identity file it uses; a second process finds it
held and claims a separate identity file in the same dir, kept for reuse. flock locks
belong to an open file description, so two claims in one process conflict like two
processes do: the fast tests below need no second process, the others use real ones.
"""

from __future__ import annotations

import os
import pathlib
import signal
import stat
import subprocess
import sys

from localp2p.p2p.identity import claim_identity, identity_slot_path
from localp2p.testing.cluster import (
    Proc,
    new_token,
    p2p_server,
    p2p_state,
    wait_for_workers,
    worker_peer_id,
)

#: A child process that claims the identity at argv[1], prints "HELD <path> <peer id>", then waits.
HOLDER = (
    "import pathlib, sys\n"
    "from localp2p.p2p.identity import claim_identity\n"
    "claim = claim_identity(pathlib.Path(sys.argv[1]))\n"
    "print('HELD', claim.path, claim.peer_id, flush=True)\n"
    "sys.stdin.read()\n"
)


def test_a_held_identity_is_not_shared_and_slots_are_reused(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state" / "worker-identity.key"
    first = claim_identity(path)
    second = claim_identity(path)
    assert first.path == path and first.created
    assert second.path == identity_slot_path(path, 1) == path.with_name("worker-identity-2.key")
    assert first.peer_id != second.peer_id

    third = claim_identity(path)
    assert third.path == path.with_name("worker-identity-3.key")
    assert len({first.peer_id, second.peer_id, third.peer_id}) == 3

    # a released slot is the next one handed out, with the identity it had
    second_id = second.peer_id
    second.release()
    second.release()  # idempotent
    again = claim_identity(path)
    assert again.path == identity_slot_path(path, 1) and not again.created
    assert again.peer_id == second_id

    # a lone process (the first released) always gets the first file: its peer id is stable
    first_id = first.peer_id
    first.release()
    with claim_identity(path) as restarted:
        assert restarted.path == path and restarted.peer_id == first_id
    for claim in (third, again):
        claim.release()

    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["worker-identity-2.key", "worker-identity-3.key", "worker-identity.key"]  # no temp files
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in path.parent.iterdir())


def test_the_lock_dies_with_its_process(tmp_path: pathlib.Path) -> None:
    """A holder killed with SIGKILL leaves no stale lock: its identity is free at once."""
    path = tmp_path / "server-identity.key"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        line = ""
        while not line.startswith("HELD "):  # structlog's lines go to stdout here too
            line = holder.stdout.readline()
            assert line, "the holder exited"
        _, held_path, held_id = line.split()
        assert held_path == str(path)
        with claim_identity(path) as other:  # held by a live process: a separate identity
            assert other.path == identity_slot_path(path, 1)
            assert str(other.peer_id) != held_id
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        with claim_identity(path) as reclaimed:
            assert reclaimed.path == path and str(reclaimed.peer_id) == held_id
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_two_workers_with_the_default_state_dir_get_two_peer_ids(tmp_path: pathlib.Path) -> None:
    """The issue's case: two `worker p2p-llama-cpp-rpc` of one user, no --state-dir, one server."""
    token = new_token()
    home = tmp_path / "home"
    home.mkdir()
    # Empty values make default_state_dir() fall back to ~/.local/state/localp2p (under this HOME).
    env = {"TOKEN": token, "HOME": str(home), "XDG_STATE_HOME": "", "LOCALP2P_STATE_DIR": ""}
    workers = [
        Proc(["worker", "p2p-llama-cpp-rpc", "--threads", "1", "--node-name", f"w{i}"], tmp_path, f"w{i}", env)
        for i in (1, 2)
    ]
    server = None
    try:
        for worker in workers:
            worker.ready_line = worker.wait_line("localp2p worker ready")
        peer_ids = [worker_peer_id(w) for w in workers]
        assert peer_ids[0] != peer_ids[1]
        state_dir = home / ".local" / "state" / "localp2p"
        assert sorted(p.name for p in state_dir.iterdir()) == ["worker-identity-2.key", "worker-identity.key"]
        notes = [line for w in workers for line in w.stderr().splitlines() if "identity file in use" in line]
        assert len(notes) == 1 and "worker-identity-2.key" in notes[0], notes

        server = p2p_server(tmp_path, token)
        state = wait_for_workers(server, peer_ids)
        online = [w["peer_id"] for w in state["workers"] if w["online"]]
        assert sorted(online) == sorted(peer_ids)
        assert len(p2p_state(server)["workers"]) == 2
    finally:
        if server is not None:
            server.close()
        for worker in workers:
            worker.stop()
