"""Issue 2 acceptance: the official `openai` client works against the server."""

from __future__ import annotations

import math

import openai
import pytest

from localp2p.testing.cluster import Server


@pytest.fixture(scope="module")
def client(distributed_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=distributed_server.base_url + "/v1", api_key="unused", max_retries=0)


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2-135m-instruct"]


def test_chat(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is 2+2?"}],
        temperature=0,
        max_tokens=24,
    )
    assert "4" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0


def test_chat_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "What is 2+2?"}],
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "4" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_completions_plain_and_stream(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="smollm2-135m-instruct", prompt="One, two, three,", temperature=0, max_tokens=12)
    streamed = client.completions.create(
        model="smollm2-135m-instruct", prompt="One, two, three,", temperature=0, max_tokens=12, stream=True
    )
    text = "".join(c.choices[0].text for c in streamed)
    assert plain.choices[0].text == text
    assert "four" in text.lower()


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="smollm2-135m-instruct", input=["a cat sat on the mat", "a kitten on a rug", "tax law"])
    vectors = [d.embedding for d in result.data]
    assert len(vectors) == 3 and len(vectors[0]) == 576
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0, rel_tol=1e-3)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    floats = client.embeddings.create(model="smollm2-135m-instruct", input="a cat sat on the mat", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
