"""A provider announces itself while its walk to the key's closest peers is still running (issue 23):
a new offer is visible as soon as the peers a finder asks hold the record, not after the whole walk."""

from __future__ import annotations

import hashlib

import trio
from libp2p.peer.id import ID

from tests.support.swarm import open_swarm


async def test_a_provider_tells_the_closest_peers_it_remembers_before_its_walk_ends() -> None:
    async with open_swarm(6) as nodes:
        provider = nodes[2]
        key = hashlib.sha256(b"a capability nobody offered before").digest()
        remembered = await provider.dht._closest_cached(key)  # a find_providers of the key did this walk
        others = {node.host.get_id(): node for node in nodes if node is not provider}
        remembered = [peer for peer in remembered if peer in others]
        assert remembered

        # Every FIND_NODE of the provider's new walk hangs until released: a slow network.
        lookup = provider.dht.lookup
        assert lookup is not None
        release = trio.Event()
        ask = lookup._ask

        async def slow_ask(peer: ID, key: bytes, raw_addrs: dict[ID, list[bytes]]) -> list[ID] | None:
            await release.wait()
            return await ask(peer, key, raw_addrs)

        lookup._ask = slow_ask  # type: ignore[method-assign]

        def holders() -> set[ID]:
            me = provider.host.get_id()
            return {
                peer
                for peer in remembered
                if any(info.peer_id == me for info in others[peer].dht.dht.provider_store.get_providers(key))
            }

        async with trio.open_nursery() as nursery:
            nursery.start_soon(provider.dht.provide, key)
            with trio.fail_after(10):
                while holders() != set(remembered):
                    await trio.sleep(0.05)
            release.set()  # the walk goes on, and provide() ends
