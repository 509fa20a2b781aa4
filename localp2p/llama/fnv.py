"""llama.cpp's tensor hash (64-bit FNV-1a), fast enough for GBs: a small C function.

ggml-rpc.cpp names each cached tensor by ``fnv_hash(data, size)``: FNV-1a, 64-bit,
offset basis 0xcbf29ce484222325, prime 0x100000001b3, one byte at a time. Each step
depends on the one before, so it cannot be vectorised; pure Python manages about
10 MB/s, far too slow for model files. The C loop below (about 1 GB/s) is compiled
once with the system ``cc`` into a cache dir (keyed by its source, so an edit
recompiles) and called through ctypes, which releases the GIL: run it in a trio
thread. It reads the file itself (``pread``), so no tensor is copied into Python.

Without a C compiler :func:`load` raises :class:`FnvUnavailable` with one line that
says so; callers then go without the index (weights load the old way).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

OFFSET_BASIS = 0xCBF29CE484222325
PRIME = 0x100000001B3
_MASK = (1 << 64) - 1
#: Seconds the one-time compile may take (a few hundred ms on a busy 2-core box).
COMPILE_TIMEOUT = 60.0

_SOURCE = r"""
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>
#include <errno.h>

/* FNV-1a (64) over `length` bytes of `fd` from `offset`, continuing from *state.
   Returns 0, or an errno (a short file is EIO). */
int localp2p_fnv1a_fd(int fd, uint64_t offset, uint64_t length, uint64_t *state) {
    enum { BUF = 1 << 20 };
    unsigned char *buf = malloc(BUF);
    if (!buf) return ENOMEM;
    uint64_t h = *state;
    while (length > 0) {
        size_t want = length < BUF ? (size_t)length : BUF;
        ssize_t got = pread(fd, buf, want, (off_t)offset);
        if (got < 0) { if (errno == EINTR) continue; int e = errno; free(buf); return e; }
        if (got == 0) { free(buf); return EIO; }
        for (ssize_t i = 0; i < got; i++) { h ^= buf[i]; h *= 0x100000001b3ULL; }
        offset += (uint64_t)got;
        length -= (uint64_t)got;
    }
    free(buf);
    *state = h;
    return 0;
}

uint64_t localp2p_fnv1a_buf(const unsigned char *data, uint64_t size, uint64_t h) {
    for (uint64_t i = 0; i < size; i++) { h ^= data[i]; h *= 0x100000001b3ULL; }
    return h;
}
"""


class FnvUnavailable(RuntimeError):
    """The C hash could not be built or loaded (no compiler, unwritable dir); one line."""


def fnv1a_py(data: bytes, state: int = OFFSET_BASIS) -> int:
    """The reference implementation in Python (slow: tests and tiny inputs only)."""
    h = state
    for byte in data:
        h = ((h ^ byte) * PRIME) & _MASK
    return h


@functools.cache
def load(cache_dir: str) -> ctypes.CDLL:
    """The compiled hash library, built into ``cache_dir`` on first use.

    :raises FnvUnavailable: no ``cc`` on PATH, the compile failed, or the dir is unusable.
    """
    tag = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    lib_path = pathlib.Path(cache_dir) / f"fnv1a-{tag}.so"
    if not lib_path.exists():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not compiler:
            raise FnvUnavailable("no C compiler (cc) found to build the tensor hash; install one (e.g. gcc)")
        try:
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
                src = pathlib.Path(tmp) / "fnv1a.c"
                src.write_text(_SOURCE)
                out = pathlib.Path(tmp) / lib_path.name
                done = subprocess.run(
                    [compiler, "-O2", "-shared", "-fPIC", "-o", str(out), str(src)],
                    capture_output=True,
                    text=True,
                    timeout=COMPILE_TIMEOUT,
                    check=False,
                )
                if done.returncode != 0:
                    raise FnvUnavailable(f"building the tensor hash failed: {done.stderr.strip()[-300:]}")
                os.replace(out, lib_path)  # atomic: a racing process loads one complete file
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FnvUnavailable(f"cannot build the tensor hash in {lib_path.parent}: {exc}") from None
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as exc:
        raise FnvUnavailable(f"cannot load {lib_path}: {exc}") from None
    lib.localp2p_fnv1a_fd.restype = ctypes.c_int
    lib.localp2p_fnv1a_fd.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.POINTER(ctypes.c_uint64)]
    lib.localp2p_fnv1a_buf.restype = ctypes.c_uint64
    lib.localp2p_fnv1a_buf.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint64]
    return lib


class Hasher:
    """FNV-1a of file ranges and buffers with the compiled function (blocking; call from a thread)."""

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        """:raises FnvUnavailable: see :func:`load`."""
        self._lib = load(str(cache_dir))

    def file_range(self, path: str | os.PathLike[str], offset: int, size: int) -> int:
        """The hash of ``size`` bytes of ``path`` from ``offset``; OSError if unreadable or short."""
        fd = os.open(path, os.O_RDONLY)
        try:
            return self.fd_range(fd, offset, size)
        finally:
            os.close(fd)

    def fd_range(self, fd: int, offset: int, size: int) -> int:
        """The hash of ``size`` bytes of open file ``fd`` from ``offset``; OSError if unreadable or short."""
        state = ctypes.c_uint64(OFFSET_BASIS)
        err = self._lib.localp2p_fnv1a_fd(fd, offset, size, ctypes.byref(state))
        if err:
            raise OSError(err, f"hashing {size} bytes at {offset}: {os.strerror(err)}")
        return int(state.value)

    def buffer(self, data: bytes, state: int = OFFSET_BASIS) -> int:
        """The hash of ``data`` (continuing from ``state``)."""
        return int(self._lib.localp2p_fnv1a_buf(data, len(data), state))


def hex_name(value: int) -> str:
    """The cache file name llama.cpp uses for a hash: ``%016`` PRIx64."""
    return f"{value:016x}"
