"""Idle or half-open TCP connections cannot keep peers out of a node (issue 14).

Raw sockets that never start the libp2p handshake used to take one of the node's inbound slots
each, for as long as py-libp2p waited for their handshake; a stranger holding ``max_connections``
of them kept every new peer out. Now only upgraded connections count, one IP may hold only a few
handshakes open, and an unfinished handshake is closed after ``node.handshake_timeout_s``.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import multiaddr
import pytest
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo

from node.config import EscrowSection, NodeSection
from node.conn_guard import ConnLimits, guard_of, ip_key
from node.daemon import Node
from node.datadir import read_api_token
from node.host import build_host
from runtime.service import ServiceRegistry
from tests.support.market import market_config, metric_samples

PING = TProtocol("/ipfs/ping/1.0.0")
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


async def _ping(client: IHost, server: IHost) -> None:
    await client.connect(PeerInfo(server.get_id(), server.get_addrs()))
    stream = await client.new_stream(server.get_id(), [PING])
    probe = bytes(range(32))
    await stream.write(probe)
    echoed = b""
    while len(echoed) < len(probe):
        echoed += await stream.read(len(probe) - len(echoed))
    assert echoed == probe
    await stream.close()


async def _open_idle(port: int, source_ip: str, count: int) -> list[trio.socket.SocketType]:
    sockets = []
    for _ in range(count):
        sock = trio.socket.socket()
        await sock.bind((source_ip, 0))
        await sock.connect(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


async def _closed_by_peer(sock: trio.socket.SocketType) -> bool:
    """Wait until the node closes ``sock`` (EOF or reset); what it sends first is read and dropped."""
    try:
        while await sock.recv(4096):
            pass
    except OSError:
        pass
    return True


async def _count_closed(sockets: list[trio.socket.SocketType], within_s: float) -> int:
    closed = 0

    async def watch(sock: trio.socket.SocketType) -> None:
        nonlocal closed
        with trio.move_on_after(within_s):
            if await _closed_by_peer(sock):
                closed += 1

    async with trio.open_nursery() as nursery:
        for sock in sockets:
            nursery.start_soon(watch, sock)
    return closed


async def test_idle_raw_tcp_connections_do_not_keep_peers_out() -> None:
    limits = ConnLimits(handshake_timeout_s=2.0, max_pending_per_ip=8)
    server = build_host(generate_new_ed25519_identity(), max_connections=20, conn_limits=limits)
    client = build_host(generate_new_ed25519_identity())
    async with server.run([LOOPBACK]), client.run([LOOPBACK]):
        port = int(str(server.get_addrs()[0]).split("/tcp/")[1].split("/")[0])
        # 50 sockets that never say a word, from two addresses other than the peer's.
        attackers = await _open_idle(port, "127.0.0.2", 30) + await _open_idle(port, "127.0.0.3", 20)
        opened_at = time.monotonic()
        await trio.sleep(0.3)

        # An honest peer still gets in, and a protocol round trip works.
        with trio.fail_after(5):
            await _ping(client, server)
        assert time.monotonic() - opened_at < limits.handshake_timeout_s

        # Beyond 8 per IP the node hung up at once; the 16 it let wait are closed at the deadline.
        assert await _count_closed(attackers, within_s=0.5) == 50 - 16
        assert await _count_closed(attackers, within_s=limits.handshake_timeout_s + 3) == 50
        guard = guard_of(server.get_network())
        assert guard is not None
        with trio.fail_after(2):  # the socket closes a moment before the guard counts it
            while guard.timed_out < 16 or guard.pending["127.0.0.2"] or guard.pending["127.0.0.3"]:
                await trio.sleep(0.01)
        assert guard.refused["per_ip"] == 34 and guard.timed_out == 16
        for sock in attackers:
            sock.close()

        # The peer's connection was never disturbed.
        with trio.fail_after(5):
            await _ping(client, server)


async def test_peers_that_come_and_go_do_not_use_up_inbound_slots() -> None:
    # py-libp2p gave an inbound connection's slot back only when the whole swarm stopped:
    # with 10 connections at most and 8 kept for outbound dials, the third peer was refused.
    server = build_host(generate_new_ed25519_identity(), max_connections=10)
    async with server.run([LOOPBACK]):
        for _ in range(6):
            client = build_host(generate_new_ed25519_identity())
            async with client.run([LOOPBACK]):
                with trio.fail_after(5):
                    await _ping(client, server)
                    await client.disconnect(server.get_id())
            with trio.fail_after(5):
                while server.get_network().get_connections():
                    await trio.sleep(0.05)

        # The two inbound slots count open upgraded connections: a third peer waits for one to close.
        first, second, third, fourth = (build_host(generate_new_ed25519_identity()) for _ in range(4))
        async with first.run([LOOPBACK]), second.run([LOOPBACK]), third.run([LOOPBACK]), fourth.run([LOOPBACK]):
            with trio.fail_after(5):
                await _ping(first, server)
                await _ping(second, server)
            with pytest.raises(Exception), trio.fail_after(5):  # noqa: B017 - refused however py-libp2p says it
                await _ping(third, server)
            guard = guard_of(server.get_network())
            assert guard is not None and guard.refused["inbound_full"] >= 1 and guard.inbound == 2
            await first.disconnect(server.get_id())
            with trio.fail_after(5):
                while guard.inbound > 1:
                    await trio.sleep(0.05)
                await _ping(fourth, server)  # (the third remembers its failed dial for a while)


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("::ffff:198.51.100.4", "198.51.100.4"),
    ],
)
def test_pending_handshakes_are_counted_per_ipv4_address_or_ipv6_64(address: str, key: str) -> None:
    assert ip_key(address) == key


def test_connection_limits_come_from_the_node_section() -> None:
    section = NodeSection(handshake_timeout_s=3, max_pending_connections_per_ip=2, max_pending_connections=40)  # type: ignore[call-arg]
    assert ConnLimits.of(section) == ConnLimits(handshake_timeout_s=3.0, max_pending_per_ip=2, max_pending=40)
    assert ConnLimits.of(NodeSection()) == ConnLimits()  # type: ignore[call-arg]


async def test_the_daemon_applies_the_node_section_and_reports_refusals(tmp_path: Path) -> None:
    base = market_config(bootstrap=[])
    config = base.model_copy(
        update={
            "node": NodeSection(  # type: ignore[call-arg]
                listen=["/ip4/127.0.0.1/tcp/0"], handshake_timeout_s=1.0, max_pending_connections_per_ip=2
            ),
            "escrow": EscrowSection(mode="off"),  # type: ignore[call-arg]
        }
    )
    node = Node(config, tmp_path / "node", services=ServiceRegistry())
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        port = int(node.listen_addrs()[0].split("/tcp/")[1].split("/")[0])
        idle = await _open_idle(port, "127.0.0.2", 5)
        assert await _count_closed(idle, within_s=0.5) == 3
        assert await _count_closed(idle, within_s=3) == 5
        token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
        async with httpx.AsyncClient() as client:
            reply = await client.get(f"{node.api_url}/metrics", headers={"authorization": f"Bearer {token}"})
        samples = metric_samples(reply.text)
        assert samples['clawnode_inbound_refused_total{reason="per_ip"}'] == 3
        assert samples["clawnode_inbound_handshake_timeouts_total"] == 2
        assert samples["clawnode_inbound_pending"] == 0
        for sock in idle:
            sock.close()
        nursery.cancel_scope.cancel()


async def test_one_ip_cannot_take_every_inbound_slot() -> None:
    # Inbound slots are max_connections less the 8 kept for outbound dials (here 4). A stranger opening
    # that many connections from one IP, each with a fresh identity, kept every other peer out for as
    # long as it held them ("inbound_full"); one IP now holds at most max_inbound_per_ip of them.
    limits = ConnLimits(max_inbound_per_ip=2, loopback_exempt=False)
    server = build_host(generate_new_ed25519_identity(), max_connections=12, conn_limits=limits)
    strangers = [build_host(generate_new_ed25519_identity()) for _ in range(4)]
    peer = build_host(generate_new_ed25519_identity())
    async with (
        server.run([LOOPBACK, multiaddr.Multiaddr("/ip6/::1/tcp/0")]),
        strangers[0].run([LOOPBACK]),
        strangers[1].run([LOOPBACK]),
        strangers[2].run([LOOPBACK]),
        strangers[3].run([LOOPBACK]),
        peer.run([multiaddr.Multiaddr("/ip6/::1/tcp/0")]),
    ):
        ipv4 = [addr for addr in server.get_addrs() if str(addr).startswith("/ip4/")]
        ipv6 = [addr for addr in server.get_addrs() if str(addr).startswith("/ip6/")]
        for stranger in strangers:
            with trio.move_on_after(3):
                try:
                    await stranger.connect(PeerInfo(server.get_id(), ipv4))
                except Exception:  # noqa: BLE001 - refused, however py-libp2p says it
                    pass
        guard = guard_of(server.get_network())
        assert guard is not None
        print(f"after the strangers: inbound {guard.inbound}")
        with trio.fail_after(3):  # a refused connection's close reaches the guard a moment later
            while guard.inbound > 2:
                await trio.sleep(0.05)
        print(f"inbound {guard.inbound}, refused {dict(guard.refused)}")
        assert guard.refused["per_ip_inbound"] >= 2
        # A peer from another address still gets in.
        with trio.fail_after(5):
            await client_ping(peer, server, ipv6)
        assert guard.inbound == 3


async def client_ping(client: IHost, server: IHost, addrs: list[multiaddr.Multiaddr]) -> None:
    await client.connect(PeerInfo(server.get_id(), addrs))
    await _ping(client, server)
