"""Issue 16: the worker's tensor gate holds llama.cpp's "set from your cache" until the fill placed it.

* the request scanner finds SET_TENSOR_HASH hashes wherever the reads cut the bytes;
* the gate's framing holds a request for a pending tensor until it is released, lets
  others through, and stops reading a connection once the fill is over;
* against real llama.cpp: a load through a recording proxy to a real rpc-server sends
  SET_TENSOR_HASH requests whose hashes are exactly our index's hashes of the tensors
  above the threshold (the bytes the gate reads are where llama.cpp puts them).

The gate's effect on whole loads (fill and load overlapping, nothing crossing the
tunnels twice) is checked by test_weights_swarm.py and the bench's weights section.
"""

from __future__ import annotations

import pathlib
import struct
import subprocess
import sys

import pytest
import trio

from localp2p.genmodel import Shape, write_model
from localp2p.llama import rpc
from localp2p.llama.fnv import Hasher
from localp2p.llama.model_index import ModelIndex
from localp2p.testing.cluster import CountingProxy, start_worker
from localp2p.worker.tensor_gate import TensorGate


def _request(cmd: int, payload: bytes) -> bytes:
    return struct.pack("<BQ", cmd, len(payload)) + payload


def _hash_request(hash_: int) -> bytes:
    # | rpc_tensor (opaque here) | offset u64 | hash u64 |
    return _request(rpc.RPC_CMD_SET_TENSOR_HASH, b"t" * 296 + struct.pack("<QQ", 0, hash_))


HELLO = _request(rpc.RPC_CMD_HELLO, bytes(rpc.CONN_CAPS_SIZE))
WEIGHTS = _request(rpc.RPC_CMD_SET_TENSOR, bytes(range(256)) * 40)


def test_scanner_finds_hashes_wherever_reads_cut() -> None:
    stream = HELLO + _hash_request(0x1122334455667788) + WEIGHTS + _hash_request(7) + _hash_request(0xFFFFFFFFFFFFFFFF)
    for cut in (1, 3, 8, 9, 17, 300, 4096, len(stream)):
        scanner = rpc.CacheRequests()
        found: list[int] = []
        for i in range(0, len(stream), cut):
            found += scanner.feed(stream[i : i + cut])
        assert found == [0x1122334455667788, 7, 0xFFFFFFFFFFFFFFFF], cut
    with pytest.raises(ValueError):
        rpc.CacheRequests().feed(b"\x06" + b"\xff" * 8)


def test_gate_holds_a_pending_tensor_until_placed() -> None:
    trio.run(_gate_holds_a_pending_tensor_until_placed)


async def _gate_holds_a_pending_tensor_until_placed() -> None:
    gate = TensorGate()
    assert gate.framing("worker").from_peer(HELLO) is None  # opened with nothing pending: never read
    gate.arm([1, 2])
    framing = gate.framing("worker")
    assert framing.from_peer(HELLO) is None
    assert framing.from_peer(_hash_request(99)) is None  # not in the fill: goes at once
    hold = framing.from_peer(_hash_request(1))
    assert hold is not None
    passed = trio.Event()

    async def relay() -> None:
        await hold
        passed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay)
        await trio.sleep(0.2)
        gate.progressed()
        assert not passed.is_set()
        gate.release(1)
        with trio.fail_after(5):
            await passed.wait()
    assert gate.held == 1
    gate.release_all([2])
    assert not gate.armed
    assert framing.from_peer(_hash_request(2)) is None  # the fill is over: read no further
    gate.arm([3])
    assert framing.from_peer(_hash_request(3)) is None  # ...even when the next fill starts
    assert gate.framing("server").from_peer(_hash_request(3)) is None  # the server end never holds


def test_other_protocols_are_not_held() -> None:
    gate = TensorGate()
    gate.arm([5])
    framing = gate.framing("worker")
    assert framing.from_peer(b"GET / HTTP/1.1\r\n" + _hash_request(5)) is None


#: F16 1024x5632 FFN matrices (11 MiB: above llama.cpp's 10 MiB hash threshold).
SHAPE = Shape(layers=2, embd=1024, ff=5632, tensor_type="f16")

LOAD = """
import sys
from localp2p.llama import rpc
rpc.register_server(sys.argv[2])
import llama_cpp
llama_cpp.Llama(model_path=sys.argv[1], n_gpu_layers=99, n_ctx=256, n_threads=1, verbose=False)
"""


def test_llama_cpp_asks_by_the_hashes_we_index(tmp_path: pathlib.Path) -> None:
    model = tmp_path / "gate.gguf"
    write_model(model, SHAPE)
    index = ModelIndex(tmp_path / "index", Hasher(tmp_path / "native")).entry(model)
    expected = {t.hash for t in index.cacheable() if t.layer is not None}
    assert len(expected) == 3 * SHAPE.layers
    worker, endpoint = start_worker(tmp_path, None, "--cache-dir", str(tmp_path / "cache"), name="gate-worker")
    proxy = CountingProxy(endpoint, record=True)
    try:
        done = subprocess.run([sys.executable, "-c", LOAD, str(model), proxy.endpoint], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        proxy.close()
        worker.stop()
    found: set[int] = set()
    for sent in proxy.requests:
        found.update(rpc.CacheRequests().feed(bytes(sent)))
    all_cacheable = {t.hash for t in index.cacheable()}
    assert expected <= found <= all_cacheable, (sorted(expected - found), sorted(found - all_cacheable))
