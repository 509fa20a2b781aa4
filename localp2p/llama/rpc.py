"""The parts of llama.cpp's ggml-RPC that localp2p needs.

Two things live here:

* a tiny client for the protocol's handshake (``HELLO``), device count and device
  memory, used to check a server before llama.cpp is pointed at it (llama.cpp aborts
  the whole process on a bad server; a failed probe here is just an exception);
* the ctypes entry points into the ggml libraries shipped inside llama-cpp-python:
  starting an rpc-server and registering remote servers as ggml devices.

Wire format (ggml-rpc.cpp, protocol v7)::

    request : | cmd (1 byte) | size (u64 LE) | payload |
    response: | size (u64 LE) | payload |

The server handles one client connection at a time and insists that the first
command on a connection is ``HELLO``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import pathlib
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

#: Protocol version of the llama.cpp vendored in llama-cpp-python 0.3.36 (ggml-rpc.h).
#: A server with another major version, or a newer minor one, is refused by llama.cpp.
PROTOCOL_VERSION = (7, 0, 0)

RPC_CMD_SET_TENSOR = 6
#: ``| rpc_tensor | offset u64 | hash u64 |``: "set this tensor from your cache if you hold
#: the bytes whose 64-bit FNV-1a is ``hash``" (sent for tensors above the hash threshold).
RPC_CMD_SET_TENSOR_HASH = 7
RPC_CMD_GRAPH_COMPUTE = 10
RPC_CMD_GET_DEVICE_MEMORY = 11
RPC_CMD_HELLO = 14
RPC_CMD_DEVICE_COUNT = 15
RPC_CMD_GRAPH_RECOMPUTE = 16
#: Requests the server never answers (protocol v7): the client sends them and goes on.
#: Per generated token llama.cpp sends a few of these to each worker, then one GET_TENSOR
#: that it waits for.
UNANSWERED_COMMANDS = frozenset({RPC_CMD_SET_TENSOR, RPC_CMD_GRAPH_COMPUTE, RPC_CMD_GRAPH_RECOMPUTE})
#: A length no ggml-RPC message has (weights go in many messages): the bytes are not ggml-RPC.
MAX_MESSAGE = 1 << 40
#: Size of the transport-capability block in HELLO (transport.h); all zero means plain TCP.
CONN_CAPS_SIZE = 24
#: Guards against a peer that is not an rpc-server answering with a huge length.
MAX_REPLY = 4096
#: Default seconds for a probe: connect plus three small round trips.
PROBE_TIMEOUT = 5.0

_LIB_CPU_DEVICE_TYPE = 0  # GGML_BACKEND_DEVICE_TYPE_CPU


class RPCError(Exception):
    """An rpc-server could not be reached or did not speak the expected protocol."""


@dataclass(frozen=True)
class DeviceMemory:
    free: int
    total: int


@dataclass(frozen=True)
class ServerInfo:
    """What a successful probe learned about one rpc-server."""

    endpoint: str
    version: tuple[int, int, int]
    devices: tuple[DeviceMemory, ...]
    #: The tensor cache directory the server runs with, where its supervisor knows it
    #: (a probe alone cannot tell; None also when the cache is off).
    cache_dir: str | None = None

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def memory_free(self) -> int:
        return sum(d.free for d in self.devices)

    @property
    def memory_total(self) -> int:
        return sum(d.total for d in self.devices)


class MessageBoundaries:
    """Where ggml-RPC messages end, in one direction of one connection.

    ``requests=True`` reads the client's side (``| cmd | size | payload |``), False the
    server's replies (``| size | payload |``). Feed it every chunk, in order;
    :meth:`feed` says whether the bytes so far end with a message somebody waits for:
    a request the server answers, or any reply. That is where a relay must pass on what
    it holds; up to there it may gather bytes into one write. Owns only its parse state.

    :raises ValueError: (from :meth:`feed`) on a length no ggml-RPC message has; the
        stream is something else, and the caller should stop reading it as ggml-RPC.
    """

    __slots__ = ("_cmd", "_header", "_header_size", "_left", "_requests")

    def __init__(self, *, requests: bool) -> None:
        self._requests = requests
        self._header_size = 9 if requests else 8
        self._header = bytearray()
        self._left = 0  # payload bytes of the current message still to come
        self._cmd = -1

    def feed(self, data: bytes) -> bool:
        """Account for ``data``; True if it ends a message that is waited for."""
        i, n = 0, len(data)
        while i < n:
            if self._left:
                take = min(self._left, n - i)
                self._left -= take
                i += take
                continue
            need = self._header_size - len(self._header)
            self._header += data[i : i + need]
            i += need
            if len(self._header) < self._header_size:
                break
            if self._requests:
                self._cmd, self._left = struct.unpack("<BQ", self._header)
            else:
                (self._left,) = struct.unpack("<Q", self._header)
            self._header.clear()
            if self._left > MAX_MESSAGE:
                raise ValueError(f"a {self._left}-byte message is not ggml-RPC")
        if self._left or self._header:
            return False
        return not self._requests or self._cmd not in UNANSWERED_COMMANDS


class CacheRequests:
    """The hashes of the SET_TENSOR_HASH requests in one connection's request bytes.

    Feed it every chunk the client sent, in order; :meth:`feed` returns the hashes of
    the SET_TENSOR_HASH requests that end in that chunk (the hash is the request's last
    8 bytes). Keeps only the current message's header, remaining length and, for
    SET_TENSOR_HASH, its last bytes; other payloads (weights) are skipped, not copied.

    :raises ValueError: (from :meth:`feed`) on a length no ggml-RPC message has.
    """

    __slots__ = ("_cmd", "_header", "_left", "_tail")

    def __init__(self) -> None:
        self._header = bytearray()
        self._left = 0
        self._cmd = -1
        self._tail = bytearray()

    def feed(self, data: bytes) -> list[int]:
        """Account for ``data``; the hashes of the SET_TENSOR_HASH requests it completes."""
        done: list[int] = []
        i, n = 0, len(data)
        while i < n:
            if self._left:
                take = min(self._left, n - i)
                if self._cmd == RPC_CMD_SET_TENSOR_HASH:
                    self._tail += data[i : i + take]
                    del self._tail[:-8]
                self._left -= take
                i += take
                if not self._left and self._cmd == RPC_CMD_SET_TENSOR_HASH and len(self._tail) == 8:
                    done.append(struct.unpack("<Q", self._tail)[0])
                continue
            need = 9 - len(self._header)
            self._header += data[i : i + need]
            i += need
            if len(self._header) < 9:
                break
            self._cmd, self._left = struct.unpack("<BQ", self._header)
            self._header.clear()
            self._tail.clear()
            if self._left > MAX_MESSAGE:
                raise ValueError(f"a {self._left}-byte message is not ggml-RPC")
        return done


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too); raises ValueError with the offending text."""
    host, sep, port = endpoint.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a host:port endpoint: {endpoint!r}")
    return host.strip("[]"), int(port)


