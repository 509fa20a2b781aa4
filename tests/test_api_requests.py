"""Issue 19: every request field OpenAI defines is honoured or refused with a 400 that names it.

Each refused field gets its own case: the status, OpenAI's error shape, ``param`` naming
the field and a message that says why. Values that ask for what the server does anyway
(``store: false``, ``n: 1``, ...) and the documented extensions are accepted. Real
server, real model; the openai SDK where it can say the request.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from localp2p.testing.cluster import Server

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
MSG = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def _error(response: Any) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]  # type: ignore[no-any-return]


# (endpoint, body, param, words the message must hold)
REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    # chat: fields OpenAI defines that this server does not honour
    (CHAT, {"audio": {"voice": "alloy", "format": "mp3"}}, "audio", "text only"),
    (CHAT, {"modalities": ["text", "audio"]}, "modalities", "text only"),
    (CHAT, {"store": True}, "store", "not stored"),
    (CHAT, {"service_tier": "flex"}, "service_tier", "one service tier"),
    (CHAT, {"prediction": {"type": "content", "content": "x"}}, "prediction", "not supported"),
    (CHAT, {"reasoning_effort": "high"}, "reasoning_effort", "reasoning"),
    (CHAT, {"verbosity": "low"}, "verbosity", "max_tokens"),
    (CHAT, {"web_search_options": {}}, "web_search_options", "search"),
    (CHAT, {"moderation": {"model": "omni-moderation-latest"}}, "moderation", "moderation"),
    (CHAT, {"prompt_cache_retention": "24h"}, "prompt_cache_retention", "memory"),
    (CHAT, {"prompt_cache_options": {"mode": "explicit"}}, "prompt_cache_options", "automatic"),
    (CHAT, {"functions": [WEATHER["function"]]}, "functions", "use tools"),
    (CHAT, {"function_call": "auto"}, "function_call", "tool_choice"),
    # chat: values out of what is served
    (CHAT, {"n": 2}, "n", "only 1"),
    (CHAT, {"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop sequences"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs", "requires logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    (CHAT, {"logit_bias": {"hello": 5}}, "logit_bias", "token ids"),
    (CHAT, {"logit_bias": {"42": 101}}, "logit_bias.42", "100"),
    (CHAT, {"response_format": {"type": "grammar", "grammar": "x"}}, "response_format", "'json_schema'"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema", "missing"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, "response_format.json_schema.name", "pattern"),
    (CHAT, {"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type", "custom tools"),
    (CHAT, {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among the tools"),
    (CHAT, {"tool_choice": "required"}, "tool_choice", "needs tools"),
    (CHAT, {"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}}, "tool_choice", "allowed_tools"),
    (CHAT, {"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
    (CHAT, {"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    (CHAT, {"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation", "obfuscation"),
    (CHAT, {"frobnicate": 1}, "frobnicate", "unrecognized request argument"),
    # chat: messages
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}]}, "messages[0].content[0]", "takes text only"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hear"}, {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}, "messages[0].content[1]", "takes text only"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]}, "messages[0].content[0]", "takes text only"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, "messages[0].content[0]", "unknown content part type"),
    (CHAT, {"messages": [{"role": "function", "name": "f", "content": "1"}]}, "messages[0].role", "deprecated"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "mood": "happy"}]}, "messages[0].mood", "unrecognized"),
    (CHAT, {"messages": [*MSG, {"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "content": "31"}]}, "messages[2].tool_call_id", "missing"),
    (CHAT, {"messages": [*MSG, {"role": "tool", "tool_call_id": "call_9", "content": "31"}]}, "messages[1].tool_call_id", "call_9"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "tool_calls": [CALL]}]}, "messages[0].tool_calls", "only assistant"),
    (CHAT, {"messages": [*MSG, {"role": "assistant", "content": "hi", "audio": {"id": "audio_1"}}]}, "messages[1].audio", "audio"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    # completions
    (COMPLETIONS, {"prompt": ["one", "two"]}, "prompt", "one prompt per request (got 2)"),
    (COMPLETIONS, {"prompt": [1, 2, 3]}, "prompt", "token-id prompts"),
    (COMPLETIONS, {"prompt": [[1, 2], [3]]}, "prompt", "token-id prompts"),
    (COMPLETIONS, {"suffix": "end"}, "suffix", "insertion"),
    (COMPLETIONS, {"best_of": 2}, "best_of", "best_of=1"),
    (COMPLETIONS, {"logprobs": 6}, "logprobs", "less than or equal to 5"),
    (COMPLETIONS, {"echo": True, "logprobs": 1}, "logprobs", "echo"),
    (COMPLETIONS, {"stop": ["1", "2", "3", "4", "5"]}, "stop", "at most 4 stop sequences"),
    (COMPLETIONS, {"n": 3}, "n", "only 1"),
    (COMPLETIONS, {"messages": MSG}, "messages", "unrecognized"),
    # embeddings
    (EMBEDDINGS, {"dimensions": 64}, "dimensions", "model's own size"),
    (EMBEDDINGS, {"input": [[1, 2, 3]]}, "input", "token-id inputs"),
    (EMBEDDINGS, {"input": [1, 2, 3]}, "input", "token-id inputs"),
    (EMBEDDINGS, {"truncate": True}, "truncate", "unrecognized"),
]


def _body(path: str, extra: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {CHAT: {"messages": MSG}, COMPLETIONS: {"prompt": "Once"}, EMBEDDINGS: {"input": "a cat"}}[path]
    if path != EMBEDDINGS:
        base = {**base, "max_tokens": 2}
    return {**base, **extra}


@pytest.mark.parametrize(("path", "extra", "param", "words"), REFUSED, ids=[f"{i:02d}-{case[2]}" for i, case in enumerate(REFUSED)])
def test_refused_with_reason(local_server: Server, path: str, extra: dict[str, Any], param: str, words: str) -> None:
    error = _error(local_server.http.post(path, json=_body(path, extra)))
    assert error["param"] == param, error
    assert words in error["message"], error


# Values that ask for what the server does anyway, and the documented extensions.
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    (CHAT, {"store": False}),
    (CHAT, {"n": 1}),
    (CHAT, {"modalities": ["text"]}),
    (CHAT, {"service_tier": "auto"}),
    (CHAT, {"service_tier": "default"}),
    (CHAT, {"reasoning_effort": "none"}),
    (CHAT, {"prompt_cache_retention": "in_memory"}),
    (CHAT, {"metadata": {"project": "demo"}, "user": "u-1", "safety_identifier": "s-1", "prompt_cache_key": "k"}),
    (CHAT, {"parallel_tool_calls": True}),
    (CHAT, {"tools": []}),
    (CHAT, {"tool_choice": "none"}),
    (CHAT, {"logit_bias": {}}),
    (CHAT, {"logprobs": False}),
    (CHAT, {"response_format": {"type": "text"}}),
    (CHAT, {"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}}),
    (CHAT, {"top_k": 20, "min_p": 0.1, "repeat_penalty": 1.1, "ignore_eos": True}),
    (CHAT, {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
    (CHAT, {"messages": [*MSG, {"role": "assistant", "content": None, "refusal": "I cannot."}, {"role": "user", "content": "ok"}]}),
    (CHAT, {"messages": [*MSG, {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}, {"role": "user", "content": "ok"}]}),
    (COMPLETIONS, {"prompt": ["Once"], "suffix": "", "best_of": 1, "echo": False, "user": "u"}),
    (EMBEDDINGS, {"encoding_format": "base64", "user": "u"}),
]


@pytest.mark.parametrize(("path", "extra"), ACCEPTED, ids=[f"{p.rsplit('/', 1)[1]}-{i}" for i, (p, _) in enumerate(ACCEPTED)])
def test_accepted_no_op_values(local_server: Server, path: str, extra: dict[str, Any]) -> None:
    response = local_server.http.post(path, json=_body(path, extra))
    assert response.status_code == 200, response.text


def test_sdk_sees_refusals_as_bad_requests(local_server: Server) -> None:
    """The openai SDK raises BadRequestError with the field in ``param``, for extra_body fields too."""
    client = openai.OpenAI(base_url=local_server.base_url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=MSG, n=2)  # type: ignore[arg-type]
    assert refused.value.param == "n"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=MSG, extra_body={"typical_p": 0.5})  # type: ignore[arg-type]
    assert unknown.value.param == "typical_p" and "unrecognized" in str(unknown.value)
    with pytest.raises(openai.BadRequestError) as image:
        client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}],
        )
    assert image.value.param == "messages[0].content[0]" and "smollm2-135m-instruct" in str(image.value)


def test_logit_bias_beyond_the_vocabulary(local_server: Server) -> None:
    """The API cannot know the vocabulary; the backend refuses an id beyond it (400, says so)."""
    response = local_server.http.post(CHAT, json=_body(CHAT, {"logit_bias": {"99999999": -100}}))
    assert "vocabulary" in _error(response)["message"]


def test_assistant_tool_calls_and_tool_results_are_accepted(local_server: Server) -> None:
    """A replayed tool-calling turn (what LangChain and the SDK send back) is a valid conversation."""
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "31 degrees and sunny"},
    ]
    response = local_server.http.post(CHAT, json={"messages": messages, "tools": [WEATHER], "max_tokens": 2})
    assert response.status_code == 200, response.text
