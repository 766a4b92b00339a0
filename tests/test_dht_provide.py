"""Provider announcements and provider lookups that do not wait on a walk (issue 23: publish ->
visible). Real hosts on loopback, in swarms of four nodes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dht import publisher as publisher_module
from dht.offers import Offer, provider_key
from dht.publisher import WELL_ANNOUNCED, well_announced
from tests.support.records import GEMMA
from tests.support.swarm import NodeSpec, open_swarm

QWEN = Offer(name="model:qwen2.5-7b-instruct-q4_k_m", price_per_unit=2 * 10**9, context_length=8192, family="qwen2.5")


async def test_a_provide_reaches_the_known_closest_peers_while_its_walk_is_still_running() -> None:
    async with open_swarm(4) as nodes:
        provider, others = nodes[3], nodes[:3]
        key = provider_key(QWEN.name)
        walk_may_end = trio.Event()
        lookup = provider.dht.lookup
        assert lookup is not None
        walk = lookup.closest_peers

        async def stuck_walk(
            target: bytes, count: int = 20, *, stop_at: ID | None = None, near: Callable[[ID], None] | None = None
        ) -> list[ID]:
            await walk_may_end.wait()
            return await walk(target, count)

        lookup.closest_peers = stuck_walk  # type: ignore[method-assign,assignment]
        provider.dht.dht.peer_routing.find_closest_peers_network = stuck_walk  # type: ignore[method-assign,assignment]
        stored_at = [node for node in others if node.dht.dht.provider_store.get_providers(key)]
        assert not stored_at
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.dht.provide, key)
            with trio.fail_after(10):
                while not stored_at:
                    await trio.sleep(0.02)
                    stored_at = [node for node in others if node.dht.dht.provider_store.get_providers(key)]
            # Told before the walk ended: the peers it already knew hold the record now.
            assert not walk_may_end.is_set()
            walk_may_end.set()
        providers = {info.peer_id for node in others for info in node.dht.dht.provider_store.get_providers(key)}
        assert providers == {provider.host.get_id()}


async def test_a_new_offer_announces_only_itself_and_is_found() -> None:
    async with open_swarm(4, specs={3: NodeSpec(offers=(GEMMA,))}) as nodes:
        asker, provider = nodes[1], nodes[3]
        announced: list[bytes] = []
        provide = provider.dht.provide

        async def counting(key: bytes) -> int:
            announced.append(key)
            return await provide(key)

        provider.dht.provide = counting  # type: ignore[method-assign]
        before = provider.publisher.published_at
        provider.publisher.set_offer(QWEN)
        with trio.fail_after(10):
            while provider.publisher.published_at == before:
                await trio.sleep(0.02)
        # The change announced the new capability alone; GEMMA was announced already.
        assert announced == [provider_key(QWEN.name)]

        # A price change needs no announcement (finds fetch the record from the provider) ...
        before = provider.publisher.published_at
        provider.publisher.set_offer(QWEN.model_copy(update={"price_per_unit": 3 * 10**9}))
        with trio.fail_after(10):
            while provider.publisher.published_at == before:
                await trio.sleep(0.02)
        assert announced == [provider_key(QWEN.name)]
        # ... and the periodic republish announces every capability again.
        await provider.publisher.publish()
        assert sorted(announced[1:]) == sorted([provider_key(GEMMA.name), provider_key(QWEN.name)])

        # Another node, remembering no closest peers for the key, finds the new provider.
        asker.dht._closest.clear()
        with trio.fail_after(10):
            found = await asker.discovery.providers_of(QWEN.name)
        assert found == [provider.host.get_id()]


async def test_a_peer_that_refused_an_announcement_is_told_again() -> None:
    async with open_swarm(2) as nodes:
        receiver, provider = nodes
        key = provider_key(QWEN.name)
        handler = receiver.host.get_mux().handlers[TProtocol(receiver.dht.protocol_id)]
        assert handler is not None
        receiver.host.remove_stream_handler(TProtocol(receiver.dht.protocol_id))  # refuses DHT streams for now
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.dht.provide, key)
            await trio.sleep(0.5)
            assert not receiver.dht.dht.provider_store.get_providers(key)
            receiver.host.set_stream_handler(TProtocol(receiver.dht.protocol_id), handler)
        # The retry reached it (the receiver stores what it reads a moment after the sender wrote it).
        with trio.fail_after(5):
            while not receiver.dht.dht.provider_store.get_providers(key):
                await trio.sleep(0.02)
        assert [info.peer_id for info in receiver.dht.dht.provider_store.get_providers(key)] == [provider.host.get_id()]


async def test_an_announcement_that_reached_few_peers_is_made_again_before_the_republish(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A provider whose dials had timed out (its peers silent for a minute, ``lookup_guard``) when it
    announced a new offer reached one peer of three; it announces again after ``THIN_RETRY_S``, not
    at the periodic republish (here 300 s away)."""
    monkeypatch.setattr(publisher_module, "THIN_RETRY_S", (1.0, 2.0))
    async with open_swarm(4) as nodes:
        provider, others = nodes[3], nodes[:3]
        key = provider_key(QWEN.name)
        unreachable = [node.host.get_id() for node in others[:2]]
        for peer_id in unreachable:
            provider.dht.silent.note(peer_id, trio.current_time())
            await provider.host.disconnect(peer_id)
        provider.publisher.set_offer(QWEN)
        with trio.fail_after(10):
            while not any(node.dht.dht.provider_store.get_providers(key) for node in others):
                await trio.sleep(0.02)
        await trio.sleep(0.3)
        holders = {node.host.get_id() for node in others if node.dht.dht.provider_store.get_providers(key)}
        assert holders.isdisjoint(unreachable)
        for peer_id in unreachable:  # they answer again (their silence would have ended after a minute)
            provider.dht.silent.clear(peer_id)
        with trio.fail_after(10):
            while not all(node.dht.dht.provider_store.get_providers(key) for node in others):
                await trio.sleep(0.05)
        assert provider.publisher.record is not None
        assert provider.publisher.record.capability(QWEN.name) is not None