def version_compatible(version: tuple[int, int, int]) -> bool:
    """The rule llama.cpp's client applies: same major, minor not newer than ours."""
    return version[0] == PROTOCOL_VERSION[0] and version[1] <= PROTOCOL_VERSION[1]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes from a blocking socket; :class:`RPCError` if it closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise RPCError("connection closed by the server")
        buf += chunk
    return bytes(buf)


def _command(sock: socket.socket, cmd: int, payload: bytes) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", recv_exact(sock, 8))
    if size > MAX_REPLY:
        raise RPCError(f"reply of {size} bytes to command {cmd}: not an rpc-server")
    return recv_exact(sock, size)


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT) -> ServerInfo:
    """Connect to an rpc-server, do HELLO, and read its devices' memory.

    Blocking (run it in a thread from trio). Raises :class:`RPCError` when the server
    is unreachable, is not an rpc-server, or speaks an incompatible protocol version;
    the message names the endpoint.
    """
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = _command(sock, RPC_CMD_HELLO, bytes(CONN_CAPS_SIZE))
            if len(hello) != 4 + CONN_CAPS_SIZE:
                raise RPCError(f"{endpoint}: HELLO reply of {len(hello)} bytes, expected {4 + CONN_CAPS_SIZE}")
            version = (hello[0], hello[1], hello[2])
            if not version_compatible(version):
                raise RPCError(
                    f"{endpoint}: rpc-server speaks protocol {'.'.join(map(str, version))}, "
                    f"this build needs {PROTOCOL_VERSION[0]}.x (<= {'.'.join(map(str, PROTOCOL_VERSION))})"
                )
            count_reply = _command(sock, RPC_CMD_DEVICE_COUNT, b"")
            if len(count_reply) != 4:
                raise RPCError(f"{endpoint}: malformed DEVICE_COUNT reply")
            (count,) = struct.unpack("<I", count_reply)
            devices = []
            for device in range(min(count, 16)):
                mem = _command(sock, RPC_CMD_GET_DEVICE_MEMORY, struct.pack("<I", device))
                if len(mem) != 16:
                    raise RPCError(f"{endpoint}: malformed GET_DEVICE_MEMORY reply")
                free, total = struct.unpack("<QQ", mem)
                devices.append(DeviceMemory(free=free, total=total))
    except RPCError:
        raise
    except (OSError, struct.error) as exc:
        raise RPCError(f"{endpoint}: {exc.strerror or exc}" if isinstance(exc, OSError) else f"{endpoint}: {exc}") from exc
    return ServerInfo(endpoint=endpoint, version=version, devices=tuple(devices))


