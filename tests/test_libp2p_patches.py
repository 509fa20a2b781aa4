"""Canaries for localp2p.p2p._libp2p: each fails if the py-libp2p code a patch relies on changes.

For every patch, one test checks the upstream shape it relies on (class, attribute,
signature, the line of upstream code it intercepts) on py-libp2p's own objects, and
one checks that after install() / patch_host() the patched behaviour is in place.
And install() refuses, with one line, a py-libp2p it was not written for.

Run: .venv/bin/python -m pytest tests/test_libp2p_patches.py -q (a few seconds)
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from typing import Any

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.identity.identify_push.identify_push import ID_PUSH
from libp2p.identity.update import update_peerstore_from_identify
from libp2p.io import trio as libp2p_io_trio
from libp2p.io.trio import TrioTCPStream
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.net_stream import NetStream
from libp2p.network.swarm import Swarm
from libp2p.relay.circuit_v2 import dcutr as upstream_dcutr
from libp2p.stream_muxer import muxer_multistream
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.rw_lock import ReadWriteLock
from libp2p.stream_muxer.yamux import yamux as upstream_yamux
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream
from libp2p.utils.varint import read_length_prefixed_protobuf
from multiaddr import Multiaddr

from localp2p.errors import StartupError
from localp2p.p2p import _libp2p
from localp2p.p2p._libp2p import connmgr, dcutr, hotpath, identify, log_limits, relay_circuits, yamux
from localp2p.p2p.node import open_node

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
ECHO = "/localp2p/test/patches/1.0.0"


def _params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _upstream_init(cls: type) -> Any:
    """``cls.__init__`` as py-libp2p wrote it (the hot path wraps it once installed)."""
    init = cls.__init__
    return getattr(init, "__wrapped__", init)


def _fresh(cls: type, *args: Any, **kwargs: Any) -> Any:
    """An object of ``cls`` built by py-libp2p's own ``__init__`` only."""
    obj = cls.__new__(cls)
    _upstream_init(cls)(obj, *args, **kwargs)
    return obj


def _plain_host() -> Any:
    """A host as py-libp2p builds it by default (never run)."""
    return new_host(key_pair=create_new_key_pair())


# --------------------------------------------------------------------------
# the version check
# --------------------------------------------------------------------------


def test_the_pinned_libp2p_is_installed() -> None:
    assert _libp2p.installed_version() == _libp2p.LIBP2P_VERSION


@pytest.mark.parametrize("found", ["0.9.0", None])
def test_install_refuses_another_libp2p_with_one_line(monkeypatch: pytest.MonkeyPatch, found: str | None) -> None:
    monkeypatch.setattr(_libp2p, "installed_version", lambda: found)
    with pytest.raises(StartupError) as info:
        _libp2p.install()
    message = str(info.value)
    assert "\n" not in message
    assert _libp2p.LIBP2P_VERSION in message and (found or "unknown") in message


def test_open_node_refuses_before_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_libp2p, "installed_version", lambda: "0.9.0")

    async def main() -> None:
        async with open_node(create_new_key_pair(), LOOPBACK):
            pytest.fail("a node started on the wrong py-libp2p")

    with pytest.raises(StartupError):  # bare, not in an ExceptionGroup: nothing was started
        trio.run(main)


# --------------------------------------------------------------------------
# yamux: ReaderNeverBlocksYamux, PY_YAMUX_RELEASE_ON_READ
# --------------------------------------------------------------------------


def test_yamux_upstream_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    # MuxerMultistream builds the module-level name, whatever muxer_opt says
    assert "Yamux(" in inspect.getsource(MuxerMultistream.new_conn)
    assert issubclass(muxer_multistream.Yamux, Yamux)
    assert _params(Yamux.accept_stream) == ["self"]
    assert _params(Yamux.handle_incoming) == ["self"]
    assert _params(Yamux._write_frame) == ["self", "data"]
    finalize = inspect.signature(Yamux._finalize_stream).parameters
    assert list(finalize) == ["self", "stream", "fully_closed"]
    assert finalize["fully_closed"].kind is inspect.Parameter.KEYWORD_ONLY
    conn = _fresh(Yamux, None, "peer", is_initiator=True)
    assert isinstance(conn.streams, dict) and isinstance(conn.stream_buffers, dict)
    assert conn._nursery is None and conn.peer_id == "peer"
    stream = _fresh(YamuxStream, 2, conn, False)
    assert (stream.stream_id, stream.is_initiator, stream.closed, stream.reset_received) == (2, False, False, False)
    # read at call time, so a default set at node start still counts
    monkeypatch.setenv(yamux.YAMUX_RELEASE_ON_READ_ENV, "0")
    assert upstream_yamux._yamux_release_on_read() is False
    monkeypatch.delenv(yamux.YAMUX_RELEASE_ON_READ_ENV)
    assert upstream_yamux._yamux_release_on_read() is True


def test_yamux_patch_installed() -> None:
    _libp2p.install()
    assert muxer_multistream.Yamux is yamux.ReaderNeverBlocksYamux
    assert yamux.YAMUX_RELEASE_ON_READ_ENV in os.environ  # ours, or the operator's own
    assert YamuxStream._auto_tune_and_send_window_update is yamux.credit_in_batches


