"""What a model load tells llama.cpp beyond llama-cpp-python's ``Llama`` parameters.

llama-cpp-python 0.3.36's ``Llama`` builds its model params from
``llama_model_default_params()`` and has no parameter for tensor overrides, the
progress callback or ``use_extra_bufts``, nor for a context's sequence count;
:func:`amended_model_params` and :func:`parallel_sequences` wrap llama.cpp's
default-params functions for the duration of one load (callers hold the backend lock, so no other
load sees the change). llama.cpp's own load log says where the weights went
(``<buffer type> model buffer size = N MiB``); :class:`LoadLog` keeps those lines.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from localp2p.llama import rpc

#: Tensors that make up the output layer (``token_embd`` stands in for it when tied).
OUTPUT_TENSOR_PATTERN = rb"^(output|output_norm|token_embd)\.(weight|bias)$"
#: llama.cpp's line per weight buffer (llama-model.cpp, load_tensors).
_BUFFER_LINE = re.compile(r"(\S+) model buffer size =\s*([0-9.]+) MiB")
#: ggml log levels (ggml.h) printed, as llama-cpp-python does with verbose=False: NONE and ERROR.
_PRINTED_LEVELS = frozenset({0, 3})
#: GGML_LOG_LEVEL_CONT: the line goes on at the previous line's level.
_GGML_LOG_LEVEL_CONT = 5


class _BuftOverride(ctypes.Structure):
    """``struct llama_model_tensor_buft_override`` (llama.h)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@contextlib.contextmanager
def _amended_defaults(name: str, amend: Callable[[Any], None]) -> Iterator[None]:
    """While active, every result of llama.cpp's ``name()`` (a default-params function, as
    llama-cpp-python calls it) passes through ``amend``."""
    import llama_cpp.llama_cpp as lib  # noqa: PLC0415 - heavy; imported at load time

    original = getattr(lib, name)

    def amended() -> Any:
        params = original()
        amend(params)
        return params

    setattr(lib, name, amended)
    try:
        yield
    finally:
        setattr(lib, name, original)


def amended_model_params(amend: Callable[[Any], None]) -> contextlib.AbstractContextManager[None]:
    """While active, every ``llama_model_default_params()`` result passes through ``amend``."""
    return _amended_defaults("llama_model_default_params", amend)


def parallel_sequences(parallel: int) -> contextlib.AbstractContextManager[None]:
    """While active, contexts are made for ``parallel`` sequences, each in a KV-cache stream
    of its own (``kv_unified=false``: a sequence's cells are its positions, whatever the
    others hold; see batching). ``Llama`` has no parameter for either."""

    def amend(params: Any) -> None:
        params.n_seq_max = parallel
        params.kv_unified = False

    return _amended_defaults("llama_context_default_params", amend)


@contextlib.contextmanager
def output_layer_on_host(enabled: bool) -> Iterator[None]:
    """While active, models load with their output layer pinned to host memory.

    llama.cpp places the output layer on the last offloaded device; computed there,
    every token ships ``n_vocab`` float logits back over the network. Pinning its
    tensors to the CPU buffer type (llama.cpp's ``--override-tensor``) keeps the
    logits local; only one hidden state per token crosses the wire.
    """
    if not enabled:
        yield
        return
    overrides = (_BuftOverride * 2)(_BuftOverride(OUTPUT_TENSOR_PATTERN, rpc.cpu_buffer_type()), _BuftOverride(None, None))

    def pin(params: Any) -> None:
        params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)

    with amended_model_params(pin):
        yield


@contextlib.contextmanager
def progress_callback(on_progress: Callable[[float], None]) -> Iterator[None]:
    """While active, model loads report llama.cpp's progress (0..1) to ``on_progress``.

    The ctypes callback is referenced here until the load ends, so it is not garbage
    collected while llama.cpp may call it; it returns True (False would abort the load).
    """
    import llama_cpp.llama_cpp as lib  # noqa: PLC0415

    def report(fraction: float, _user_data: Any) -> bool:
        on_progress(float(fraction))
        return True

    callback = lib.llama_progress_callback(report)

    def attach(params: Any) -> None:
        params.progress_callback = callback

    with amended_model_params(attach):
        yield


@contextlib.contextmanager
def extra_buffer_types(enabled: bool) -> Iterator[None]:
    """While active, loads may (or may not) put weights into llama.cpp's extra CPU buffer
    types (repacked weights; AMX where the process may use it, see localp2p.cpumode)."""

    def choose(params: Any) -> None:
        params.use_extra_bufts = enabled

    with amended_model_params(choose):
        yield


class LoadLog:
    """llama.cpp's log, kept where it says which buffer types hold the weights.

    Installed once per process (:meth:`install`); replaces llama-cpp-python's callback,
    and like it with ``verbose=False`` prints only errors. ``weight_buffers`` maps a
    buffer type's name (``CPU``, ``CPU_REPACK``, ``AMX``, ``RPC0[host:port]``) to the
    MiB of weights the last load put there.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: dict[str, float] = {}
        self._callback: Any = None
        self._last_level = 0

    def install(self) -> None:
        import llama_cpp  # noqa: PLC0415

        @llama_cpp.llama_log_callback
        def on_log(level: int, text: bytes, _user_data: Any) -> None:
            self._on_log(level, text)

        self._callback = on_log  # referenced for the life of the process
        llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes) -> None:
        line = text.decode("utf-8", "replace")
        if level != _GGML_LOG_LEVEL_CONT:
            self._last_level = level
        match = _BUFFER_LINE.search(line)
        if match:
            with self._lock:
                self._buffers[match.group(1)] = float(match.group(2))
        if self._last_level in _PRINTED_LEVELS:
            print(line, end="", file=sys.stderr, flush=True)

    def begin_load(self) -> None:
        with self._lock:
            self._buffers = {}

    @property
    def weight_buffers(self) -> dict[str, float]:
        with self._lock:
            return dict(self._buffers)
