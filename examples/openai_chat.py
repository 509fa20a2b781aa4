"""Chat with a localp2p server through the official `openai` Python SDK: once plainly,
once streamed token by token.

    pip install openai
    python examples/openai_chat.py                      # asks "What is 2+2?"
    python examples/openai_chat.py "Name three planets."

Environment:
    OPENAI_BASE_URL  the server's /v1 URL (default http://127.0.0.1:8080/v1)
    OPENAI_API_KEY   a key of `localp2p run --api-key` (or API_KEY); any text when the
                     server needs none
    MODEL            the model to ask (default: the server's first, see GET /v1/models)
"""

from __future__ import annotations

import os
import sys

from openai import OpenAI

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"


def main() -> int:
    question = " ".join(sys.argv[1:]) or "What is 2+2?"
    client = OpenAI(
        base_url=os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
        api_key=os.environ.get("OPENAI_API_KEY") or os.environ.get("API_KEY") or "no-key",
    )
    model = os.environ.get("MODEL") or client.models.list().data[0].id
    messages = [{"role": "user", "content": question}]
    print(f"model: {model}")
    print(f"question: {question}")

    # A plain request: the whole answer at once.
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=64)
    answer = reply.choices[0].message.content or ""
    print(f"answer: {answer.strip()}")

    # A streamed request: print each piece as it arrives (server-sent events).
    print("streamed answer: ", end="", flush=True)
    streamed = ""
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=64, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            piece = chunk.choices[0].delta.content
            streamed += piece
            print(piece, end="", flush=True)
    print()

    if not answer.strip() or not streamed.strip():
        print("error: an answer was empty", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
