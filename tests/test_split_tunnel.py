"""A layer tunnel batches the engine's requests that wait for no reply, and its stream carries every byte."""

from __future__ import annotations

import struct

import multiaddr
import pytest
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo

from node.host import build_host
from protocols.lease import layers
from wire.yamux_window import WindowedReader


def request(command: int, payload: bytes) -> bytes:
    return bytes([command]) + struct.pack("<Q", len(payload)) + payload


async def _carried(sends: list[tuple[bytes, float]]) -> tuple[list[bytes], list[bytes]]:
    """What a consumer-side pump writes to its stream for the engine's ``sends`` (bytes, pause after)."""
    engine, tunnel_end = trio.socket.socketpair()
    near, far = trio.SocketStream(engine), trio.SocketStream(tunnel_end)
    written: list[bytes] = []
    counted: list[bytes] = []

    async def write(chunk: bytes) -> None:
        written.append(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            layers._pump, lambda n: layers._socket_read(far, n), write, counted.append, layers.RequestBatch()
        )
        for data, pause in sends:
            await near.send_all(data)
            await trio.sleep(pause)
        await near.aclose()
    assert b"".join(counted) == b"".join(written)  # metering sees every byte once
    return written, counted


async def test_set_tensors_cross_with_the_graph_that_reads_them_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layers, "COALESCE_S", 0.5)  # the bound never cuts the batch on a loaded machine
    sets = [request(layers.SET_TENSOR, bytes([i]) * 40) for i in range(6)]
    graph = request(10, b"g" * 500)
    get = request(8, b"o" * 24)
    sends = [(data, 0.001) for data in sets] + [(graph, 0.05), (get, 0.05)]
    written, _ = await _carried(sends)
    assert written[0] == b"".join(sets) + graph  # the inputs wait for the graph, which goes at once
    assert written[1] == get  # a request with a reply is never held


async def test_a_held_request_goes_on_after_the_bound() -> None:
    held = request(layers.SET_TENSOR, b"x" * 64)
    with trio.fail_after(5):
        written, _ = await _carried([(held, layers.COALESCE_S * 8), (request(8, b""), 0.02)])
    assert written[0] == held  # the engine sent nothing more: it crossed alone, within COALESCE_S
    assert len(written) == 2


def test_request_batch_knows_the_last_command_however_split() -> None:
    wire = request(10, b"g" * 30) + request(layers.SET_TENSOR, b"s" * 7)
    for cut in range(1, len(wire)):
        batch = layers.RequestBatch()
        batch.feed(wire[:cut])
        batch.feed(wire[cut:])
        assert not batch.partial and batch.held
    batch = layers.RequestBatch()
    batch.feed(request(layers.SET_TENSOR, b"s") + request(8, b"")[:5])
    assert batch.partial  # a get begun: read on for the rest of it


LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
ECHO = TProtocol("/clawnode/test-tunnel-echo/1.0.0")


async def test_a_tunnel_stream_carries_every_byte_in_order_both_ways_over_real_hosts() -> None:
    """The tunnel's stream reads (wire.yamux_window: window given back in bulk) and writes (frames
    written past the stream's locks) carry small messages and ones over the peer's window, in order, both ways."""
    hosts = [build_host(generate_new_ed25519_identity()) for _ in range(2)]
    sizes = [1, 9, 300, 4096, 65_000, 65_600, 300_000, 12, 1 << 20, 7]
    messages = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    echoed = bytearray()

    async def echo(stream: INetStream) -> None:
        read, write = WindowedReader(stream).read, layers._stream_writer(stream)
        while data := await read(layers.CHUNK):
            await write(data)
        await stream.close()

    with trio.fail_after(30):
        async with hosts[0].run([LOOPBACK]), hosts[1].run([LOOPBACK]):
            hosts[1].set_stream_handler(ECHO, echo)
            await hosts[0].connect(PeerInfo(hosts[1].get_id(), hosts[1].get_addrs()))
            stream = await hosts[0].new_stream(hosts[1].get_id(), [ECHO])
            read, write = WindowedReader(stream).read, layers._stream_writer(stream)
            async with trio.open_nursery() as nursery:

                async def receive() -> None:
                    while len(echoed) < sum(sizes):
                        data = await read(layers.CHUNK)
                        assert data, "the stream ended early"
                        echoed.extend(data)

                nursery.start_soon(receive)
                for message in messages:
                    for at in range(0, len(message), layers.CHUNK):  # as the pump writes: a chunk at a time
                        await write(message[at : at + layers.CHUNK])
            await stream.close()
            assert bytes(echoed) == b"".join(messages)
            # The connection's buffered Noise reader sees its end: the other side drops it, and a new
            # connection carries a tunnel stream again.
            await hosts[1].disconnect(hosts[0].get_id())
            while hosts[0].get_network().get_connections(hosts[1].get_id()):
                await trio.sleep(0.02)
            await hosts[0].connect(PeerInfo(hosts[1].get_id(), hosts[1].get_addrs()))
            stream = await hosts[0].new_stream(hosts[1].get_id(), [ECHO])
            read, write = WindowedReader(stream).read, layers._stream_writer(stream)
            await write(b"again")
            assert await read(64) == b"again"
            await stream.close()


async def test_a_tunnel_the_seller_never_answered_lets_its_stream_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer gives up on a seller that does not answer its tunnel's opening in time: the engine's
    connection closes and so does the stream (one left open kept the seller's tunnel, its slot of the
    lease and the consumer's stream waiting until the connection's end)."""
    from wire.framing import FrameReader

    monkeypatch.setattr(layers, "OPEN_TIMEOUT_S", 0.3)
    hosts = [build_host(generate_new_ed25519_identity()) for _ in range(2)]
    ended = trio.Event()

    async def silent(stream: INetStream) -> None:
        await FrameReader(stream, max_frame=layers.MAX_OPEN_FRAME).read_frame(5)  # its TunnelOpen
        with trio.move_on_after(10):
            while await WindowedReader(stream).read(64):
                pass
            ended.set()

    with trio.fail_after(30):
        async with hosts[0].run([LOOPBACK]), hosts[1].run([LOOPBACK]):
            hosts[1].set_stream_handler(layers.LAYERS_PROTOCOL, silent)
            await hosts[0].connect(PeerInfo(hosts[1].get_id(), hosts[1].get_addrs()))
            async with layers.open_tunnel(hosts[0], hosts[1].get_id(), "lease0", "token0") as local:
                address, port = local.endpoint.split(":")
                sock = await trio.open_tcp_stream(address, int(port))
                with trio.move_on_after(5):
                    assert await sock.receive_some(64) == b""  # closed by the tunnel
                await sock.aclose()
                with trio.move_on_after(5):
                    await ended.wait()
                assert ended.is_set(), "the seller's stream was left open"