def test_an_announcement_is_thin_below_half_the_closest_peers_or_the_peers_known() -> None:
    assert not well_announced(0, 0)  # alone: announced again when someone may be there
    assert well_announced(1, 1)
    assert not well_announced(1, 3)
    assert well_announced(3, 3)
    assert not well_announced(WELL_ANNOUNCED - 1, 200)
    assert well_announced(WELL_ANNOUNCED, 200)


async def test_a_walk_names_the_closest_peers_that_answered_while_it_still_runs() -> None:
    async with open_swarm(8) as nodes:
        walker = nodes[0]
        assert walker.dht.lookup is not None
        key = provider_key(QWEN.name)
        named: list[ID] = []
        result = await walker.dht.lookup.closest_peers(key, 3, near=named.append)
        # The walk knew at least 6 peers when it named them: each answered, each among the 3
        # closest it knew then; the closest of all is among them (it answered on the way).
        assert named
        assert len(set(named)) == len(named)
        assert result[0] in named


async def test_a_provide_tells_a_peer_the_walk_meets_among_the_closest_before_the_walk_ends() -> None:
    async with open_swarm(4) as nodes:
        provider, far = nodes[3], nodes[0]
        key = provider_key(QWEN.name)
        lookup = provider.dht.lookup
        assert lookup is not None
        walk_may_end = trio.Event()

        async def walk(
            target: bytes, count: int = 20, *, stop_at: ID | None = None, near: Callable[[ID], None] | None = None
        ) -> list[ID]:
            assert near is not None
            near(far.host.get_id())  # as the real walk does when a peer among the closest answers
            await walk_may_end.wait()
            return []

        provider.dht.known_closest = lambda key, count=20: []  # type: ignore[method-assign]
        lookup.closest_peers = walk  # type: ignore[method-assign,assignment]
        provider.dht.dht.peer_routing.find_closest_peers_network = walk  # type: ignore[method-assign,assignment]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.dht.provide, key)
            with trio.fail_after(10):
                while not far.dht.dht.provider_store.get_providers(key):
                    await trio.sleep(0.02)
            assert not walk_may_end.is_set()
            walk_may_end.set()


