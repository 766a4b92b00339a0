"""A node keeps about ``node.connection_budget`` connections, not one to every peer it ever asked (issue 23).

Real hosts over loopback: the budget closes idle connections longest idle first, never one carrying
a stream or one the daemon protects (a lease, a relay reservation, a hole-punched link), and DHT
lookups through a swarm whose nodes keep a few connections each still find every peer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from bootstrap.peer_book import PeerBook
from dht.protocol_id import use_kad_protocol_id
from dht.service import DhtService
from node.conn_budget import ConnFacts, budget_of, keep_in_routing_table, to_close
from node.host import build_host

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
ECHO = TProtocol("/clawnode/test-echo/1.0.0")
HOLD = TProtocol("/clawnode/test-hold/1.0.0")


def _connected(host: IHost) -> set[ID]:
    return {conn.muxed_conn.peer_id for conn in host.get_network().get_connections() if not conn.is_closed}


async def _echo(client: IHost, server: IHost) -> None:
    stream = await client.new_stream(server.get_id(), [ECHO])
    await stream.write(b"ping!")
    assert await stream.read(5) == b"ping!"
    await stream.close()


async def test_the_budget_closes_idle_connections_first_and_keeps_busy_queried_and_protected_ones() -> None:
    hub = build_host(generate_new_ed25519_identity(), connection_budget=3)
    clients = [build_host(generate_new_ed25519_identity()) for _ in range(6)]
    busy, protected, *idle = clients
    queried = idle[1]  # idle, but a DHT lookup of the hub has a query to it in flight
    budget = budget_of(hub)
    assert budget is not None
    # A client whose idle connection was closed dials back (py-libp2p's auto-connector): that new,
    # unused connection is kept for its grace and then closed with no other event to trigger it.
    budget.grace_s = 2.0
    budget.protected = lambda peer_id: peer_id == protected.get_id()
    budget.busy = lambda peer_id: peer_id == queried.get_id()
    held = trio.Event()

    async def echo(stream: INetStream) -> None:
        await stream.write(await stream.read(5))
        await stream.close()

    async def hold(stream: INetStream) -> None:
        await stream.read(1)
        held.set()
        await trio.sleep_forever()

    for host in [hub, *clients]:
        host.set_stream_handler(ECHO, echo)
    hub.set_stream_handler(HOLD, hold)
    async with AsyncExitStack() as stack:
        for host in [hub, *clients]:
            await stack.enter_async_context(host.run(LOOPBACK))
        hub_info = PeerInfo(hub.get_id(), hub.get_addrs())
        with trio.fail_after(15):
            await busy.connect(hub_info)
            stream = await busy.new_stream(hub.get_id(), [HOLD])  # open for the whole test
            await stream.write(b"x")
            await held.wait()
            await protected.connect(hub_info)
            await _echo(protected, hub)
            for client in idle:  # each one a request, then idle
                await client.connect(hub_info)
                await _echo(client, hub)
                await trio.sleep(0.05)
            while len(_connected(hub)) > 3:
                await trio.sleep(0.05)
        kept = _connected(hub)
        assert {busy.get_id(), protected.get_id(), queried.get_id()} <= kept, "closed a busy or protected connection"
        # Each idle one was closed once the next client came (a client's py-libp2p may dial back).
        assert budget.closed >= 3, budget.closed
        # A peer whose idle connection was closed is still reachable: its addresses were kept.
        with trio.fail_after(10):
            await _echo(hub, idle[0])


def test_nothing_is_closed_within_the_budget_or_before_a_connection_served_its_request() -> None:
    def conn(key: int, *, idle_s: float, used: bool = True, busy: int = 0, protected: bool = False) -> ConnFacts:
        return ConnFacts(key=key, busy_streams=busy, age_s=1.0, used=used, idle_s=idle_s, protected=protected)

    within = [conn(0, idle_s=9), conn(1, idle_s=1)]
    assert to_close(within, 2, grace_s=5) == []
    over = [conn(0, idle_s=1), conn(1, idle_s=9, used=False), conn(2, idle_s=8), conn(3, idle_s=7, busy=1)]
    assert to_close(over, 2, grace_s=5) == [2, 0]  # 1 is young and never used; 3 is busy


@dataclass
class _DhtNode:
    host: IHost
    dht: DhtService

    @property
    def addrs(self) -> set[str]:
        return {str(addr).split("/p2p/")[0] for addr in self.host.get_addrs()}


@asynccontextmanager
async def _dht_swarm(size: int, budget: int, scratch: Path) -> AsyncIterator[list[_DhtNode]]:
    """``size`` hosts with the budget, each running the node's DHT; the first is everyone's bootstrap peer."""
    use_kad_protocol_id()
    nodes: list[_DhtNode] = []
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        for index in range(size):
            host = build_host(generate_new_ed25519_identity(), connection_budget=budget)
            await stack.enter_async_context(host.run(LOOPBACK))
            bootstrap = [f"{addr}/p2p/{nodes[0].host.get_id()}" for addr in sorted(nodes[0].addrs)] if nodes else []
            dht = DhtService(
                host, bootstrap_addrs=bootstrap, peer_book=PeerBook(scratch / f"{index}.json"), refresh_interval_s=3600
            )
            keep_in_routing_table(host, dht)
            await nursery.start(dht.run)
            nodes.append(_DhtNode(host, dht))
        with trio.fail_after(20):
            for node in nodes:
                await node.dht.joined.wait()
        yield nodes


async def test_lookups_find_every_peer_while_each_node_keeps_its_budget(tmp_path: Path) -> None:
    size, budget = 8, 3
    async with _dht_swarm(size, budget, tmp_path) as nodes:
        found: dict[tuple[int, int], bool] = {}

        async def look_up(searcher: int, target: int) -> None:
            host, target_id = nodes[searcher].host, nodes[target].host.get_id()
            # Cold: forgotten, so the lookup goes over the network through budgeted nodes.
            nodes[searcher].dht.dht.routing_table.remove_peer(target_id)
            host.get_peerstore().clear_addrs(target_id)
            # Two tries: under a loaded CI box a budgeted walk still misses now and then (bench/dht_swarm.py
            # measures the rate: 92 % at N = 200 with the budget), and a user's second find goes on.
            for _ in range(2):
                with trio.move_on_after(10):
                    addrs = await nodes[searcher].dht.find_peer_addrs(target_id)
                    found[(searcher, target)] = bool({a.split("/p2p/")[0] for a in addrs} & nodes[target].addrs)
                if found.get((searcher, target)):
                    break

        async with trio.open_nursery() as nursery:
            for index in range(size):
                nursery.start_soon(look_up, index, (index + 3) % size)
        await trio.sleep(0.2)
        counts = [len(_connected(node.host)) for node in nodes]
        tables = [node.dht.routing_table_size() for node in nodes]
    assert len(found) == size and all(found.values()), (found, tables)
    # Without the budget each node ends up connected to nearly all 7 others.
    assert max(counts) <= budget + 2, counts
    assert sum(counts) / size <= budget, counts
