"""A stranger's idle DHT streams cannot starve a node's DHT (real hosts on loopback).

py-libp2p serves at most 12 inbound DHT streams at once, shared by every peer, and read each with no
time limit: a stranger that opened 12 and wrote nothing had every honest query reset.
"""

from __future__ import annotations

import contextlib

import multiaddr
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from dht import service as service_module
from dht.lookup_guard import InboundSlots
from node.host import build_host
from tests.support.swarm import open_swarm
from wire.framing import encode_uvarint


async def find_node(host: IHost, target: ID, protocol: TProtocol) -> bytes:
    """One FIND_NODE as a peer sends it; the raw answer (empty if the stream was reset)."""
    request = Message(type=Message.MessageType.FIND_NODE, key=host.get_id().to_bytes()).SerializeToString()
    with trio.fail_after(5):
        stream = await host.new_stream(target, [protocol])
        try:
            await stream.write(encode_uvarint(len(request)) + request)
            return bytes(await stream.read(65536))
        except Exception:  # noqa: BLE001 - a reset stream: no answer
            return b""
        finally:
            await stream.reset()


async def test_a_strangers_idle_dht_streams_leave_honest_queries_answered_and_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service_module, "INBOUND_STREAM_S", 1.5)
    async with open_swarm(2) as nodes:
        server, honest = nodes
        protocol = TProtocol(server.dht.protocol_id)
        assert await find_node(honest.host, server.host.get_id(), protocol)
        stranger = build_host(generate_new_ed25519_identity())
        async with stranger.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            await stranger.connect(info_from_p2p_addr(multiaddr.Multiaddr(f"{server.addrs[0]}/p2p/{server.peer_id}")))
            idle = []
            for _ in range(12):
                try:
                    idle.append(await stranger.new_stream(server.host.get_id(), [protocol]))
                except Exception:  # noqa: BLE001 - refused: the stranger holds its share already
                    pass
            await trio.sleep(0.3)
            assert await find_node(honest.host, server.host.get_id(), protocol), "an honest query was reset"
            assert server.dht.inbound.held(stranger.get_id()) == service_module.INBOUND_STREAMS_PER_PEER
            # The 8 held end at 1.5 s; the 4 that waited for them are served next, and end 1.5 s later.
            await trio.sleep(3.5)
            ended = 0
            for stream in idle:
                try:
                    with trio.move_on_after(0.5):
                        ended += not await stream.read(1)
                except Exception:  # noqa: BLE001 - reset: ended
                    ended += 1
            assert ended == len(idle)
            assert server.dht.inbound.held(stranger.get_id()) == 0


async def test_identities_behind_one_ip_share_one_bucket_of_inbound_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four stranger identities from one host open 12 idle DHT streams each: together they hold the IP's
    share (16 of 32), and an honest peer's query is still answered. Loopback gives every host the same
    IP, so the strangers' streams are placed behind one public IP by replacing ``inbound_bucket``, the
    function that reads a stream's remote IP; the honest peer's stays loopback (no bucket)."""
    monkeypatch.setattr(service_module, "INBOUND_STREAM_S", 3.0)
    async with open_swarm(2) as nodes:
        server, honest = nodes
        protocol = TProtocol(server.dht.protocol_id)
        strangers = [build_host(generate_new_ed25519_identity()) for _ in range(4)]
        stranger_ids = {host.get_id() for host in strangers}
        read_bucket = service_module.inbound_bucket
        monkeypatch.setattr(
            service_module,
            "inbound_bucket",
            lambda stream: "203.0.113.7" if stream.muxed_conn.peer_id in stranger_ids else read_bucket(stream),
        )
        async with contextlib.AsyncExitStack() as stack:
            for stranger in strangers:
                await stack.enter_async_context(stranger.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
                target = multiaddr.Multiaddr(f"{server.addrs[0]}/p2p/{server.peer_id}")
                await stranger.connect(info_from_p2p_addr(target))
                for _ in range(12):
                    with contextlib.suppress(Exception):  # refused: its share, or the IP's, is held
                        await stranger.new_stream(server.host.get_id(), [protocol])
            await trio.sleep(0.3)
            assert await find_node(honest.host, server.host.get_id(), protocol), "an honest query was reset"
            assert server.dht.inbound.held_by_bucket("203.0.113.7") == service_module.INBOUND_STREAMS_PER_IP
            assert sum(server.dht.inbound.held(peer) for peer in stranger_ids) == service_module.INBOUND_STREAMS_PER_IP


def test_a_peer_holds_at_most_its_share_of_inbound_streams() -> None:
    slots: InboundSlots[str] = InboundSlots(per_peer=2)
    assert slots.take("a") and slots.take("a") and not slots.take("a")
    assert slots.take("b")
    slots.give_back("a")
    assert slots.take("a")
    for peer in ("a", "a", "b"):
        slots.give_back(peer)
    assert len(slots) == 0


@given(st.lists(st.tuples(st.booleans(), st.sampled_from("abcd"), st.sampled_from([None, "x", "y"])), max_size=60))
def test_no_peer_or_bucket_ever_holds_more_than_its_share(steps: list[tuple[bool, str, str | None]]) -> None:
    """Random takes and give-backs: every peer holds at most 3, every bucket at most 4, and what is
    given back frees exactly what was taken."""
    slots: InboundSlots[str] = InboundSlots(per_peer=3, per_bucket=4)
    taken: list[tuple[str, str | None]] = []
    for take, peer, bucket in steps:
        if take:
            if slots.take(peer, bucket):
                taken.append((peer, bucket))
        elif taken:
            slots.give_back(*taken.pop(0))
        assert all(slots.held(p) == sum(1 for q, _ in taken if q == p) <= 3 for p in "abcd")
        assert all(slots.held_by_bucket(b) == sum(1 for _, c in taken if c == b) <= 4 for b in "xy")


async def test_a_burst_of_honest_queries_past_a_peers_share_waits_and_is_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node's provide and publish send a dozen DHT streams to one peer at once: those past its share
    wait for a slot instead of being reset (a reset FIND_NODE would read as an answer naming nobody)."""
    monkeypatch.setattr(service_module, "INBOUND_STREAMS_PER_PEER", 2)
    async with open_swarm(2) as nodes:
        server, honest = nodes
        server.dht.inbound.per_peer = 2
        protocol = TProtocol(server.dht.protocol_id)
        answers: list[bytes] = []

        async def ask() -> None:
            answers.append(await find_node(honest.host, server.host.get_id(), protocol))

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(ask)
        assert len(answers) == 12 and all(answers)
