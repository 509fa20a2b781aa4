"""Issue 18: a backend that cannot come back makes the supervisor FAILED, and a request
failing over gives up at once with the supervisor's last error instead of waiting out
--failover-timeout; the state leaves FAILED once a start serves again.

The fault is real: the model file is replaced by one that is not a GGUF file while the
server serves, then the backend is killed mid-stream; every restart's load fails until
the file is put back.
"""

from __future__ import annotations

import os
import pathlib
import signal
import time
from typing import Any

from localp2p.config import embedded_model_path
from localp2p.testing.cluster import Server, start_server

#: Generous: the request must not end by running out of it (it would take that long).
FAILOVER_TIMEOUT = 120
#: A request's wait for a ready backend (--ready-timeout): a new request while the backend is
#: FAILED must be refused long before it runs out.
READY_TIMEOUT = 120
#: The request must give up well before FAILOVER_TIMEOUT: a few failed starts on a 2-core machine.
GIVE_UP_WITHIN = 60.0
#: Events of a stream before the backend is killed: some text has reached the client.
KILL_AFTER_EVENTS = 5
#: Longest wait for the supervisor to serve again once the model file is back (its
#: backoff between tries grows to 10 s).
RECOVER_WITHIN = 120.0
STREAM_BODY = {"model": "m", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": True}


def _models(root: pathlib.Path) -> pathlib.Path:
    models = root / "models"
    models.mkdir()
    (models / "model.gguf").symlink_to(embedded_model_path())
    (models / "m.yaml").write_text("name: m\ncontext_size: 512\nparameters:\n  model: model.gguf\n")
    return models


def _wait_state(server: Server, state: str, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        status = server.status()
        if status["backend"]["state"] == state:
            return status
        assert time.monotonic() < deadline, f"not {state}: {status['backend']}"
        time.sleep(0.2)


def test_failing_over_request_gives_up_at_once_when_the_backend_cannot_restart(tmp_path: pathlib.Path) -> None:
    models = _models(tmp_path)
    model_file = models / "model.gguf"
    server = start_server(
        tmp_path,
        "--models-path",
        str(models),
        "--failover-timeout",
        str(FAILOVER_TIMEOUT),
        "--ready-timeout",
        str(READY_TIMEOUT),
    )
    try:
        backend = server.status()["backend"]
        assert backend["state"] == "ready" and backend["restarts"] == 0

        events: list[Any] = []
        killed_at = 0.0
        for event in server.stream_events("/v1/completions", STREAM_BODY):
            events.append(event)
            if len(events) == KILL_AFTER_EVENTS:
                model_file.unlink()  # the link only: the embedded model itself is untouched
                model_file.write_text("this is not a model\n")
                os.kill(backend["pid"], signal.SIGKILL)
                killed_at = time.monotonic()
        gave_up_after = time.monotonic() - killed_at

        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert len(errors) == 1, events[-3:]
        error = errors[0]["error"]
        assert error["code"] == "backend_failed", error
        assert "its restarts keep failing" in error["message"], error
        assert "not a GGUF model file" in error["message"], error
        assert events[-1] == "[DONE]"
        assert gave_up_after < GIVE_UP_WITHIN, (gave_up_after, error)

        status = server.status()["backend"]
        assert status["state"] == "failed" and not status["ready"], status
        assert "not a GGUF model file" in status["last_error"]
        readyz = server.http.get("/readyz")
        assert readyz.status_code == 503 and readyz.json()["status"] == "failed", readyz.text
        assert "backend is down: its starts keep failing" in server.proc.stderr()

        # A new request is told at once, not after --ready-timeout (READY_TIMEOUT s).
        asked_at = time.monotonic()
        refused = server.chat("What is 2+2?", model="m", max_tokens=8)
        assert refused.status_code == 503, refused.text
        assert "failed" in refused.json()["error"]["message"] and "not a GGUF model file" in refused.json()["error"]["message"]
        assert time.monotonic() - asked_at < GIVE_UP_WITHIN

        model_file.unlink()
        model_file.symlink_to(embedded_model_path())
        status = _wait_state(server, "ready", RECOVER_WITHIN)
        assert status["backend"]["restarts"] >= 4  # the crash and three failed starts at least
        reply = server.chat("What is 2+2?", model="m", max_tokens=8)
        assert reply.status_code == 200, reply.text
        assert "Traceback" not in server.proc.stderr()
    finally:
        server.close()
