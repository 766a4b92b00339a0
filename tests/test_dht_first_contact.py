"""Fast first contact (issue 16): a node that turns DHT client leaves its peers' routing tables
as it says so, and a lookup neither asks a peer that stopped serving the DHT nor waits out a
silent one. Real hosts on loopback; the pure rules in dht/lookup_guard.py."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from bootstrap.peer_book import PeerBook
from dht.discovery import Discovery
from dht.lookup_guard import SilentPeers, may_ask, serves_dht
from dht.protocol_id import use_kad_protocol_id
from dht.publisher import CapabilityPublisher
from dht.record_validator import RECORD_NAMESPACE, CapabilityRecordValidator, RejectionCounter, record_key
from dht.records import Hardware, bind_wallet, seal_record
from dht.service import DhtService
from node.host import build_host
from tests.support.records import GEMMA, make_record
from tests.support.swarm import NodeSpec, open_swarm

KAD = "/clawnode/kad/1.0.0"
LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
DIAL_TIMEOUT_S = 1.0
# py-libp2p's own per-peer query timeout: what a lookup waited on an unreachable peer before.
LIBP2P_QUERY_TIMEOUT_S = 10.0


# --- the pure rules ----------------------------------------------------------------------------


def test_a_peer_is_asked_unless_it_lists_no_dht_or_went_silent() -> None:
    assert serves_dht(None, KAD) is None and serves_dht([], KAD) is None
    assert may_ask(None, KAD, silent=False)  # learnt from a routing answer: asked
    assert may_ask([KAD, "/ipfs/id/1.0.0"], KAD, silent=False)
    assert not may_ask(["/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"], KAD, silent=False)  # turned client
    assert not may_ask([KAD], KAD, silent=True)
    assert not may_ask(None, KAD, silent=True)


def test_silent_peers_are_held_for_a_while_cleared_by_a_sign_of_life_and_bounded() -> None:
    silent: SilentPeers[str] = SilentPeers(hold_s=10.0, limit=3)
    silent.note("a", now=100.0)
    assert silent.is_silent("a", now=109.9)
    assert not silent.is_silent("a", now=110.0)  # the hold is over: asked again
    assert len(silent) == 0
    silent.note("b", now=0.0)
    silent.clear("b")
    assert not silent.is_silent("b", now=1.0)
    for peer in ("p", "q", "r", "s"):
        silent.note(peer, now=5.0)
    assert len(silent) == 3 and not silent.is_silent("p", now=6.0)  # the oldest was forgotten


# --- real hosts --------------------------------------------------------------------------------


@asynccontextmanager
async def dht_node(
    tmp: Path, name: str, bootstrap: list[str], dial_timeout_s: float = DIAL_TIMEOUT_S
) -> AsyncIterator[DhtService]:
    host = build_host(generate_new_ed25519_identity())
    async with host.run(LOOPBACK), trio.open_nursery() as nursery:
        dht = DhtService(
            host,
            bootstrap_addrs=bootstrap,
            peer_book=PeerBook(tmp / f"{name}.json"),
            refresh_interval_s=3600.0,
            dial_timeout_s=dial_timeout_s,
        )
        await nursery.start(dht.run)
        try:
            yield dht
        finally:
            nursery.cancel_scope.cancel()


def p2p_addr(dht: DhtService) -> str:
    addr = str(dht.host.get_addrs()[0])
    return addr if "/p2p/" in addr else f"{addr}/p2p/{dht.host.get_id()}"


def spy_on_streams(dht: DhtService) -> list[ID]:
    """The peers ``dht``'s host opens streams to from now on."""
    asked: list[ID] = []
    new_stream = dht.host.new_stream

    async def spy(peer_id: ID, protocol_ids: Sequence[TProtocol]) -> INetStream:
        asked.append(peer_id)
        return await new_stream(peer_id, protocol_ids)

    dht.host.new_stream = spy  # type: ignore[method-assign]
    return asked


async def wait_until(condition: object, timeout: float) -> None:
    with trio.fail_after(timeout):
        while not callable(condition) or not condition():
            await trio.sleep(0.02)