def test_yamux_window_update_upstream_shape() -> None:
    """Upstream's method has the branch the patch leaves out, and what the patch relies on."""
    source = inspect.getsource(yamux._upstream_window_update)
    assert "0 < delta < threshold and bytes_read > 0" in source and "_pending_recv_release" in source
    assert _params(yamux._upstream_window_update) == ["self", "bytes_read"]
    assert _params(YamuxStream._grow_to_delta) == ["self", "buffered"]
    assert _params(YamuxStream._apply_autotune_epoch) == ["self", "buffered"]
    assert _params(YamuxStream.send_window_update) == ["self", "increment", "skip_lock"]


def test_small_reads_send_no_window_update_each() -> None:
    """500 echo round trips of 200 bytes: credit goes back in a few batches, not after
    every other read (upstream: one WINDOW_UPDATE per round trip), and the bytes arrive."""
    updates = 0
    send_window_update = YamuxStream.send_window_update

    async def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal updates
        updates += 1
        await send_window_update(self, *args, **kwargs)

    async def echo(stream: Any) -> None:
        while data := await stream.read(65536):
            await stream.write(data)

    async def main() -> None:
        with trio.fail_after(60):
            async with open_node(create_new_key_pair(), LOOPBACK) as a, open_node(create_new_key_pair(), LOOPBACK) as b:
                b.set_handler(ECHO, echo)
                await a.connect(b.peer_info)
                stream = await a.new_stream(b.peer_id, ECHO)
                for i in range(500):
                    chunk = bytes([i % 251]) * 200
                    await stream.write(chunk)
                    got = b""
                    while len(got) < len(chunk):
                        got += await stream.read(len(chunk) - len(got))
                    assert got == chunk
                await stream.close()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(YamuxStream, "send_window_update", counting)
        trio.run(main)
    # 2 x 500 x 200 bytes read = 200 KB in all, under one 256 KiB window per side.
    assert updates <= 4, updates


# --------------------------------------------------------------------------
# hotpath: buffered TCP reads, free locks
# --------------------------------------------------------------------------


def test_hotpath_upstream_shape() -> None:
    source = inspect.getsource(libp2p_io_trio)
    assert "async def read(self, n: int | None = None) -> bytes:" in source
    assert "self.stream.receive_some(" in source and "async with self.read_lock:" in source
    conn = _fresh(Yamux, None, None, is_initiator=True)
    stream = _fresh(YamuxStream, 1, conn, True)
    samples = {
        TrioTCPStream: _fresh(TrioTCPStream, None),
        NetStream: _fresh(NetStream, stream, None, None),
        YamuxStream: stream,
        Yamux: conn,
        ReadWriteLock: _fresh(ReadWriteLock),
    }
    for cls, names in hotpath.LOCKS.items():
        for name in names:
            assert type(getattr(samples[cls], name)) is trio.Lock, f"{cls.__name__}.{name}"
    assert type(samples[ReadWriteLock]._writer_lock) is trio.Semaphore


def test_hotpath_fails_loudly_when_an_attribute_is_renamed() -> None:
    class Renamed:
        def __init__(self) -> None:
            self.read_lock_v2 = trio.Lock()

    with pytest.raises(AttributeError, match=r"Renamed\.read_lock is NoneType"):
        hotpath._swap_locks(Renamed(), ("read_lock",))


def test_hotpath_installed() -> None:
    _libp2p.install()
    assert TrioTCPStream.read is hotpath._buffered_read
    hotpath._check()  # one object of each class, locks swapped
    assert isinstance(TrioTCPStream(None).read_lock, hotpath.FreeLock)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# dcutr: the punch's source address, the relayed connection kept while used
# --------------------------------------------------------------------------


def test_dcutr_upstream_shape() -> None:
    protocol = upstream_dcutr.DCUtRProtocol
    assert "_local_tcp_listen_addrs(self.host)" in inspect.getsource(protocol._perform_hole_punch)
    assert "_local_tcp_listen_addrs(self.host)" in inspect.getsource(protocol._get_observed_addrs)
    assert "_close_relayed_conns_after_grace" in inspect.getsource(protocol._schedule_relay_close)
    assert _params(protocol._close_relayed_conns_after_grace) == ["self", "peer_id", "grace"]
    assert upstream_dcutr._tcp_ip_port(Multiaddr("/ip4/0.0.0.0/tcp/4001")) == (4, "0.0.0.0", 4001)


def test_dcutr_patch_installed() -> None:
    _libp2p.install()
    assert upstream_dcutr._local_tcp_listen_addrs is dcutr._bound_tcp_listen_addrs
    assert issubclass(dcutr.TunnelSafeDCUtR, upstream_dcutr.DCUtRProtocol)


