"""Where each tensor's bytes sit in a GGUF file: name, absolute offset, size.

Read with the ``gguf`` package (a dependency already; the file is memory-mapped and
only its header is parsed). llama.cpp's model loader sends each tensor of an RPC
buffer whole (``ggml_backend_tensor_set`` of the full tensor), so the bytes it hashes
for ``SET_TENSOR_HASH`` are exactly these ranges of the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

#: llama.cpp ggml-rpc.cpp: tensors larger than this (bytes) are offered by hash first,
#: and only those are saved in (and served from) an rpc-server's cache dir.
RPC_HASH_THRESHOLD = 10 * 1024 * 1024
#: ``blk.<layer>.…``: the repeating layers llama.cpp spreads over devices.
_BLOCK = re.compile(r"blk\.(\d+)\.")


class GGUFError(ValueError):
    """The file is not a GGUF model this reader understands; one line."""


@dataclass(frozen=True)
class TensorSpan:
    name: str
    offset: int  # absolute, in the file
    size: int

    @property
    def layer(self) -> int | None:
        """The repeating layer the tensor belongs to (``blk.N.``), None for the others."""
        match = _BLOCK.match(self.name)
        return int(match.group(1)) if match else None


def read_tensors(path: str | os.PathLike[str]) -> list[TensorSpan]:
    """Every tensor of the GGUF file at ``path``, in file order.

    :raises GGUFError: not a GGUF file, or one the reader cannot parse.
    :raises OSError: the file cannot be read.
    """
    import gguf  # noqa: PLC0415 - numpy and friends: only where it is needed

    try:
        reader = gguf.GGUFReader(os.fspath(path), "r")
    except (ValueError, KeyError, IndexError) as exc:  # gguf raises these for bad headers
        raise GGUFError(f"{path}: not a readable GGUF file ({exc})") from None
    spans = [TensorSpan(str(t.name), int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    del reader  # drop the memory map now
    return sorted(spans, key=lambda s: s.offset)
