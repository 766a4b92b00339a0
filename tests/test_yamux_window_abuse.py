"""A peer that ignores Yamux's receive window cannot make a node buffer without bound.

py-libp2p 0.8.1 counts a DATA frame past the stream's receive window as a warning and buffers it all
the same, so a stranger with one stream to a handler that stopped reading (identify writes its answer
and closes its side) could push bytes until the node ran out of memory. ``node.yamux_writes`` bounds
each stream's buffer by the window the node granted: a stream whose peer writes past it stops taking
data (it reads as ended), and what was buffered stays within the window (at most 16 MiB, py-libp2p's largest),
and within twice that for all of a connection's streams together.
"""

from __future__ import annotations

import struct

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo
from libp2p.stream_muxer.yamux.yamux import MAX_WINDOW_SIZE, TYPE_DATA, YAMUX_HEADER_FORMAT

from node.host import build_host

IDENTIFY = TProtocol("/ipfs/id/1.0.0")
PING = TProtocol("/ipfs/ping/1.0.0")
CHUNK = 60_000
PUSHED = 24 << 20  # past the largest window a stream ever grants (16 MiB)


def _buffered(host: object) -> int:
    total = 0
    for conns in host.get_network().connections.values():  # type: ignore[attr-defined]
        for conn in conns if isinstance(conns, list) else [conns]:
            total += sum(len(buffer) for buffer in conn.muxed_conn.stream_buffers.values())
    return total


async def test_a_peer_writing_past_the_window_is_not_buffered_past_it() -> None:
    victim = build_host(generate_new_ed25519_identity())
    stranger = build_host(generate_new_ed25519_identity())
    async with (
        victim.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]),
        stranger.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]),
    ):
        with trio.fail_after(8):
            await stranger.connect(PeerInfo(victim.get_id(), victim.get_addrs()))
            stream = await stranger.new_stream(victim.get_id(), [IDENTIFY])
            await stream.read(65536)  # identify's answer: the node's handler is done reading
            muxed = stream.muxed_stream  # type: ignore[attr-defined]
            data = bytes(CHUNK)
            header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, muxed.stream_id, CHUNK)
            for _ in range(PUSHED // CHUNK):
                await muxed.conn._write_frame(header + data)  # past the window: no wait for updates
            # The node has read every frame by the time it answers a ping on the same connection.
            ping = await stranger.new_stream(victim.get_id(), [PING])
            await ping.write(bytes(32))
            echoed = b""
            while len(echoed) < 32:
                echoed += await ping.read(32 - len(echoed))
        held = _buffered(victim)
        print(f"buffered {held} bytes after {PUSHED} pushed")
        assert held <= MAX_WINDOW_SIZE, held


async def test_many_streams_past_their_windows_are_not_buffered_past_the_connections_bound() -> None:
    # Each stream's window grows with its first reads (identify's grants 2-8 MiB), and a connection may
    # hold 256 streams: within their windows, one stranger's connection held a gigabyte.
    victim = build_host(generate_new_ed25519_identity())
    stranger = build_host(generate_new_ed25519_identity())
    async with (
        victim.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]),
        stranger.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]),
    ):
        with trio.fail_after(9):
            await stranger.connect(PeerInfo(victim.get_id(), victim.get_addrs()))
            streams = []
            for _ in range(36):
                stream = await stranger.new_stream(victim.get_id(), [IDENTIFY])
                await stream.read(65536)
                streams.append(stream.muxed_stream)  # type: ignore[attr-defined]
            data = bytes(CHUNK)
            for muxed in streams:
                header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, muxed.stream_id, CHUNK)
                for _ in range(2_000_000 // CHUNK):
                    await muxed.conn._write_frame(header + data)
            ping = await stranger.new_stream(victim.get_id(), [PING])
            await ping.write(bytes(32))
            echoed = b""
            while len(echoed) < 32:
                echoed += await ping.read(32 - len(echoed))
        held = _buffered(victim)
        print(f"buffered {held} bytes after {36 * 2_000_000} pushed on 36 streams")
        assert held <= 2 * MAX_WINDOW_SIZE, held  # two streams' largest windows, on the whole connection
