"""A generation's text as its tokens come: whole UTF-8 characters, stop sequences cut.

Tokens carry bytes, not characters: a character can span tokens, so bytes that end in an
incomplete UTF-8 sequence are held back until it completes. Text that could be the start
of a stop sequence is held back too, until it is known not to be one; when a stop
sequence appears, the text ends right before it (OpenAI's ``stop``: the sequence itself
is not returned). Nothing here calls llama.cpp.
"""

from __future__ import annotations

from collections.abc import Sequence


def _complete_utf8(data: bytes) -> int:
    """How many leading bytes of ``data`` form complete UTF-8 characters (invalid bytes
    count as complete: they are decoded with replacement characters, not held forever)."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte & 0b1100_0000 == 0b1000_0000:  # continuation byte: look further back
            continue
        if byte & 0b1000_0000 == 0:
            return n
        need = 2 if byte & 0b1110_0000 == 0b1100_0000 else 3 if byte & 0b1111_0000 == 0b1110_0000 else 4
        return n if back >= need else n - back
    return n


class TextOutput:
    """Turns token bytes into text chunks, holding back incomplete characters and possible
    stop sequences; :attr:`stopped` turns true when a stop sequence appeared."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._stop = [s for s in stop if s]
        self._bytes = b""  # bytes not yet decoded (an incomplete character at the end)
        self._held = ""  # decoded text not yet released (may begin a stop sequence)
        self.stopped = False

    def add(self, piece: bytes) -> str:
        """Take one token's bytes; returns the text that can be released now ("" if none)."""
        if self.stopped:
            return ""
        self._bytes += piece
        cut = _complete_utf8(self._bytes)
        self._held += self._bytes[:cut].decode("utf-8", errors="replace")
        self._bytes = self._bytes[cut:]
        return self._release()

    def _release(self) -> str:
        text = self._held
        for stop in self._stop:
            at = text.find(stop)
            if at >= 0:
                self.stopped = True
                self._held = ""
                return text[:at]
        keep = 0  # longest tail of the text that is a proper prefix of a stop sequence
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:size]):
                    keep = size
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of the generation: everything still held (an incomplete character
        is decoded with a replacement character)."""
        if self.stopped:
            return ""
        text = self._held + self._bytes.decode("utf-8", errors="replace")
        self._held, self._bytes = "", b""
        return text