async def test_a_node_that_turns_client_leaves_its_peers_tables_as_it_says_so(tmp_path: Path) -> None:
    use_kad_protocol_id()
    async with dht_node(tmp_path, "a", []) as a:
        async with dht_node(tmp_path, "h", [p2p_addr(a)]) as home:
            home_id = home.host.get_id()
            await wait_until(lambda: home_id in a.dht.routing_table.get_peer_ids() and a._speaks_dht(home_id), 10)

            # The AutoNAT verdict says private: serve() alone must tell the peers (no one else pushes).
            assert home.serve(False)
            await wait_until(lambda: home_id not in a.dht.routing_table.get_peer_ids(), 3)
            assert a._speaks_dht(home_id) is False and not a.may_ask(home_id)
            # The adopt loop and a query from the client do not bring it back.
            await home.look_up_self()
            await trio.sleep(1.5)
            assert home_id not in a.dht.routing_table.get_peer_ids()
            # Still connected and still a client of a's DHT: its own lookups work.
            assert a.host.get_id() in home.dht.routing_table.get_peer_ids()
            # a's lookups do not ask it, though it is connected (py-libp2p asks every connected
            # peer while the table is small).
            asked = spy_on_streams(a)
            await a.dht.peer_routing.find_closest_peers_network(home_id.to_bytes())
            assert home_id not in asked


async def test_a_lookup_gives_a_silent_peer_one_short_timeout_then_drops_it(tmp_path: Path) -> None:
    use_kad_protocol_id()
    # Where a home node's LAN address leads from outside: the TCP handshake completes, nothing answers.
    with trio.socket.socket() as tarpit:
        await tarpit.bind(("127.0.0.1", 0))
        tarpit.listen(64)
        hidden = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{tarpit.getsockname()[1]}")
        async with dht_node(tmp_path, "a", []) as a, dht_node(tmp_path, "q", [p2p_addr(a)]) as q:
            await wait_until(lambda: q.ready.is_set(), 10)
            # A peer q heard of from a routing answer (address and table entry), since gone behind a NAT.
            gone = ID.from_pubkey(generate_new_ed25519_identity().public_key)
            q.host.get_peerstore().add_addrs(gone, [hidden], 3600)
            assert await q.dht.routing_table.add_peer(PeerInfo(gone, [hidden]))

            started = trio.current_time()
            with trio.fail_after(LIBP2P_QUERY_TIMEOUT_S - 2):
                closest = await q.dht.peer_routing.find_closest_peers_network(gone.to_bytes())
            first = trio.current_time() - started
            assert a.host.get_id() in closest and gone not in closest
            assert gone not in q.dht.routing_table.get_peer_ids() and not q.may_ask(gone)

            # The next lookup does not ask it at all, and a routing answer cannot put it back.
            asked = spy_on_streams(q)
            await q.dht.peer_routing.find_closest_peers_network(gone.to_bytes())
            assert asked and gone not in asked
            assert not await q.dht.routing_table.add_peer(PeerInfo(gone, [hidden]))
            assert first >= DIAL_TIMEOUT_S * 0.9  # it was dialled once, and waited on for the dial timeout


async def test_a_fresh_node_is_ready_with_its_first_dht_peer_before_its_join_ends(tmp_path: Path) -> None:
    use_kad_protocol_id()
    with trio.socket.socket() as tarpit:
        await tarpit.bind(("127.0.0.1", 0))
        tarpit.listen(64)
        silent_id = ID.from_pubkey(generate_new_ed25519_identity().public_key)
        silent = f"/ip4/127.0.0.1/tcp/{tarpit.getsockname()[1]}/p2p/{silent_id}"
        async with dht_node(tmp_path, "a", []) as a:
            # Alone (nobody to join): a lookup does not wait for a first peer that cannot come.
            with trio.fail_after(5):
                await a.joined.wait()
            with trio.fail_after(2):
                await a.wait_until_ready(30)
            # One bootstrap peer answers, the other never does: the join waits out its dial.
            async with dht_node(tmp_path, "fresh", [silent, p2p_addr(a)], dial_timeout_s=2.0) as fresh:
                with trio.fail_after(10):
                    await fresh.ready.wait()
                assert not fresh.joined.is_set()  # publishing and lookups need not wait for the join
                assert a.host.get_id() in fresh.dht.routing_table.get_peer_ids()
                with trio.fail_after(10):
                    await fresh.joined.wait()


# --- describe reads past a stale copy ------------------------------------------------------------


