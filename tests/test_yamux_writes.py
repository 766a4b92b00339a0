"""A Yamux writer cancelled once it holds the write lock still sends its frame whole (``node.yamux_writes``).

Otherwise its Noise nonce is spent on bytes that never leave, the peer's next decrypt fails and it
drops the whole connection: every stream on it resets (this cut leases whose consumer left calls
mid-stream on a loaded machine).
"""

from __future__ import annotations

import struct

import multiaddr
import trio
import trio.testing
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo
from libp2p.stream_muxer.yamux.yamux import FLAG_SYN, TYPE_PING, YAMUX_HEADER_FORMAT

from node.host import build_host

PING = TProtocol("/ipfs/ping/1.0.0")
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


async def _ping(client: IHost, server: IHost) -> None:
    stream = await client.new_stream(server.get_id(), [PING])
    probe = bytes(range(32))
    await stream.write(probe)
    echoed = b""
    while len(echoed) < len(probe):
        echoed += await stream.read(len(probe) - len(echoed))
    assert echoed == probe
    await stream.close()


async def test_a_writer_cancelled_as_it_takes_the_write_lock_leaves_the_connection_whole() -> None:
    server = build_host(generate_new_ed25519_identity())
    client = build_host(generate_new_ed25519_identity())
    async with server.run([LOOPBACK]), client.run([LOOPBACK]):
        await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
        await _ping(client, server)
        [conn] = client.get_network().get_connections(server.get_id())
        muxer = conn.muxed_conn
        frame = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_PING, FLAG_SYN, 0, 7)  # a ping the server answers
        await muxer._write_lock.acquire()  # type: ignore[attr-defined]
        writing = trio.CancelScope()

        async def writer() -> None:
            with writing:
                await muxer._write_frame(frame)  # type: ignore[attr-defined]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            muxer._write_lock.release()  # type: ignore[attr-defined]  # the writer holds it now ...
            writing.cancel()  # ... and is cancelled before it runs on
        with trio.fail_after(10):
            for _ in range(3):
                await _ping(client, server)
        # The same connection carried them: the server never had to drop it.
        assert client.get_network().get_connections(server.get_id()) == [conn]