# --- ctypes entry points -------------------------------------------------------------


@functools.cache
def _lib_dir() -> pathlib.Path:
    import llama_cpp  # noqa: PLC0415 - heavy import, only where it is needed

    return pathlib.Path(llama_cpp.__file__).resolve().parent / "lib"


@functools.cache
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """Load ``libggml.so.0`` and ``libggml-rpc.so.0`` from llama-cpp-python's wheel.

    The wheel holds ``libggml.so``, ``.so.0`` and ``.so.0.x.y`` as separate copies;
    llama.cpp itself links the ``.so.0`` names, so loading any other name would start
    a second ggml whose device registry llama.cpp never sees.
    """
    lib_dir = _lib_dir()
    try:
        ggml = ctypes.CDLL(str(lib_dir / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
        rpc = ctypes.CDLL(str(lib_dir / "libggml-rpc.so.0"), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise RPCError(f"llama-cpp-python was built without GGML_RPC ({exc}); rerun `make install`") from exc
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_register.restype = None
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    return ggml, rpc


def protocol_version() -> str:
    """The RPC protocol version this installation speaks, checking the library is present."""
    _libs()
    return ".".join(map(str, PROTOCOL_VERSION))


def register_server(endpoint: str) -> None:
    """Make one rpc-server a ggml device, so the next model load can place layers on it.

    Must run before the model is loaded, in the process that loads it. Probe the server
    first: llama.cpp aborts the process when it cannot talk to it. Raises RPCError
    when llama.cpp reports no devices on it.
    """
    ggml, rpc = _libs()
    reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
    if not reg:
        raise RPCError(f"{endpoint}: llama.cpp found no devices on this rpc-server")
    ggml.ggml_backend_register(reg)


def cpu_buffer_type() -> int:
    """Address of the host CPU device's buffer type (for llama.cpp tensor overrides)."""
    ggml, _ = _libs()
    cpu = ggml.ggml_backend_dev_by_type(_LIB_CPU_DEVICE_TYPE)
    buft = ggml.ggml_backend_dev_buffer_type(cpu) if cpu else None
    if not buft:
        raise RPCError("no CPU buffer type in this ggml build")
    return int(buft)


def serve_forever(endpoint: str, cache_dir: str | None, threads: int, device_handles: Sequence[int] = ()) -> None:
    """Run llama.cpp's rpc-server on ``endpoint`` with ``device_handles`` (default: the CPU device).

    The handles come from :func:`localp2p.llama.devices.selected_handles`. Blocks for
    the life of the process (the C loop never returns while it can accept); meant for
    a dedicated child process. Returns only when the server could not start (e.g. the
    port is taken), which the caller treats as a failure.
    """
    ggml, rpc = _libs()
    if not device_handles:
        cpu = ggml.ggml_backend_dev_by_type(_LIB_CPU_DEVICE_TYPE)
        if not cpu:
            raise RPCError("no CPU device in this ggml build")
        device_handles = [cpu]
    devices = (ctypes.c_void_p * len(device_handles))(*device_handles)
    rpc.ggml_backend_rpc_start_server(
        endpoint.encode(),
        cache_dir.encode() if cache_dir else None,
        threads,
        len(device_handles),
        devices,
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for a child that binds it itself)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
