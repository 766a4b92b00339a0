"""The node's iterative lookup (dht/lookup.py): which peer it asks next, when it stops, and that a
peer that accepts the connection but never answers does not hold a lookup up."""

from __future__ import annotations

import socket

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from dht.lookup import ALPHA, ANSWERED, CURRENT_STATS, FAILED, LATE, SLOW, Lookup, LookupStats, Walk, key_of
from tests.support.swarm import SwarmNode, open_swarm


def peers(count: int) -> list[ID]:
    return [ID.from_pubkey(generate_new_ed25519_identity().public_key) for _ in range(count)]


def test_the_walk_asks_the_closest_unasked_peer_and_stops_once_the_closest_have_answered() -> None:
    me, *others = peers(9)
    target = key_of(b"some key")
    walk = Walk(target, me, beta=3)
    assert not walk.add(me, 0)  # never itself
    for peer in others:
        assert walk.add(peer, 0)
    assert not walk.add(others[0], 2)  # known already: keeps its first hop
    by_distance = sorted(others, key=lambda p: key_of(p.to_bytes()) ^ target)
    assert walk.next_peer(20) == by_distance[0]
    walk.states[by_distance[0]] = FAILED  # unreachable: out of the closest set
    walk.states[by_distance[1]] = ANSWERED
    walk.states[by_distance[2]] = SLOW  # reached, no answer in time: still a candidate for a put or a get
    assert walk.next_peer(20) == by_distance[3]
    assert not walk.done()
    walk.states[by_distance[3]] = ANSWERED
    # A slow peer does not settle the closest set: the next closest must answer too.
    assert not walk.done()
    assert walk.next_peer(20) == by_distance[4]
    walk.states[by_distance[4]] = ANSWERED
    assert walk.done()
    # Every peer given up as late and nobody answered yet: not done while a late answer may come.
    small = Walk(target, me, beta=3)
    for peer in by_distance[:3]:
        small.add(peer, 0)
    small.states.update({by_distance[0]: LATE, by_distance[1]: LATE, by_distance[2]: FAILED})
    assert not small.done()
    small.states[by_distance[1]] = ANSWERED
    assert small.done()
    assert walk.closest(3) == by_distance[1:4]
    assert by_distance[0] not in walk.closest(20)
    # find_peer: three farther peers answered, the closest is late: its answer may still name the
    # target, so the walk waits for it until it turns slow (a store lookup would end here).
    seeking = Walk(target, me, beta=3, late_settles=False)
    for peer in by_distance[:4]:
        seeking.add(peer, 0)
    seeking.states.update({by_distance[0]: LATE, **dict.fromkeys(by_distance[1:4], ANSWERED)})
    assert not seeking.done()
    storing = Walk(target, me, beta=3, states=dict(seeking.states), distances=dict(seeking.distances))
    assert storing.done()
    seeking.states[by_distance[0]] = SLOW
    assert seeking.done()


async def test_a_lookup_goes_past_a_peer_that_accepts_connections_but_never_answers() -> None:
    """A DHT peer whose address accepts TCP and then says nothing (a hung process, a tarpit) is in
    every node's table: lookups still find their target, without waiting out py-libp2p's 10 s."""
    tarpit = socket.socket()
    tarpit.bind(("127.0.0.1", 0))
    tarpit.listen(64)
    port = tarpit.getsockname()[1]
    try:
        async with open_swarm(6) as nodes:
            hung = peers(1)[0]
            address = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")
            for node in nodes:
                assert await node.dht.dht.routing_table.add_peer(PeerInfo(hung, [address]))
            searcher, target = nodes[5], nodes[2]
            searcher.dht.dht.routing_table.remove_peer(target.host.get_id())
            searcher.host.get_peerstore().clear_addrs(target.host.get_id())
            stats = LookupStats()
            token = CURRENT_STATS.set(stats)
            try:
                with trio.fail_after(8):  # py-libp2p's query timeout alone is 10 s
                    addrs = await searcher.dht.find_peer_addrs(target.host.get_id())
            finally:
                CURRENT_STATS.reset(token)
            assert {addr.split("/p2p/")[0] for addr in addrs} & {
                str(addr).split("/p2p/")[0] for addr in target.host.get_addrs()
            }
            assert stats.target_hop is not None and stats.target_hop >= 1
    finally:
        tarpit.close()