async def test_describe_reads_the_newer_record_when_the_held_copy_names_only_dead_addresses() -> None:
    """A asks for B's record before B has reserved its relays: A's copy names only B's LAN address.
    Once B's newer record (with the addresses it answers at) is in the DHT, describe must read it
    instead of handing back the stale copy as unreachable for as long as A holds it."""
    async with open_swarm(4, specs={2: NodeSpec(offers=(GEMMA,))}) as nodes:
        provider, asker = nodes[2], nodes[3]
        assert provider.publisher.record is not None
        newer_seq = provider.publisher.record.seq
        # B's first record: an address nobody answers at (a closed port), an older sequence.
        stale = make_record(provider.key_pair, seq=newer_seq - 1, addrs=["/ip4/127.0.0.1/tcp/9"])
        key = record_key(provider.peer_id)
        # A holds that copy for the DHT and has seen nothing newer (a fresh discovery, sequence
        # book and cache); it is not connected to B and knows no address of B's.
        asker.dht.dht.value_store.put(key.encode(), seal_record(stale, provider.key_pair.private_key))
        discovery = Discovery(asker.host, asker.dht, RejectionCounter(), lambda: None, cache_ttl_s=0.0)
        await asker.host.disconnect(provider.host.get_id())
        asker.host.get_peerstore().clear_addrs(provider.host.get_id())
        with trio.fail_after(30):
            described = await discovery.describe(provider.host.get_id())
        assert described.reachable, "describe gave up on the stale copy's address"
        assert described.record.seq == newer_seq
        # The newer record replaced the stale copy A holds, so A serves no stale one either.
        assert asker.dht.held_value(key) == provider.publisher.sealed


# --- a home node's first record names its relays ---------------------------------------------------

RELAYED = "/ip4/203.0.113.2/tcp/4021/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit"


@asynccontextmanager
async def record_node(tmp: Path, name: str, bootstrap: list[str], key_pair: KeyPair) -> AsyncIterator[DhtService]:
    """A DHT node that stores capability records (validated, as in the daemon)."""
    host = build_host(key_pair)
    async with host.run(LOOPBACK), trio.open_nursery() as nursery:
        dht = DhtService(
            host,
            bootstrap_addrs=bootstrap,
            peer_book=PeerBook(tmp / f"{name}.json"),
            refresh_interval_s=3600.0,
            dial_timeout_s=DIAL_TIMEOUT_S,
        )
        dht.add_validator(RECORD_NAMESPACE, CapabilityRecordValidator(RejectionCounter(), held_value=dht.held_value))
        await nursery.start(dht.run)
        try:
            yield dht
        finally:
            nursery.cancel_scope.cancel()


async def test_the_first_publish_waits_for_the_relays_and_a_change_is_not_held_back(tmp_path: Path) -> None:
    """A home node reserves its relays a second or so after its start: its first record in the DHT
    must already name them (one that named only its LAN address sent every early asker to that
    address, a 5 s fetch timeout, before it read a newer copy). And a record that changes while a
    publish is still waiting on a slow peer reaches the DHT without waiting for that one."""
    use_kad_protocol_id()
    relayed: list[str] = []
    home_key = generate_new_ed25519_identity()
    async with record_node(tmp_path, "a", [], generate_new_ed25519_identity()) as a:
        async with record_node(tmp_path, "home", [p2p_addr(a)], home_key) as home:
            publisher = CapabilityPublisher(
                home.host,
                home,
                home_key.private_key,
                wallet=bind_wallet(secrets.token_bytes(32), str(home.host.get_id())),
                hardware=Hardware(cores=2, ram_mb=4096),
                offers=[GEMMA],
                extra_addrs=lambda: list(relayed),
                addrs_pending=lambda: not relayed,
            )
            key = record_key(str(home.host.get_id()))
            async with trio.open_nursery() as nursery:
                await nursery.start(publisher.run)
                await trio.sleep(1.0)  # the relays are being reserved: nothing published yet
                assert publisher.published_at is None and a.held_value(key) is None
                relayed.append(RELAYED)
                with trio.fail_after(10):
                    while publisher.published_at is None:
                        await trio.sleep(0.02)
                first = a.held_value(key)
                assert first is not None and RELAYED.encode() in first, "the first record lacks the relays"

                # The next publish hangs on a slow peer (the put to it never ends); the record
                # changes meanwhile: the newer one is stored without waiting for the hung put.
                put_value = home.dht.put_value
                hung = trio.Event()

                async def slow_then_normal(put_key: str, value: bytes) -> None:
                    if not hung.is_set():
                        hung.set()
                        await trio.sleep_forever()
                    await put_value(put_key, value)

                home.dht.put_value = slow_then_normal  # type: ignore[method-assign]
                publisher.republish()
                with trio.fail_after(5):
                    await hung.wait()
                hung_record = publisher.record
                publisher.set_offer(GEMMA.model_copy(update={"price_per_unit": GEMMA.price_per_unit * 2}))
                with trio.fail_after(10):
                    while publisher.record is hung_record or a.held_value(key) != publisher.sealed:
                        await trio.sleep(0.02)
                assert publisher.record is not None and publisher.record.capabilities[0].pricing.price_per_unit == (
                    GEMMA.price_per_unit * 2
                )
                nursery.cancel_scope.cancel()
