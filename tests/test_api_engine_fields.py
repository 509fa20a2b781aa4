"""Issue 19: the request fields the backend engine honours, asserted by what comes back.

Structured output (the reply parses and validates against the schema), tool calls (valid
arguments, ``finish_reason: tool_calls``, streamed as ``delta.tool_calls``), log-probabilities
(one per completion token, chat's and the legacy completions shape), ``logit_bias`` (a
banned token never comes, a forced one always does), completions ``echo``, and LangChain's
``bind_tools`` / ``with_structured_output``. Real server, real model, the openai SDK.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import llama_cpp
import openai
import pytest
from pydantic import BaseModel

from localp2p.config import embedded_model_path
from localp2p.testing.cluster import Server

MODEL = "smollm2-135m-instruct"
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER: Any = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The current weather in a city", "parameters": WEATHER_PARAMETERS},
}
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
ASK_WEATHER: Any = [{"role": "user", "content": "What is the weather like in Paris today?"}]
CITY_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "country": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["name", "country", "population"],
    "additionalProperties": False,
}
#: Tool requests: one call per reply (with several allowed, the small model repeats its call until max_tokens).
ONE_CALL: Any = {"parallel_tool_calls": False, "temperature": 0, "max_tokens": 100}
ASK_CITY: Any = [{"role": "user", "content": "Describe the city of Paris as JSON."}]


class City(BaseModel):
    name: str
    country: str
    population: int


@pytest.fixture(scope="module")
def client(local_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=local_server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def vocab() -> Iterator[llama_cpp.Llama]:
    """The served model's tokenizer (vocabulary only), to name tokens by id in logit_bias."""
    llm = llama_cpp.Llama(str(embedded_model_path()), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def _token_id(vocab: llama_cpp.Llama, text: str) -> int:
    [token] = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    return int(token)


# -- structured output --------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_json_object(local_server: Server, stream: bool) -> None:
    ask = 'Reply with a JSON object with the keys "name" and "age" for a cat named Tom who is 3 years old.'
    body = {"messages": [{"role": "user", "content": ask}], "response_format": {"type": "json_object"}, "temperature": 0, "max_tokens": 100}
    if stream:
        text = "".join(
            event["choices"][0]["delta"].get("content") or ""
            for event in local_server.stream_events("/v1/chat/completions", body)
            if isinstance(event, dict) and event.get("choices")
        )
    else:
        text = local_server.http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert isinstance(json.loads(text), dict), text


def test_json_schema_with_sdk_parse(client: openai.OpenAI) -> None:
    """``chat.completions.parse`` sends a strict json_schema format and validates the reply into the model."""
    completion = client.chat.completions.parse(model=MODEL, messages=ASK_CITY, response_format=City, temperature=0, max_tokens=200)
    city = completion.choices[0].message.parsed
    assert isinstance(city, City) and city.name


def test_json_schema_streamed(client: openai.OpenAI) -> None:
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=ASK_CITY,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}},
        temperature=0,
        max_tokens=200,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), CITY_SCHEMA)


def test_responses_text_format_json_schema(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL,
        input="Describe the city of Paris as JSON.",
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA, "strict": True}},
        temperature=0,
        max_output_tokens=200,
    )
    jsonschema.validate(json.loads(response.output_text), CITY_SCHEMA)


# -- tools --------------------------------------------------------------------------------------


def _check_call(call: Any, name: str, parameters: dict[str, Any]) -> None:
    assert call.type == "function" and call.id and call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), parameters)


def test_tool_choice_required(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", **ONE_CALL
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check_call(call, "get_weather", WEATHER_PARAMETERS)


def test_named_tool_choice(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        **ONE_CALL,
    )
    calls = completion.choices[0].message.tool_calls
    assert calls and all(call.function.name == "get_time" for call in calls)
    _check_call(calls[0], "get_time", TIME["function"]["parameters"])


def test_parallel_tool_calls_false_makes_one_call(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris, in London and in Rome?"}],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=150,
    )
    calls = completion.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=24
    )
    message = completion.choices[0].message
    assert not message.tool_calls and message.content and completion.choices[0].finish_reason != "tool_calls"


def test_tool_calls_streamed(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", stream=True, **ONE_CALL
        )
    )
    deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or ()]
    assert deltas and deltas[0].index == 0 and deltas[0].id and deltas[0].type == "function"
    assert deltas[0].function is not None and deltas[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.index == 0 and d.function is not None)
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_result_reaches_the_model(client: openai.OpenAI, vocab: llama_cpp.Llama) -> None:
    """A replayed call and its ``role: tool`` result are in the prompt the model answers.

    (Measured by the prompt's size: the 135M model does not reliably use the result.)
    """
    first = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", **ONE_CALL)
    [call] = first.choices[0].message.tool_calls or [None]
    assert call is not None
    result = "It is 31 degrees Celsius and sunny in Paris."
    asked: Any = [*ASK_WEATHER, first.choices[0].message.model_dump(exclude_none=True)]
    answered: Any = [*asked, {"role": "tool", "tool_call_id": call.id, "content": result}]
    sizes = []
    for messages in (asked, answered):
        reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=8)
        assert reply.usage is not None and reply.choices[0].finish_reason != "tool_calls"
        sizes.append(reply.usage.prompt_tokens)
    assert sizes[1] - sizes[0] >= len(vocab.tokenize(result.encode(), add_bos=False, special=False))


