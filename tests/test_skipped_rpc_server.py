"""An rpc-server that was down when the backend started is taken in once it answers.

A backend (re)started while a worker's rpc-server is down for a moment (its worker is
restarting it: after a crash, or the tensor-cache guard) skips that rpc-server. The
supervisor probes the skipped ones it still wants and reloads once one answers
(localp2p/server/supervisor.py, ``_watch_skipped``); without that the backend would run without
the worker until something else changed. Shown here in static mode: one of the two
``LLAMACPP_GRPC_SERVERS`` is started only after the server is ready.
"""

from __future__ import annotations

import pathlib
import time

from localp2p.testing.cluster import free_port, start_server, start_worker

#: Bound on waiting for the reload that takes the late rpc-server in (probes back off to 30 s).
TAKE_IN_LIMIT = 120.0


def test_rpc_server_down_at_load_is_taken_in_when_it_answers(tmp_path: pathlib.Path) -> None:
    early, e1 = start_worker(tmp_path, name="early")
    late_port = free_port()
    e2 = f"127.0.0.1:{late_port}"
    server = start_server(tmp_path, rpc_servers=[e1, e2], name="server")
    late = None
    try:
        devices = {d["endpoint"]: d for d in server.status()["devices"]}
        assert devices[e1]["used"] and not devices[e2]["used"] and devices[e2]["skipped_reason"], devices
        reply = server.chat("What is 2+2?", max_tokens=16)
        assert reply.status_code == 200, reply.text
        reference = reply.json()["choices"][0]["message"]["content"]

        late, _ = start_worker(tmp_path, late_port, name="late")
        deadline = time.monotonic() + TAKE_IN_LIMIT
        status = server.status()
        while time.monotonic() < deadline:
            status = server.status()
            devices = {d["endpoint"]: d for d in status["devices"]}
            if status["backend"]["state"] == "ready" and e2 in devices and devices[e2]["used"] and devices[e2]["layers"] > 0:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the late rpc-server was never taken in: {status}\n{server.proc.stderr()[-3000:]}")
        assert "a skipped rpc-server answers again" in server.proc.stderr()
        assert devices[e1]["used"] and devices[e1]["layers"] > 0, devices
        assert status["backend"]["restarts"] == 0  # a planned reload, not a crash

        reply = server.chat("What is 2+2?", max_tokens=16)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == reference  # where layers run changes nothing
    finally:
        server.close()
        early.stop()
        if late is not None:
            late.stop()
