"""Issue 6 acceptance, p2p on loopback: a worker killed mid-stream does not break the stream.

The dead worker's tunnel stays listed until liveness drops it (up to 10 s); the restarted
backend's HELLO through that tunnel must fail fast, so the generation continues on the
worker left instead of waiting for the drop.
"""

from __future__ import annotations

import pathlib

from test_static_faults import CONTINUED, FAILING_OVER, STREAM_BODY, _errors, _failover_lines, _field, _stream_and_kill

from localp2p.testing.cluster import new_token, p2p_server, p2p_worker, stream_text, wait_for_workers, worker_peer_id


def test_stream_continues_when_a_p2p_worker_dies(tmp_path: pathlib.Path) -> None:
    token = new_token()
    first = p2p_worker(tmp_path, token, "w1")
    second = p2p_worker(tmp_path, token, "w2")
    server = p2p_server(tmp_path, token)
    try:
        state = wait_for_workers(server, [worker_peer_id(first), worker_peer_id(second)])
        assert all(w["layers"] > 0 for w in state["workers"])
        reference, _ = stream_text(server.stream_events("/v1/completions", STREAM_BODY))

        text, events = _stream_and_kill(server, second.kill)
        assert not _errors(events), _errors(events)
        assert events[-1] == "[DONE]"
        assert text == reference
        (failed,) = _failover_lines(server, FAILING_OVER)
        assert _field(failed, "tokens_so_far") > 0
        (continued,) = _failover_lines(server, CONTINUED)
        print(f"\npause: {_field(continued, 'pause_s')} s")
        assert server.proc.popen.poll() is None
        assert "Traceback" not in server.proc.stderr()

        # Liveness drops the dead worker; the service goes on with the one left.
        wait_for_workers(server, [worker_peer_id(first)])
        reply = server.chat("What is 2+2?", max_tokens=8)
        assert reply.status_code == 200, reply.text
    finally:
        server.close()
        first.stop()
        second.stop()
