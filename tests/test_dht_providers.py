"""Provider keys (issue 23): finds walk the multihash key, and the bare digest that releases before
issue 23 announced under only when the multihash key names nobody. Real hosts on loopback."""

from __future__ import annotations

import trio

from dht.offers import legacy_provider_key, provider_key
from tests.support.records import GEMMA
from tests.support.swarm import NodeSpec, open_swarm


async def test_the_legacy_provider_key_is_walked_only_when_the_multihash_key_names_nobody() -> None:
    async with open_swarm(3, specs={2: NodeSpec(offers=(GEMMA,))}) as nodes:
        old_release, asker, current = nodes[0], nodes[1], nodes[2]
        # An old release's provider: it announces GEMMA under the bare digest only.
        await old_release.dht.dht.provider_store.provide(legacy_provider_key(GEMMA.name))
        walked: list[bytes] = []
        find_providers = asker.dht.find_providers

        async def counting(key: bytes, count: int = 50):  # type: ignore[no-untyped-def]
            walked.append(key)
            return await find_providers(key, count)

        asker.dht.find_providers = counting  # type: ignore[method-assign]
        with trio.fail_after(20):
            found = await asker.discovery.providers_of(GEMMA.name)
        # A current provider is found under the multihash key: the legacy key is not walked.
        assert found == [current.host.get_id()]
        assert walked == [provider_key(GEMMA.name)]

        # Once no current release provides it, the old release's provider is still found.
        for node in nodes:
            node.dht.dht.provider_store.providers.pop(provider_key(GEMMA.name), None)
        walked.clear()
        with trio.fail_after(20):
            found = await asker.discovery.providers_of(GEMMA.name)
        assert found == [old_release.host.get_id()]
        assert walked == [provider_key(GEMMA.name), legacy_provider_key(GEMMA.name)]
