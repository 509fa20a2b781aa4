"""Issue 19, item 8: structured output over workers and through failover.

A JSON-schema-constrained chat streams over two rpc-servers; one is killed mid-stream. The
continued run replays the tokens already produced through the sampler, so the grammar's
state is exactly the first run's (it is not restarted): the text goes on where it stopped,
equals the uninterrupted run's, parses and validates against the schema.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jsonschema
from test_static_faults import CONTINUED, KILL_AFTER_EVENTS, _errors, _failover_lines

from localp2p.testing.cluster import Server, start_server, start_worker, stream_text

SCHEMA = {
    "type": "object",
    "properties": {"duties": {"type": "array", "items": {"type": "string"}, "minItems": 12, "maxItems": 12}},
    "required": ["duties"],
}
BODY = {
    "messages": [{"role": "user", "content": "List twelve duties of a lighthouse keeper, as JSON."}],
    "temperature": 0,
    "max_tokens": 400,
    "response_format": {"type": "json_schema", "json_schema": {"name": "duties", "schema": SCHEMA, "strict": True}},
}


def _stream(server: Server, kill: Any = None) -> tuple[str, list[Any]]:
    events: list[Any] = []
    for event in server.stream_events("/v1/chat/completions", BODY):
        events.append(event)
        if kill is not None and len(events) == KILL_AFTER_EVENTS:
            kill()
    return stream_text(iter(events))[0], events


def test_json_schema_stream_keeps_its_grammar_through_failover(tmp_path: pathlib.Path) -> None:
    w1, e1 = start_worker(tmp_path, name="w1")
    w2, e2 = start_worker(tmp_path, name="w2")
    server = start_server(tmp_path, "--parallel", "1", rpc_servers=[e1, e2])
    try:
        reference, events = _stream(server)
        assert not _errors(events)
        jsonschema.validate(json.loads(reference), SCHEMA)

        text, events = _stream(server, kill=w2.kill)
        assert not _errors(events), _errors(events)
        assert events[-1] == "[DONE]"
        assert len(_failover_lines(server, CONTINUED)) == 1  # it did fail over mid-stream
        assert text == reference
        jsonschema.validate(json.loads(text), SCHEMA)
    finally:
        server.close()
        w1.stop()
        w2.stop()
