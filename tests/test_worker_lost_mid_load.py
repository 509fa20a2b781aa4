"""A worker's rpc-server lost in the middle of a model (re)load (crash, or stopped by its cache
disk guard) must not end the server: the backend is restarted and the model loaded again."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import time

import httpx
from test_tensor_cache import CACHE_SHAPE

from localp2p.genmodel import write_model
from localp2p.testing.cluster import Proc, Server, rpc_server_child, start_server, start_worker

#: Big enough that the load over the rpc-server lasts a moment on a 2-core machine.
MODEL_SHAPE = dataclasses.replace(CACHE_SHAPE, layers=6)
#: Seconds between /api/status polls while waiting for the reload to be under way.
POLL = 0.02
#: Longest wait for a state of the server (start, reload, recovery).
WAIT = 120.0
#: Reloads tried before one is caught with weights flowing (each lasts well under a second here).
ATTEMPTS = 10


def _rpc_server_pid(worker: Proc) -> int:
    return rpc_server_child(worker)[0]


def _caught_mid_reload(server: Server, deadline: float) -> bool:
    """Kill the backend (it restarts and loads the model again); True once weights are seen
    flowing to the rpc-server, False when the reload ended between two polls (a warm machine
    loads this model in half a second)."""
    old_backend = server.status()["backend"]["pid"]
    os.kill(old_backend, signal.SIGKILL)
    while True:
        assert time.monotonic() < deadline, f"no reload seen: {server.status()}"
        status = server.status()
        backend, progress = status["backend"], status["load_progress"]
        if backend["pid"] != old_backend and progress["active"] and progress["fraction"] > 0:
            return True
        if backend["pid"] != old_backend and backend["state"] == "ready":
            return False
        time.sleep(POLL)


def test_rpc_server_lost_mid_reload_does_not_end_the_server(tmp_path: pathlib.Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_model(models / "random.gguf", MODEL_SHAPE)
    (models / "random.yaml").write_text("name: random\ncontext_size: 512\nparameters:\n  model: random.gguf\n")
    worker, endpoint = start_worker(tmp_path, None, name="mid-load-worker")
    server = start_server(tmp_path, "--models-path", str(models), rpc_servers=[endpoint], name="mid-load-server")
    try:
        reference = server.chat("hello", max_tokens=8)
        assert reference.status_code == 200, reference.text
        deadline = time.monotonic() + WAIT
        for _ in range(ATTEMPTS):
            if _caught_mid_reload(server, deadline):
                break
        else:
            raise AssertionError(f"{ATTEMPTS} reloads each ended between two polls: {server.status()}")
        os.kill(_rpc_server_pid(worker), signal.SIGKILL)

        while True:
            assert server.proc.popen.poll() is None, f"the server exited:\n{server.proc.stderr()[-3000:]}"
            assert time.monotonic() < deadline + WAIT, f"never recovered: {server.status()}"
            try:
                reply = server.chat("hello", max_tokens=8)
            except httpx.HTTPError:
                reply = None
            if reply is not None and reply.status_code == 200:
                break
            time.sleep(0.5)
        assert reply.json()["choices"][0]["message"]["content"] == reference.json()["choices"][0]["message"]["content"]
        assert server.status()["backend"]["restarts"] >= 2
    finally:
        server.close()
        worker.stop()
