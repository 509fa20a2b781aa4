"""Issue 19: ``GET /v1/models/{id}`` and the Responses API (``POST /v1/responses``), through the openai SDK.

Real server, real model: ``models.retrieve``, ``responses.create`` whole and streamed
(the raw event sequence and the SDK's own stream helper), ``instructions``,
``max_output_tokens``, ``previous_response_id`` (kept in memory) and ``responses.retrieve``,
and a 400 naming the field for what the Responses API here does not do.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from localp2p.testing.cluster import Server

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def client(local_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=local_server.base_url + "/v1", api_key="unused", max_retries=0)


def test_models_retrieve(client: openai.OpenAI) -> None:
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "localp2p")
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-17")
    assert missing.value.code == "model_not_found" and missing.value.param == "model" and "gpt-17" in str(missing.value)


def test_create_whole(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="What is 2+2?", temperature=0, max_output_tokens=24)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert "4" in response.output_text
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert response.usage is not None and 0 < response.usage.output_tokens <= 24 and response.usage.input_tokens > 0


def _chat(client: openai.OpenAI, messages: Any, max_tokens: int) -> tuple[str, int]:
    """The text and prompt size of the same conversation asked as a chat completion (temperature 0)."""
    chat = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens)
    assert chat.usage is not None
    return chat.choices[0].message.content or "", chat.usage.prompt_tokens


def test_input_as_message_items(client: openai.OpenAI) -> None:
    """Message items (a string or input_text parts) are the chat messages of the same conversation."""
    items: Any = [
        {"role": "developer", "content": "You are terse."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is "}, {"type": "input_text", "text": "2+2?"}]},
    ]
    response = client.responses.create(model=MODEL, input=items, temperature=0, max_output_tokens=24)
    same = _chat(client, [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}], 24)
    assert response.usage is not None and (response.output_text, response.usage.input_tokens) == same


def test_instructions_are_the_system_message(client: openai.OpenAI) -> None:
    instructions = "You are a pirate. Answer like a pirate."
    response = client.responses.create(model=MODEL, input="Hello", instructions=instructions, temperature=0, max_output_tokens=12)
    same = _chat(client, [{"role": "system", "content": instructions}, {"role": "user", "content": "Hello"}], 12)
    assert response.usage is not None and (response.output_text, response.usage.input_tokens) == same
    assert response.instructions == instructions


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Write a long story about a dragon.", max_output_tokens=5, temperature=0)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 5


def test_create_streamed_events(client: openai.OpenAI) -> None:
    whole = client.responses.create(model=MODEL, input="What is 2+2?", temperature=0, max_output_tokens=24)
    events = list(client.responses.create(model=MODEL, input="What is 2+2?", temperature=0, max_output_tokens=24, stream=True))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[4 : 4 + len(deltas)] == ["response.output_text.delta"] * len(deltas) and deltas
    assert kinds[4 + len(deltas) :] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole.status}",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(d.delta for d in deltas)
    done = events[4 + len(deltas)]
    assert done.type == "response.output_text.done" and done.text == text == whole.output_text
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    assert final.response.output_text == text and final.response.id == events[0].response.id


def test_stream_helper(client: openai.OpenAI) -> None:
    """The SDK's ``responses.stream`` checks the events' identities and order as it accumulates them."""
    with client.responses.stream(model=MODEL, input="Say hello.", temperature=0, max_output_tokens=100) as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(texts) and final.output_text


def test_previous_response_id_and_retrieve(client: openai.OpenAI) -> None:
    """The next turn sees the earlier input and reply, but not the earlier instructions (as OpenAI)."""
    first = client.responses.create(
        model=MODEL, input="My name is Zorblat. Remember it.", instructions="Be brief.", temperature=0, max_output_tokens=16
    )
    second = client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id, temperature=0, max_output_tokens=16
    )
    assert second.previous_response_id == first.id
    conversation = [
        {"role": "user", "content": "My name is Zorblat. Remember it."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second.usage is not None and (second.output_text, second.usage.input_tokens) == _chat(client, conversation, 16)
    assert "Zorbla" in second.output_text
    kept = client.responses.retrieve(first.id)
    assert kept.id == first.id and kept.output_text == first.output_text


def test_store_false_is_not_kept(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as missing:
        client.responses.create(model=MODEL, input="Again", previous_response_id=response.id, max_output_tokens=2)
    assert missing.value.param == "previous_response_id" and missing.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", "use /v1/chat/completions"),
        ({"tool_choice": "required"}, "tool_choice", "no tools"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "reasoning"),
        ({"background": True}, "background", "foreground"),
        ({"include": ["message.output_text.logprobs"]}, "include", "include"),
        ({"top_logprobs": 2}, "top_logprobs", "/v1/chat/completions"),
        ({"truncation": "auto"}, "truncation", "never truncated"),
        ({"conversation": "conv_1"}, "conversation", "previous_response_id"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "templates"),
        ({"text": {"verbosity": "low"}}, "text.verbosity", "max_output_tokens"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format", "'json_schema'"),
        ({"max_output_tokens": 100000}, "max_output_tokens", "context window"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options", "only allowed when stream is true"),
        ({"frobnicate": True}, "frobnicate", "unrecognized"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/cat.png"}]}]}, "input[0].content[0]", "takes text only"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input", "function_call_output"),
        ({"input": ""}, "input", "at least 1"),
        ({"previous_response_id": "resp_nope"}, "previous_response_id", "not found"),
    ],
    ids=lambda value: str(value)[:40] if isinstance(value, dict) else None,
)
def test_refused_with_reason(local_server: Server, extra: dict[str, Any], param: str, words: str) -> None:
    response = local_server.http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_unknown_response_is_404(local_server: Server) -> None:
    response = local_server.http.get("/v1/responses/resp_nope")
    assert response.status_code == 404 and response.json()["error"]["param"] == "response_id"
