"""The fixed prompt and sampling every generation benchmark uses.

Each repetition starts with a different word: llama-cpp-python reuses the KV cache for
the longest common token prefix of consecutive prompts, so repeating one prompt would
skip the prompt processing we want to measure. The rest (~100 tokens) is identical.
"""

from __future__ import annotations

from typing import Any

_OPENERS = (
    "Alpha",
    "Bravo",
    "Charlie",
    "Delta",
    "Echo",
    "Foxtrot",
    "Golf",
    "Hotel",
    "India",
    "Juliet",
    "Kilo",
    "Lima",
    "Mike",
    "November",
    "Oscar",
    "Papa",
    "Quebec",
    "Romeo",
    "Sierra",
    "Tango",
)

_BODY = (
    " team, status report. The distributed inference cluster has several ordinary machines, each"
    " lending its memory and processor to one server. The server splits the layers of a language"
    " model between the workers, sends each its weights once, and then, for every token, passes a"
    " hidden state from one worker to the next. Explain in plain words what limits the speed of"
    " such a cluster, which parts of the network matter most, and what a careful operator should"
    " measure first before buying"
)

#: Sampling of every run: greedy, the API's other defaults spelled out (schemas.py).
SAMPLING: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}


def prompt(rep: int, tiny: bool = False) -> str:
    """The prompt of repetition ``rep`` (0 is the warm-up); ``tiny``: its first word alone.

    Tiny prompts (2-3 tokens) measure a layer's fixed cost per request with little compute
    (and so little compute noise) around it.
    """
    return _OPENERS[rep % len(_OPENERS)] + ("." if tiny else _BODY)