# -- log-probabilities --------------------------------------------------------------------------


def test_chat_logprobs(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], logprobs=True, top_logprobs=3, temperature=0, max_tokens=16
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None and completion.usage is not None
    entries = choice.logprobs.content
    assert len(entries) == completion.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0 and bytes(entry.bytes or []) == entry.token.encode("utf-8")
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the likeliest


def test_chat_logprobs_streamed(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is 2+2?"}],
            logprobs=True,
            top_logprobs=2,
            temperature=0,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or ()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None and len(entries) == usage.completion_tokens
    assert "".join(e.token for e in entries) == text
    assert all(len(e.top_logprobs) == 2 for e in entries)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completions_legacy_logprobs(client: openai.OpenAI, stream: bool) -> None:
    prompt = "One, two, three,"
    if stream:
        chunks = list(
            client.completions.create(
                model=MODEL, prompt=prompt, logprobs=2, temperature=0, max_tokens=10, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
        tokens = [t for p in parts for t in p.tokens or ()]
        token_logprobs = [t for p in parts for t in p.token_logprobs or ()]
        tops = [t for p in parts for t in p.top_logprobs or ()]
        offsets = [t for p in parts for t in p.text_offset or ()]
        usage = chunks[-1].usage
    else:
        completion = client.completions.create(model=MODEL, prompt=prompt, logprobs=2, temperature=0, max_tokens=10)
        logprobs = completion.choices[0].logprobs
        assert logprobs is not None
        text, usage = completion.choices[0].text, completion.usage
        tokens, token_logprobs = logprobs.tokens or [], logprobs.token_logprobs or []
        tops, offsets = logprobs.top_logprobs or [], logprobs.text_offset or []
    assert usage is not None and len(tokens) == len(token_logprobs) == len(tops) == len(offsets) == usage.completion_tokens
    assert "".join(tokens) == text
    assert all(lp <= 0 for lp in token_logprobs) and all(len(top) == 2 for top in tops)
    assert offsets[0] == len(prompt) and offsets == sorted(offsets)
    assert [offsets[i + 1] - offsets[i] for i in range(len(tokens) - 1)] == [len(t) for t in tokens[:-1]]


# -- logit_bias ---------------------------------------------------------------------------------


def test_logit_bias_bans_a_token(client: openai.OpenAI, vocab: llama_cpp.Llama) -> None:
    ask: Any = [{"role": "user", "content": "What is 2+2?"}]
    plain = client.chat.completions.create(model=MODEL, messages=ask, logprobs=True, temperature=0, max_tokens=16)
    assert plain.choices[0].logprobs is not None and plain.choices[0].logprobs.content
    first = plain.choices[0].logprobs.content[0].token
    banned = client.chat.completions.create(
        model=MODEL, messages=ask, logprobs=True, temperature=0, max_tokens=16, logit_bias={str(_token_id(vocab, first)): -100}
    )
    assert banned.choices[0].logprobs is not None and banned.choices[0].logprobs.content
    assert first not in [entry.token for entry in banned.choices[0].logprobs.content]


def test_logit_bias_forces_a_token(client: openai.OpenAI, vocab: llama_cpp.Llama) -> None:
    forced = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2+2?"}],
        temperature=0,
        max_tokens=4,
        logit_bias={str(_token_id(vocab, " banana")): 100},
    )
    assert forced.choices[0].message.content == " banana" * 4


# -- echo ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completions_echo(client: openai.OpenAI, stream: bool) -> None:
    prompt = "One, two, three,"
    plain = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8).choices[0].text
    if stream:
        chunks = client.completions.create(model=MODEL, prompt=prompt, echo=True, temperature=0, max_tokens=8, stream=True)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    else:
        text = client.completions.create(model=MODEL, prompt=prompt, echo=True, temperature=0, max_tokens=8).choices[0].text
    assert text == prompt + plain


# -- LangChain ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(local_server: Server) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=local_server.base_url + "/v1", api_key="unused", temperature=0, max_tokens=150, max_retries=0)


def test_langchain_bind_tools(chat_model: Any) -> None:
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str, unit: str) -> str:
        """The current weather in a city, in 'celsius' or 'fahrenheit'."""
        return f"31 {unit} in {city}"

    message = chat_model.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False).invoke("What is the weather like in Paris today?")
    assert message.tool_calls, message
    call = message.tool_calls[0]
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str) and call["id"]
    result = get_weather.invoke(call)  # a ToolMessage answering the call
    answer = chat_model.bind_tools([get_weather], tool_choice="none").invoke(["What is the weather like in Paris today?", message, result])
    assert isinstance(answer.content, str) and answer.content and not answer.tool_calls


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(chat_model: Any, method: str) -> None:
    structured = chat_model.with_structured_output(City if method != "json_mode" else CITY_SCHEMA, method=method)
    result = structured.invoke("Describe the city of Paris as JSON with keys name, country and population.")
    if method == "json_mode":
        assert isinstance(result, dict)
    else:
        assert isinstance(result, City) and result.name