async def test_a_lookup_whose_closest_peers_answer_late_waits_for_the_next_closest() -> None:
    """On a loaded machine the peers closest to the target may answer later than the query timeout.
    Giving up on them must not end the lookup while the next closest are still being asked: the
    lookup used to end there and cut short the query that would have named the target
    (bench/dht_swarm.py --trace: "end running=17", nothing answered yet)."""
    async with open_swarm(6) as nodes:
        searcher, target, *others = nodes
        target_id = target.host.get_id()
        searcher.dht.dht.routing_table.remove_peer(target_id)
        searcher.host.get_peerstore().clear_addrs(target_id)
        assert set(searcher.dht.dht.routing_table.get_peer_ids()) == {n.host.get_id() for n in others}
        point = key_of(target_id.to_bytes())
        *late, next_closest = sorted(others, key=lambda n: key_of(n.host.get_id().to_bytes()) ^ point)

        def answering_after(node: SwarmNode, delay_s: float) -> None:
            kad = node.dht.dht

            async def handle(stream: INetStream) -> None:
                await trio.sleep(delay_s)  # a busy peer: it answers, only late
                await kad.handle_stream(stream)

            node.host.set_stream_handler(TProtocol(node.dht.protocol_id), handle)

        for node in late:  # the three closest: past the query timeout, within the answer timeout
            answering_after(node, 2.0)
        answering_after(next_closest, 0.8)  # asked once the first three used up their patience
        lookup = searcher.dht.lookup
        assert lookup is not None
        lookup.patience_s, lookup.query_timeout_s, lookup.answer_timeout_s = 0.1, 0.5, 3.0
        stats = LookupStats(trace=[])  # what it did, shown if it fails
        token = CURRENT_STATS.set(stats)
        try:
            with trio.fail_after(5):
                addrs = await searcher.dht.find_peer_addrs(target_id)
        finally:
            CURRENT_STATS.reset(token)
        assert {addr.split("/p2p/")[0] for addr in addrs} & {
            str(addr).split("/p2p/")[0] for addr in target.host.get_addrs()
        }, "\n".join(stats.trace or [])


async def test_a_lookup_dials_at_most_alpha_unconnected_peers_at_once() -> None:
    """A walk whose peers must all be dialed first keeps at most ``alpha`` dials (Noise handshakes)
    running: the patience that frees a slow query's slot starts once the peer is connected. Counted
    from the dial, a loaded node started a new handshake every 0.5 s, twenty piled up and none
    answered in time (bench/dht_swarm.py --trace)."""
    async with open_swarm(6) as nodes:
        searcher, target = nodes[5], nodes[2]
        target_id = target.host.get_id()
        searcher.dht.dht.routing_table.remove_peer(target_id)
        searcher.host.get_peerstore().clear_addrs(target_id)
        lookup = searcher.dht.lookup
        assert lookup is not None
        assert len(searcher.dht.dht.routing_table.get_peer_ids()) > ALPHA  # more seeds than slots
        dialing = most = 0
        reach = lookup.reach

        async def slow_dial(peer: ID) -> bool:  # every peer as if unconnected: a handshake to wait for
            nonlocal dialing, most
            dialing += 1
            most = max(most, dialing)
            try:
                await trio.sleep(0.3)
                return await reach(peer)
            finally:
                dialing -= 1

        lookup.reach = slow_dial
        lookup.patience_s = 0.05  # each query would free its slot long before its dial ended
        stats = LookupStats(trace=[])
        token = CURRENT_STATS.set(stats)
        try:
            with trio.fail_after(8):
                addrs = await searcher.dht.find_peer_addrs(target_id)
        finally:
            CURRENT_STATS.reset(token)
        assert most <= ALPHA, (most, stats.trace)
        assert {addr.split("/p2p/")[0] for addr in addrs} & {
            str(addr).split("/p2p/")[0] for addr in target.host.get_addrs()
        }, "\n".join(stats.trace or [])


async def test_a_query_whose_connection_closes_under_it_is_asked_again() -> None:
    """A peer whose connection is closed in the middle of a FIND_NODE (a connection budget trimmed it)
    is asked again on a fresh connection; its answer used to count as one naming nobody, which
    settled the walk without it."""
    async with open_swarm(4) as nodes:
        searcher, closing, target, _ = nodes
        target_id, closing_id = target.host.get_id(), closing.host.get_id()
        kad = closing.dht.dht
        assert kad.routing_table.peer_in_table(target_id)
        streams = 0

        async def close_the_first(stream: INetStream) -> None:
            nonlocal streams
            streams += 1
            if streams == 1:
                await stream.muxed_conn.close()  # mid-query: the request is read by nobody
                return
            await kad.handle_stream(stream)

        closing.host.set_stream_handler(TProtocol(closing.dht.protocol_id), close_the_first)
        searcher.host.get_peerstore().clear_addrs(target_id)
        service = searcher.dht
        lookup = Lookup(
            searcher.host,
            service.protocol_id,
            local_closest=lambda key, count: [closing_id],
            may_ask=lambda peer: peer == closing_id,  # the only peer this walk asks
            reach=service._reach,
            answered=lambda peer: trio.sleep(0),
        )
        stats = LookupStats(trace=[])
        token = CURRENT_STATS.set(stats)
        try:
            with trio.fail_after(8):
                await lookup.closest_peers(target_id.to_bytes(), stop_at=target_id)
        finally:
            CURRENT_STATS.reset(token)
        assert streams == 2, "\n".join(stats.trace or [])
        assert stats.target_hop == 1, "\n".join(stats.trace or [])
