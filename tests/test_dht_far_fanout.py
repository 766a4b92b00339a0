"""The join's far-bucket step (``DhtService.fill_far_buckets``) asks a few seeds a key, not every seed,
and adds the peers they name several at once.

Every seed the join reached was asked about every far key (a join that reached 50 peers sent 200
FIND_NODEs for 4 keys), and each peer named was added after the one before, each up to the dial
timeout (a full bucket pings its oldest peer first), while ``joined`` waited. Real hosts over
loopback, each running the node's DHT.
"""

from __future__ import annotations

from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from bootstrap.peer_book import PeerBook
from dht.protocol_id import use_kad_protocol_id
from dht.service import FAR_BUCKETS, DhtService
from node.host import build_host

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
SEEDS = 6
OTHERS = 4


async def test_the_far_bucket_step_asks_three_seeds_a_key_and_adds_the_named_peers_at_once(tmp_path: Path) -> None:
    use_kad_protocol_id()
    hosts: list[IHost] = [build_host(generate_new_ed25519_identity()) for _ in range(SEEDS + OTHERS)]
    joiner = build_host(generate_new_ed25519_identity())
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        services: list[DhtService] = []
        for index, host in enumerate([*hosts, joiner]):
            await stack.enter_async_context(host.run(LOOPBACK))
            book = PeerBook(tmp_path / f"{index}.json")
            dht = DhtService(host, bootstrap_addrs=[], peer_book=book, refresh_interval_s=3600)
            await nursery.start(dht.run)
            services.append(dht)
        joining = services.pop()
        # Every node knows every other one: each seed's answer names the whole swarm but the joiner.
        for host, dht in zip(hosts, services, strict=True):
            for other in hosts:
                if other is not host:
                    host.get_peerstore().add_addrs(other.get_id(), other.get_addrs(), 3600)
                    await dht.dht.routing_table.add_peer(PeerInfo(other.get_id(), other.get_addrs()))
        seeds = [host.get_id() for host in hosts[:SEEDS]]
        for host in hosts[:SEEDS]:
            await joiner.connect(PeerInfo(host.get_id(), host.get_addrs()))

        assert joining.lookup is not None
        asked: Counter[ID] = Counter()
        ask_once = joining.lookup.ask_once

        async def counted_ask(peer: ID, key: bytes) -> list[ID]:
            asked[peer] += 1
            return await ask_once(peer, key)

        adding = most_at_once = 0
        answered = joining._answered

        async def watched_add(peer_id: ID) -> None:
            nonlocal adding, most_at_once
            adding += 1
            most_at_once = max(most_at_once, adding)
            try:
                await answered(peer_id)
            finally:
                adding -= 1

        joining.lookup.ask_once = counted_ask  # type: ignore[method-assign]
        joining._answered = watched_add  # type: ignore[method-assign]
        with trio.fail_after(8):
            await joining.fill_far_buckets(seeds)
        table = set(joining.dht.routing_table.get_peer_ids())

    print(f"asked {sorted(asked.values())}; at most {most_at_once} adds at once; table {len(table)} peers")
    # three seeds a key, the next three for the next key: each seed asked twice, not four times
    assert sum(asked.values()) == FAR_BUCKETS * 3
    assert set(asked) == set(seeds) and set(asked.values()) == {FAR_BUCKETS * 3 // SEEDS}
    assert most_at_once > 1
    assert table == {host.get_id() for host in hosts}
