"""`localp2p status`: a real subprocess asking a real server over HTTP."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest

from localp2p.config import EMBEDDED_MODEL_NAME
from localp2p.status import render
from localp2p.testing.cluster import LOCALP2P, Server, free_port


def status(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ADDRESS", "API_KEY")}
    return subprocess.run([*LOCALP2P, "status", *args], capture_output=True, text=True, env=env, timeout=60)


def address_of(server: Server) -> str:
    return server.base_url.removeprefix("http://")


def test_status_of_a_running_server(local_server: Server) -> None:
    out = status("--address", address_of(local_server))
    assert out.returncode == 0, out.stderr
    assert f"localp2p server at {local_server.base_url}" in out.stdout
    assert f"model:    {EMBEDDED_MODEL_NAME}" in out.stdout
    backend = local_server.status()["backend"]
    assert f"backend:  ready, pid {backend['pid']}" in out.stdout
    assert "p2p:" not in out.stdout  # this server is not in p2p mode (/api/p2p is 404)


def test_status_json_is_the_servers_own_answer(local_server: Server) -> None:
    out = status("--address", address_of(local_server), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["url"] == local_server.base_url
    assert data["p2p"] is None
    assert data["status"]["model"] == EMBEDDED_MODEL_NAME
    assert data["status"]["backend"]["pid"] == local_server.status()["backend"]["pid"]


def test_no_server_is_one_line_and_exit_1() -> None:
    port = free_port()
    out = status("--address", f"127.0.0.1:{port}")
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"localp2p: error: no localp2p server answers at http://127.0.0.1:{port}: ")
    assert "Traceback" not in out.stderr


class _KeyedHandler(http.server.BaseHTTPRequestHandler):
    """A server that wants ``Authorization: Bearer sesame`` (to exercise --api-key end to end)."""

    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        auth = self.headers.get("Authorization")
        type(self).seen.append(auth)
        if auth != "Bearer sesame":
            body, code = {"error": {"message": "invalid api key", "type": "invalid_request_error"}}, 401
        elif self.path == "/api/status":
            body, code = {"model": "m", "backend": {"state": "ready", "pid": 1, "restarts": 0}}, 200
        else:
            body, code = {"error": {"message": "p2p mode is off"}}, 404
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def keyed_server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KeyedHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _KeyedHandler.seen.clear()
    yield f"127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_api_key_needed_and_sent(keyed_server: str) -> None:
    refused = status("--address", keyed_server)
    assert refused.returncode == 1
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "an API key is needed" in refused.stderr and "Traceback" not in refused.stderr

    wrong = status("--address", keyed_server, "--api-key", "wrong")
    assert wrong.returncode == 1 and "the API key was refused" in wrong.stderr

    ok = status("--address", keyed_server, "--api-key", "sesame")
    assert ok.returncode == 0, ok.stderr
    assert "backend:  ready, pid 1" in ok.stdout
    assert _KeyedHandler.seen[-2:] == ["Bearer sesame", "Bearer sesame"]


def test_render_shows_workers_load_progress_and_recent_requests() -> None:
    """The fields of p2p mode and of newer servers are printed when present."""
    peer = "12D3KooWAbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcdefXYZ"
    data = {
        "url": "http://127.0.0.1:8080",
        "status": {
            "model": "chat",
            "models": ["chat", "other"],
            "backend": {"state": "loading", "pid": 42, "restarts": 2, "last_error": "worker went away", "load_seconds": 0},
            "layers": {"total": 31, "local": 11},
            "devices": [{"endpoint": "127.0.0.1:4000", "used": True, "layers": 20, "memory_free": 2 << 30, "memory_total": 4 << 30}],
            "load_progress": {"active": True, "fraction": 0.5, "bytes_sent": 50 << 20, "bytes_total": 100 << 20, "rate_bytes_per_s": 10 << 20, "eta_s": 5, "from_cache": False},
            "recent_requests": [
                {"id": "r1", "endpoint": "/v1/chat/completions", "model": "chat", "status": 200, "stream": True, "prompt_tokens": 12,
                 "completion_tokens": 30, "ttft_ms": 120.0, "duration_ms": 1500.0, "tokens_per_second": 21.4, "time": 1_700_000_000.0},
            ],
        },
        "p2p": {
            "network_id": "3f2a9c0d11b4e7a2",
            "node": {"peer_id": peer},
            "workers": [{"peer_id": peer, "name": "box-b", "state": "online", "online": True, "memory_free": 1 << 30,
                         "memory_total": 2 << 30, "layers": 20, "bytes_sent": 3 << 20, "bytes_received": 1 << 10,
                         "devices": [{"name": "CUDA0", "kind": "GPU"}, {"name": "CPU", "kind": "CPU"}]}],
        },
    }
    text = render(data)
    assert "model:    chat (also: other)" in text
    assert "backend:  loading, pid 42, 2 restart(s)" in text and "last error: worker went away" in text
    assert "layers:   31 total, 11 on this machine" in text
    assert "127.0.0.1:4000  used  20 layers  2.0 GiB free of 4.0 GiB" in text
    assert "loading:  50%, 50.0 MiB of 100.0 MiB at 10.0 MiB/s, about 5 s left" in text
    assert "12D3Ko..defXYZ" in text and "box-b" in text and "sent 3.0 MiB" in text and "received 1.0 KiB" in text
    assert "1.0 GiB free of 2.0 GiB  CUDA0 GPU+CPU  20 layers" in text
    assert "/v1/chat/completions" in text and "12+30 tok" in text and "21.4 tok/s" in text and "ttft 120 ms" in text
    # And an older server without those fields: nothing invented.
    bare = render({"url": "u", "status": {"model": "m", "backend": {"state": "ready"}}, "p2p": None})
    assert "recent requests" not in bare and "loading:" not in bare and "workers" not in bare
