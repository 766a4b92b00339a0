"""A 14-node swarm bootstrapped through 2 nodes: everyone finds everyone through the DHT.

Small to keep the suite fast: lookups over 200 nodes are ``bench/dht_swarm.py``."""

from __future__ import annotations

import trio

from tests.support.swarm import open_swarm

SWARM_SIZE = 14


async def test_every_node_finds_every_other_node_through_the_dht() -> None:
    async with open_swarm(SWARM_SIZE, bootstrap_count=2) as nodes:
        expected = {node.peer_id: set(node.addrs) for node in nodes}
        found: dict[tuple[str, str], set[str]] = {}
        limiter = trio.CapacityLimiter(16)

        async def look_up(searcher_index: int, target_index: int) -> None:
            searcher, target = nodes[searcher_index], nodes[target_index]
            async with limiter:
                with trio.move_on_after(20):
                    addrs = await searcher.dht.find_peer_addrs(target.host.get_id())
                    found[(searcher.peer_id, target.peer_id)] = {
                        f"{addr}/p2p/{target.peer_id}" if "/p2p/" not in addr else addr for addr in addrs
                    }

        with trio.fail_after(240):
            async with trio.open_nursery() as nursery:
                for i in range(SWARM_SIZE):
                    for j in range(SWARM_SIZE):
                        if i != j:
                            nursery.start_soon(look_up, i, j)

        pairs = SWARM_SIZE * (SWARM_SIZE - 1)
        answered = [key for key, addrs in found.items() if addrs & expected[key[1]]]
        missing = sorted(set(found) ^ set(answered)) + [
            (nodes[i].peer_id, nodes[j].peer_id)
            for i in range(SWARM_SIZE)
            for j in range(SWARM_SIZE)
            if i != j and (nodes[i].peer_id, nodes[j].peer_id) not in found
        ]
        assert len(answered) == pairs, (
            f"{len(answered)}/{pairs} lookups found the listen address; missing {missing[:5]}"
        )
        assert all(node.dht.routing_table_size() > 0 for node in nodes)