def test_relay_circuits_upstream_shape() -> None:
    """Upstream's circuit cleanup goes through ``_active_relays`` by peer key, which the patch disarms."""
    from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol

    relay_data = inspect.getsource(CircuitV2Protocol._relay_data)
    assert "self._active_relays[peer_id]" in relay_data and "del self._active_relays[peer_id]" in relay_data
    assert _params(CircuitV2Protocol._relay_data) == ["self", "src_stream", "dst_stream", "peer_id", "deadline", "circuit_data_limit"]
    assert "self._active_relays[peer_id] = (stream, dst_stream)" in inspect.getsource(CircuitV2Protocol._handle_connect)
    relay_circuits.check()
    assert issubclass(relay_circuits.CircuitSafeRelayProtocol, CircuitV2Protocol)


# --------------------------------------------------------------------------
# identify/push
# --------------------------------------------------------------------------


def test_identify_push_upstream_shape() -> None:
    assert ID_PUSH == identify.IDENTIFY_PUSH_PROTOCOL
    assert _params(read_length_prefixed_protobuf) == ["stream", "use_varint_format", "max_length"]
    assert _params(update_peerstore_from_identify) == ["peerstore", "peer_id", "identify_msg"]
    handler = _plain_host().get_mux().handlers.get(TProtocol(ID_PUSH))
    assert handler is not None and handler.__module__ != identify.__name__


def test_identify_push_replaced() -> None:
    host = _plain_host()
    _libp2p.patch_host(host, auto_connect=False)
    assert host.get_mux().handlers[TProtocol(ID_PUSH)].__module__ == identify.__name__


# --------------------------------------------------------------------------
# connmgr: the opt-in auto-connector
# --------------------------------------------------------------------------


def test_connmgr_upstream_shape() -> None:
    assert "self.auto_connector.start()" in inspect.getsource(Swarm.run)
    assert _params(AutoConnector.__init__) == ["self", "swarm", "auto_connect_interval"]
    fields = {f.name for f in dataclasses.fields(ConnectionConfig)}
    assert {"min_connections", "low_watermark", "high_watermark", "auto_connect_interval"} <= fields
    connector = _plain_host().get_network().auto_connector
    assert type(connector) is AutoConnector and connector._started is False


@pytest.mark.parametrize("auto_connect", [False, True])
def test_connmgr_patched(auto_connect: bool) -> None:
    host = _plain_host()
    _libp2p.patch_host(host, auto_connect=auto_connect)
    connector = host.get_network().auto_connector
    assert isinstance(connector, connmgr.OptInAutoConnector) and connector.enabled is auto_connect
    trio.run(connector.start)
    assert connector._started is auto_connect


# --------------------------------------------------------------------------
# log_limits: "Failed to open stream to peer"
# --------------------------------------------------------------------------


def test_outbound_failure_log_upstream_shape() -> None:
    source = inspect.getsource(BasicHost.new_stream)
    assert 'f"Failed to open stream to peer {peer_id}:' in source
    assert log_limits.OUTBOUND_FAILURE_PREFIX == "Failed to open stream to peer "
    assert inspect.getmodule(BasicHost).__name__ == log_limits.OUTBOUND_FAILURE_LOGGER  # type: ignore[union-attr]


def test_outbound_failure_log_limited() -> None:
    _libp2p.install()
    logger = logging.getLogger(log_limits.OUTBOUND_FAILURE_LOGGER)
    assert any(isinstance(f, log_limits.OutboundFailureLogLimit) for f in logger.filters)

    def record(message: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, None)

    peer = "12D3KooWcanary" + os.urandom(4).hex()
    first = record(f"Failed to open stream to peer {peer}:\n  Error: refused")
    assert logger.filter(first)
    assert not logger.filter(record(f"Failed to open stream to peer {peer}:\n  Error: again"))
    assert logger.filter(record("some other line"))


# --------------------------------------------------------------------------
# all of it, on a running node
# --------------------------------------------------------------------------


def test_patches_are_in_place_on_a_running_node() -> None:
    async def echo(stream: Any) -> None:
        await stream.write(await stream.read(4))

    async def main() -> None:
        with trio.fail_after(20):
            async with open_node(create_new_key_pair(), LOOPBACK) as a, open_node(create_new_key_pair(), LOOPBACK) as b:
                b.set_handler(ECHO, echo)
                await a.connect(b.peer_info)
                stream = await a.new_stream(b.peer_id, ECHO)
                await stream.write(b"ping")
                assert await stream.read(4) == b"ping"
                await stream.close()
                for node, peer in ((a, b.peer_id), (b, a.peer_id)):
                    (conn,) = node.host.get_network().get_connections(peer)
                    muxer = conn.muxed_conn
                    assert isinstance(muxer, yamux.ReaderNeverBlocksYamux)
                    assert isinstance(muxer._write_lock, hotpath.FreeLock)
                    assert isinstance(muxer.streams_lock, hotpath.FreeLock)
                    assert isinstance(node.host.get_network().auto_connector, connmgr.OptInAutoConnector)
                    push = node.host.get_mux().handlers[TProtocol(ID_PUSH)]
                    assert push.__name__ == "safe_identify_push"  # ours, wrapped by set_handler's guard
                assert isinstance(stream._state_lock, hotpath.FreeLock)

    trio.run(main)
