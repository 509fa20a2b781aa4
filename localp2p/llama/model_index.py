"""An index of GGUF files: each tensor's place and llama.cpp RPC hash, kept on disk.

Used by workers (``--models-path``: which tensors they can put in their rpc-server's
cache without the network) and by the server (the hashes of the model it loads, to
tell workers what to fetch). Hashing reads the whole file (about 1 s per GB with
:mod:`localp2p.llama.fnv`), so each file's entry is saved as JSON in ``index_dir``
and reused while the file's (path, size, mtime) are unchanged: a restart costs one
``stat`` per file.

A model's **content id** is a SHA-256 over its tensors' names, sizes and hashes: the
same weights have the same id wherever the file lies and whatever it is called.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pathlib
import tempfile
from dataclasses import dataclass

from localp2p.llama.fnv import Hasher, hex_name
from localp2p.llama.gguf_tensors import RPC_HASH_THRESHOLD, GGUFError, TensorSpan, read_tensors
from localp2p.logs import get_logger

log = get_logger("model-index")

#: Bumped when the saved entry's format or meaning changes (old entries are rehashed).
INDEX_VERSION = 1
#: Threads hashing one file's tensors at once (each hashes one tensor at a time, ~0.7 GB/s per core).
HASH_THREADS = max(1, min(8, os.cpu_count() or 1))
#: Characters of the content id shown and announced (64 bits: collisions are not a concern).
CONTENT_ID_CHARS = 16


@dataclass(frozen=True)
class IndexedTensor:
    name: str
    offset: int
    size: int
    hash: int

    @property
    def cacheable(self) -> bool:
        """Whether llama.cpp offers this tensor by hash (and so an rpc-server cache can hold it)."""
        return self.size > RPC_HASH_THRESHOLD

    @property
    def layer(self) -> int | None:
        """The repeating layer (``blk.N.``) the tensor belongs to; None for the others."""
        return TensorSpan(self.name, self.offset, self.size).layer


@dataclass(frozen=True)
class IndexedModel:
    """One GGUF file, as indexed."""

    path: str
    size: int
    mtime_ns: int
    tensors: tuple[IndexedTensor, ...]

    @property
    def content_id(self) -> str:
        digest = hashlib.sha256()
        for t in self.tensors:
            digest.update(f"{t.name}\0{t.size}\0{hex_name(t.hash)}\n".encode())
        return digest.hexdigest()[:CONTENT_ID_CHARS]

    def cacheable(self) -> list[IndexedTensor]:
        return [t for t in self.tensors if t.cacheable]

    def to_json(self) -> dict[str, object]:
        return {
            "version": INDEX_VERSION,
            "path": self.path,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "tensors": [[t.name, t.offset, t.size, hex_name(t.hash)] for t in self.tensors],
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> IndexedModel:
        """:raises ValueError/KeyError/TypeError: a malformed entry."""
        if data.get("version") != INDEX_VERSION:
            raise ValueError("old index format")
        rows = data["tensors"]
        assert isinstance(rows, list)
        tensors = tuple(IndexedTensor(str(n), int(o), int(s), int(str(h), 16)) for n, o, s, h in rows)
        return cls(str(data["path"]), int(str(data["size"])), int(str(data["mtime_ns"])), tensors)


class ModelIndex:
    """GGUF files indexed by tensor hash, with the entries saved in ``index_dir``.

    Blocking methods (file I/O and hashing): call them with ``trio.to_thread.run_sync``.
    Owns ``index_dir``'s ``*.json`` files.
    """

    def __init__(self, index_dir: str | os.PathLike[str], hasher: Hasher) -> None:
        self.index_dir = pathlib.Path(index_dir)
        self.hasher = hasher
        #: Seconds spent hashing in the last :meth:`scan` / :meth:`entry` (0 when every entry was reused).
        self.hash_seconds = 0.0

    def _entry_file(self, path: pathlib.Path) -> pathlib.Path:
        return self.index_dir / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.json"

    def entry(self, path: str | os.PathLike[str]) -> IndexedModel:
        """The index of one GGUF file: the saved entry if the file is unchanged, else hashed now.

        :raises GGUFError: not a GGUF file. :raises OSError: unreadable.
        """
        import time  # noqa: PLC0415

        real = pathlib.Path(path).resolve()
        st = real.stat()
        saved = self._entry_file(real)
        try:
            model = IndexedModel.from_json(json.loads(saved.read_text()))
            if (model.path, model.size, model.mtime_ns) == (str(real), st.st_size, st.st_mtime_ns):
                return model
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            pass
        started = time.monotonic()
        spans = read_tensors(real)
        fd = os.open(real, os.O_RDONLY)
        try:
            # One tensor per thread (the C loop releases the GIL; pread shares the fd safely):
            # FNV-1a cannot be vectorised, so cores are the only way to go faster.
            with concurrent.futures.ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
                hashes = list(pool.map(lambda s: self.hasher.fd_range(fd, s.offset, s.size), spans))
        finally:
            os.close(fd)
        tensors = tuple(IndexedTensor(s.name, s.offset, s.size, h) for s, h in zip(spans, hashes, strict=True))
        after = real.stat()
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            raise OSError(f"{real} changed while it was being indexed")
        model = IndexedModel(str(real), st.st_size, st.st_mtime_ns, tensors)
        self.hash_seconds += time.monotonic() - started
        self._save(saved, model)
        log.info(
            "indexed model file",
            path=str(real),
            content_id=model.content_id,
            tensors=len(tensors),
            cacheable=len(model.cacheable()),
            gb=round(st.st_size / 1e9, 2),
            seconds=round(time.monotonic() - started, 2),
        )
        return model

    def _save(self, target: pathlib.Path, model: IndexedModel) -> None:
        try:
            self.index_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.index_dir, suffix=".tmp", delete=False) as out:
                json.dump(model.to_json(), out)
            os.replace(out.name, target)
        except OSError as exc:  # an index that cannot be saved is rehashed next time, nothing worse
            log.warning("cannot save the model index", dir=str(self.index_dir), error=str(exc))

    def scan(self, models_dir: str | os.PathLike[str]) -> list[IndexedModel]:
        """Every ``*.gguf`` under ``models_dir`` (recursively), indexed; unreadable files are skipped with a warning."""
        self.hash_seconds = 0.0
        found = []
        for path in sorted(pathlib.Path(models_dir).rglob("*.gguf")):
            try:
                found.append(self.entry(path))
            except (GGUFError, OSError) as exc:
                log.warning("skipping model file", path=str(path), error=str(exc))
        return found


def holdings(models: list[IndexedModel]) -> dict[int, tuple[str, IndexedTensor]]:
    """Cacheable tensors by hash: where each one's bytes are (file path, tensor)."""
    held: dict[int, tuple[str, IndexedTensor]] = {}
    for model in models:
        for t in model.cacheable():
            held.setdefault(t.hash, (model.path, t))
    return held
