"""Chat messages to prompt tokens, with the model's chat template.

The template is the one llama-cpp-python picks for the model (``Llama.chat_format``):
the GGUF's own Jinja template (``chat_template.*``) or a named built-in format
(``chat_format`` in the model's YAML). Only its prompt formatting is used here; the
batching engine generates. Runs on any thread (it reads the vocabulary only).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: Prefix llama-cpp-python gives chat formats taken from the GGUF's metadata.
_GGUF_FORMAT = "chat_template."


@dataclass(frozen=True)
class Prompt:
    tokens: list[int]
    stop: tuple[str, ...]  # stop strings the format adds (e.g. its end-of-turn marker)


class ChatPrompt:
    """Renders chat messages for one loaded ``llama_cpp.Llama``; raises ValueError for a
    chat format it cannot render (a handler that is not a plain prompt formatter)."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm
        self._format = _formatter(llm)

    def tokens(self, messages: Sequence[dict[str, Any]]) -> Prompt:
        """The prompt for ``messages`` (OpenAI-style dicts: role, content, name), ending
        where the assistant's reply begins. Template errors raise ValueError."""
        try:
            result = self._format(messages=list(messages))
        except ValueError:
            raise
        except Exception as exc:  # jinja2's errors: the messages do not fit the template
            raise ValueError(f"the model's chat template cannot render these messages: {exc}") from exc
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        tokens = self._llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        return Prompt(tokens=list(tokens), stop=tuple(s for s in stop if s))


def _formatter(llm: Any) -> Any:
    from llama_cpp import llama_chat_format  # noqa: PLC0415 - heavy

    name = llm.chat_format or ""
    if name.startswith(_GGUF_FORMAT):
        suffix = name[len(_GGUF_FORMAT) :]
        key = "tokenizer.chat_template" if suffix == "default" else f"tokenizer.chat_template.{suffix}"
        eos, bos = llm.token_eos(), llm.token_bos()
        return llama_chat_format.Jinja2ChatFormatter(
            template=llm.metadata[key],
            eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )
    # A built-in format: llama-cpp-python registers a handler that closes over the formatter.
    handler = llama_chat_format.get_chat_completion_handler(name)
    formatter = inspect.getclosurevars(handler).nonlocals.get("chat_formatter")
    if formatter is None:
        raise ValueError(f"chat format {name!r} is not a prompt template; the batching engine cannot use it")
    return formatter