async def test_a_thin_periodic_announcement_of_an_old_offer_is_made_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The periodic (full) publish of an offer announced well before reached one peer of three: its
    retry announces that offer again (it is not taken as announced already)."""
    monkeypatch.setattr(publisher_module, "THIN_RETRY_S", (1.0, 2.0))
    async with open_swarm(4, specs={3: NodeSpec(offers=(QWEN,))}) as nodes:
        provider, others = nodes[3], nodes[:3]
        key = provider_key(QWEN.name)
        announced: list[bytes] = []
        provide = provider.dht.provide

        async def counting(key: bytes) -> int:
            announced.append(key)
            return await provide(key)

        provider.dht.provide = counting  # type: ignore[method-assign]
        unreachable = [node.host.get_id() for node in others[:2]]
        for peer_id in unreachable:
            provider.dht.silent.note(peer_id, trio.current_time())
            await provider.host.disconnect(peer_id)
        await provider.publisher.publish()
        assert announced == [key]
        for peer_id in unreachable:
            provider.dht.silent.clear(peer_id)
        with trio.fail_after(10):
            while len(announced) < 2:
                await trio.sleep(0.05)
        assert announced == [key, key]


async def test_a_withdrawn_capability_is_never_announced_again_by_py_libp2ps_republish() -> None:
    """py-libp2p re-announces every key in its ``providing_keys`` 22 h after the last announcement and
    never forgets one, so an offer the node withdrew came back a day later. Its republish pass, run
    here as if every key were due, announces nothing the publisher did not."""
    async with open_swarm(4, specs={3: NodeSpec(offers=(GEMMA,))}) as nodes:
        provider = nodes[3]
        store = provider.dht.dht.provider_store
        with trio.fail_after(10):
            while provider.publisher.published_at is None:
                await trio.sleep(0.02)
        assert provider.publisher.remove_offer(GEMMA.name)
        announced: list[bytes] = []

        async def recording(key: bytes) -> bool:
            announced.append(key)
            return True

        store.provide = recording  # type: ignore[method-assign]
        store._last_republish.clear()  # every key due
        await store._republish_provider_records()
        assert provider_key(GEMMA.name) not in announced
        assert announced == []


async def test_an_offers_schema_check_running_out_of_budget_never_stops_the_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rebuilding the record checks each offer's examples against its schema within a CPU budget; a pause
    of the thread (a garbage collection in a large heap) once ran it out, and the exception stopped the
    node. Now a build is tried once more, and one that fails twice keeps the last record served."""
    from dht import records as records_module
    from dht.schema_safety import SchemaBudgetExceeded

    async with open_swarm(2, specs={1: NodeSpec(offers=(GEMMA,))}) as nodes:
        publisher = nodes[1].publisher
        served = publisher.sealed
        assert served is not None
        real = records_module.instance_problems
        failures = [1]

        def pausing(schema: object, instance: object, *, limit: int = 8) -> list[str]:
            if failures[0] > 0:
                failures[0] -= 1
                raise SchemaBudgetExceeded("schema evaluation ran out of time")
            return real(schema, instance, limit=limit)

        monkeypatch.setattr(records_module, "instance_problems", pausing)
        publisher.republish()  # one pause: the second try builds it
        assert publisher.sealed is not None and publisher.sealed != served and publisher.publish_refusals == 0
        failures[0] = 10**6
        kept = publisher.sealed
        publisher.republish()  # every try runs out: refused, the last record stays served
        assert publisher.sealed == kept and publisher.publish_refusals == 1
