"""A provider that is killed and comes back on the same identity and port is reachable at once.

py-libp2p refuses every dial to a peer for 60 s after one failed (its swarm's negative cache), even
while that peer holds a connection to us. ``node.host.heal_redials`` lifts the block when the peer
connects to us or we learn its addresses again (its record read again, identify). The provider is a
real ``clawnode start`` process, SIGKILLed and started again from the same data dir.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from dht.capability import fetch_sealed_record
from node.daemon import Node
from runtime.errors import ClawnodeError, ErrorCode
from tests.support.market import market_nodes, wait_for
from tests.support.processes import DaemonProcess, prepare_data_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _blocked(node: Node, peer: ID) -> bool:
    cache = getattr(node.host.get_network(), "_negative_peer_cache", None)
    return bool(cache is not None and cache.is_blocked(str(peer)))


async def test_a_killed_and_restarted_provider_is_reachable_within_two_seconds(tmp_path: Path) -> None:
    port = _free_port()
    config = '[bootstrap]\nuse_defaults = false\n[escrow]\nmode = "off"\n'
    provider = DaemonProcess(
        prepare_data_dir(tmp_path / "provider", config=config),
        ["--listen", f"/ip4/127.0.0.1/tcp/{port}", "--api-port", "0"],
    )
    await trio.to_thread.run_sync(provider.start)
    try:
        peer = ID.from_base58(provider.api("/api/id")["peer_id"])
        addrs = [Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]
        async with market_nodes([{}]) as (nodes, _):
            consumer = nodes[0]
            consumer.host.get_peerstore().add_addrs(peer, addrs, 3600)
            await fetch_sealed_record(consumer.host, peer)

            # SIGKILL: the connection drops, the next call fails, and py-libp2p blocks dials to it.
            await trio.to_thread.run_sync(provider.kill)
            network = consumer.host.get_network()
            await wait_for(lambda: all(c.is_closed for c in network.get_connections(peer)), timeout_s=5)
            with pytest.raises(ClawnodeError) as refused:
                await fetch_sealed_record(consumer.host, peer, timeout_s=3)
            assert refused.value.code == ErrorCode.UNAVAILABLE
            if not _blocked(consumer, peer):  # that call may have died on the closing connection
                with pytest.raises(Exception):  # noqa: B017 - a refused dial, in whatever type
                    await network.dial_peer(peer)
            assert _blocked(consumer, peer), "the test needs the negative dial cache to hold the provider"

            await trio.to_thread.run_sync(provider.start)  # same data dir: same identity, same port
            restarted_at = time.monotonic()
            # What the consumer hears next: the provider's record read again (discovery) or identify.
            consumer.host.get_peerstore().add_addrs(peer, addrs, 3600)
            with trio.fail_after(2):
                while True:
                    try:
                        await fetch_sealed_record(consumer.host, peer, timeout_s=1)
                        break
                    except ClawnodeError:
                        await trio.sleep(0.05)
            print(f"restarted provider answered {time.monotonic() - restarted_at:.2f} s after its restart")
    finally:
        await trio.to_thread.run_sync(provider.kill)


async def test_a_peer_that_connects_to_us_is_no_longer_blocked() -> None:
    async with market_nodes([{}, {}]) as (nodes, _):
        a, b = nodes
        a_id, b_id = a.host.get_id(), b.host.get_id()
        cache = a.host.get_network()._negative_peer_cache  # type: ignore[attr-defined]
        b.host.get_peerstore().add_addrs(a_id, a.host.get_addrs(), 60)
        await b.host.connect(b.host.get_peerstore().peer_info(a_id))
        # Connected but blocked (a dial failed while it restarted): the open connection is used.
        cache.mark_failed(str(b_id))
        stream = await a.host.new_stream(b_id, [TProtocol("/ipfs/id/1.0.0")])
        await stream.reset()
        # Blocked again, and we close every connection to it: the block holds until it connects to us.
        # B may dial us again on its own at once (its DHT sends a query the close broke once more on a fresh
        # connection, dht/lookup.py), or when told to below: either way the connection comes after the block.
        cache.mark_failed(str(b_id))
        assert _blocked(a, b_id)
        ours, theirs = set(a.host.get_network().get_connections(b_id)), set(b.host.get_network().get_connections(a_id))
        for conn in ours:
            await conn.close()
        # a loaded 2-core machine (the full suite at load 7) took over 5 s to drop them on both sides
        await wait_for(lambda: not ours & set(a.host.get_network().get_connections(b_id)), timeout_s=15)
        await wait_for(lambda: not theirs & set(b.host.get_network().get_connections(a_id)), timeout_s=15)
        # Nothing but a new connection from B lifted the block.
        assert _blocked(a, b_id) or a.host.get_network().get_connections(b_id)
        await b.host.connect(b.host.get_peerstore().peer_info(a_id))
        await wait_for(lambda: not _blocked(a, b_id), timeout_s=2)
