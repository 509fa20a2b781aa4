"""Issue 5: Prometheus metrics at /metrics, recent requests and model-load progress in /api/status.

One server on one static worker (so the weights really stream over llama.cpp's RPC).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from localp2p.testing.cluster import Proc, Server, start_server, start_worker, stream_text

RECENT_FIELDS = {
    "id",
    "endpoint",
    "model",
    "status",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "duration_ms",
    "tokens_per_second",
    "time",
}


@pytest.fixture(scope="module")
def cluster(log_dir: pathlib.Path) -> Iterator[tuple[Server, Proc, str]]:
    worker, endpoint = start_worker(log_dir, name="metrics-worker")
    server = start_server(log_dir, rpc_servers=[endpoint], name="metrics-server")
    yield server, worker, endpoint
    server.close()
    worker.stop()


def samples(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    response = server.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_chat_request_is_counted(cluster: tuple[Server, Proc, str]) -> None:
    server, _, _ = cluster
    before = samples(server)
    reply = server.chat("Name a colour.", max_tokens=8)
    assert reply.status_code == 200, reply.text
    usage = reply.json()["usage"]
    after = samples(server)

    assert value(after, "localp2p_requests_total", endpoint="/v1/chat/completions", status="200") == (
        value(before, "localp2p_requests_total", endpoint="/v1/chat/completions", status="200") + 1
    )
    assert value(after, "localp2p_completion_tokens_total") - value(before, "localp2p_completion_tokens_total") == usage[
        "completion_tokens"
    ] > 0
    assert value(after, "localp2p_prompt_tokens_total") - value(before, "localp2p_prompt_tokens_total") == usage["prompt_tokens"]
    assert value(after, "localp2p_time_to_first_token_seconds_count") >= 1
    assert value(after, "localp2p_time_to_first_token_seconds_sum") > 0
    assert value(after, "localp2p_time_per_output_token_seconds_count") >= 1
    # Read at scrape time from their owners.
    assert value(after, "localp2p_backend_ready") == 1.0
    assert value(after, "localp2p_workers_live") == 1.0
    assert value(after, "localp2p_model_load_seconds") > 0
    assert ("localp2p_backend_restarts_total", ()) in after
    # A request refused by validation is counted under its route and status.
    bad = server.http.post("/v1/chat/completions", json={"messages": "not a list"})
    assert bad.status_code == 400
    assert value(samples(server), "localp2p_requests_total", endpoint="/v1/chat/completions", status="400") >= 1


def test_recent_requests(cluster: tuple[Server, Proc, str]) -> None:
    server, _, _ = cluster
    text, events = stream_text(
        server.stream_events("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0})
    )
    assert text and events[-1] == "[DONE]"
    reply = server.chat("What is 2+2?", max_tokens=5, model="no-such-model")
    assert reply.status_code == 404

    recent = server.status()["recent_requests"]
    assert 2 <= len(recent) <= 20
    missing, streamed = recent[0], recent[1]  # newest first
    assert set(streamed) == RECENT_FIELDS and set(missing) == RECENT_FIELDS
    assert missing["endpoint"] == "/v1/chat/completions" and missing["status"] == 404
    assert missing["model"] == "no-such-model" and missing["completion_tokens"] is None
    assert streamed["endpoint"] == "/v1/completions" and streamed["status"] == 200 and streamed["stream"] is True
    assert streamed["model"] == server.status()["model"]
    assert streamed["completion_tokens"] == 6 and streamed["prompt_tokens"] > 0
    assert 0 < streamed["ttft_ms"] <= streamed["duration_ms"]
    assert streamed["tokens_per_second"] > 0
    assert streamed["time"] >= missing["time"] - 60 and streamed["time"] <= missing["time"]
    assert re.fullmatch(r"[0-9a-f]{32}", streamed["id"])
    # Polling /api/status and /metrics is not an inference request: it is not listed.
    assert all(r["endpoint"].startswith("/v1/") for r in recent)


def test_load_progress(cluster: tuple[Server, Proc, str]) -> None:
    server, _, endpoint = cluster
    status = server.status()
    assert any(d["endpoint"] == endpoint and d["layers"] > 0 for d in status["devices"])
    progress = status["load_progress"]
    assert set(progress) == {"active", "fraction", "bytes_sent", "bytes_total", "rate_bytes_per_s", "eta_s", "from_cache", "network_bytes", "weights"}
    assert progress["weights"] == {}  # a static rpc-server is not a p2p worker: nothing fetched before the load
    assert progress["active"] is False
    assert progress["fraction"] == 1.0
    assert progress["bytes_total"] > 10 << 20  # the embedded model is ~100 MB
    assert progress["bytes_sent"] == progress["bytes_total"]
    assert progress["rate_bytes_per_s"] > 0
    assert progress["from_cache"] is None
    assert value(samples(server), "localp2p_model_load_progress") == 1.0

    # The log shows the load: a line when it starts and one with its totals when done.
    log = server.proc.stderr()
    assert "loading model" in log
    done = [line for line in log.splitlines() if "model loaded" in line and "percent=100.0" in line]
    assert done, log[-3000:]
    total_mib = float(re.search(r"mib=\S*?/(\d+\.\d)", done[-1]).group(1))  # type: ignore[union-attr]
    assert total_mib == round(progress["bytes_total"] / 2**20, 1)
    # Lines logged while the weights streamed (if the load took long enough) rise towards 100.
    percents = [float(m.group(1)) for m in re.finditer(r"loading model .*?percent=(\d+\.\d)", log)]
    assert percents == sorted(percents) and all(0 <= p <= 100 for p in percents)


def test_tunnel_bytes_are_read_from_the_worker_set() -> None:
    """The per-peer tunnel series come from the worker set's own counters at scrape time."""
    from types import SimpleNamespace

    from localp2p.config import load_models
    from localp2p.metrics import Metrics
    from localp2p.server.supervisor import BackendSupervisor
    from localp2p.server.worker_set import ONLINE, Worker, WorkerSet

    workers = WorkerSet()
    alive = workers.upsert(Worker(peer_id="12D3KooWalive", state=ONLINE, tunnel_port=40001))
    workers.upsert(Worker(peer_id="12D3KooWgone", state="offline"))
    state = SimpleNamespace(supervisor=BackendSupervisor(load_models(None)), workers=workers)
    metrics = Metrics(state)

    alive.stats.bytes_sent, alive.stats.bytes_received = 1234, 56
    first = metrics.exposition().decode()
    assert 'localp2p_tunnel_bytes_sent_total{peer="12D3KooWalive"} 1234.0' in first
    assert 'localp2p_tunnel_bytes_received_total{peer="12D3KooWalive"} 56.0' in first
    assert 'localp2p_tunnel_bytes_sent_total{peer="12D3KooWgone"} 0.0' in first
    assert "localp2p_workers_live 1.0" in first
    assert "localp2p_backend_ready 0.0" in first

    alive.stats.bytes_sent += 1000  # no copy is kept: the next scrape sees the new count
    assert 'localp2p_tunnel_bytes_sent_total{peer="12D3KooWalive"} 2234.0' in metrics.exposition().decode()
