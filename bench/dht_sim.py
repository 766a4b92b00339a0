"""DHT simulation: thousands of nodes with churn, in virtual time, on one machine.

Usage::

    python bench/dht_sim.py [--sizes 1000,10000] [--hours 2] [--lookups 1000] [--records 200]

What is the real code and what is modelled
------------------------------------------
Real (imported and run unchanged):

* every node's routing table is py-libp2p's ``RoutingTable`` (k-buckets of 20, bucket splitting,
  full-bucket replacement after pinging the oldest peer), the one ``DhtService`` runs;
* every lookup is py-libp2p's iterative ``PeerRouting.find_closest_peers_network`` (ALPHA = 10
  queries per round, on until the closest 20 are stable), which ``find_peer``, ``provide`` and the
  joins' self lookup run;
* a node answers FIND_NODE with its ``RoutingTable.find_local_closest_peers`` and adds the asker
  to its table; the asker adds every peer named in an answer, as py-libp2p's
  ``_query_peer_for_closest`` does;
* our guard (``DhtService``): a peer that does not answer within ``dht.dial_timeout_s`` (4 s) costs
  that long, leaves the routing table and is not asked again for 60 s (``dht.lookup_guard.SilentPeers``);
* provider lookups are ``DhtService.find_providers`` itself (local providers, the key's closest
  peers, GET_PROVIDERS to the first 6 of them); the walk to the closest is py-libp2p's
  ``PeerRouting`` here, where the daemon runs its own ``Lookup``;
* message sizes are those of py-libp2p's protobuf ``Message`` encoder for each request and answer,
  with a real signed peer record per named peer, and an identify message as a real clawnode host
  builds it.

Modelled:

* the network: no sockets; a message takes a one-way delay drawn uniformly from 10-80 ms; every
  query opens a connection (the connection budget closes idle ones), costing 1.5 round trips and
  ``CONNECTION_BYTES`` (Noise handshake + both identify messages) besides the message itself;
  streams cost a multistream negotiation and Yamux/Noise framing (constants below);
* the start: routing tables are filled as a converged network's would be (each bucket up to k
  peers at that distance, chosen at random, through the real ``add_peer``), not by N joins;
* churn: over ``--hours``, half of the first N nodes leave (silently: no goodbye) at uniform random
  times and as many new ones join, each through one random live node, with a self lookup, as
  ``DhtService.join`` does;
* upkeep: each node looks up its own id every ``--refresh-s`` (0: never; the daemon's
  ``dht.refresh_interval_s`` is 60 s and py-libp2p's refresh walks a random id per bucket; this
  is far cheaper to simulate, so the bytes per node and hour are a lower bound); tables otherwise
  change only through joins, lookups and answers, and peers that let a query time out;
* records: ``--records`` providers among the nodes that stay publish one provider key each, at
  once and again every ``--republish-s`` (300 s: the capability publisher republishes at half the
  600 s record lifetime) to the key's 20 closest live peers; holders keep them (py-libp2p: 48 h);
  at the end each key is looked up from a random live node. Capability values are not simulated.

Lookups: ``--lookups`` ``find_peer``-style lookups at uniform random times over the run, each from a
random live node for a random other live node it has never heard of (it forgets the target
first). Success: the target is among the returned closest peers. Hops: the round in which an
answer first named the target (counted as ``bench/dht_swarm.py`` does).

Speed: py-libp2p hashes every peer id (SHA-256) on every closest-peers query; the hash is cached
(``functools.lru_cache`` on ``peer_id_to_key``, same answers). N = 1,000 over 2 h takes ~9 min and
N = 10,000 (``--refresh-s 0``) ~25 min on a shared core.

The simulated time runs on trio's ``MockClock`` (``autojump_threshold=0``): every sleep is
skipped at once when nothing else can run, so two hours pass in however long the CPU needs.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import hashlib
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import multiaddr
import numpy as np
import trio
import trio.testing
from libp2p import generate_new_ed25519_identity
from libp2p.identity.identify.identify import _mk_identify_protobuf
from libp2p.kad_dht import peer_routing, routing_table
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.peer_routing import PeerRouting
from libp2p.kad_dht.routing_table import BUCKET_SIZE, KBucket, RoutingTable
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import env_to_send_in_RPC

from dht.lookup_guard import SilentPeers
from dht.service import DEFAULT_DIAL_TIMEOUT_S, DhtService
from node.host import build_host

ONE_WAY_S = (0.010, 0.080)
# Bytes every query pays besides its message: multistream-select of the DHT protocol both ways
# ("/multistream/1.0.0\n", "/clawnode/kad/1.0.0\n", each length-prefixed) and Yamux (12-byte header)
# plus Noise (2-byte length + 16-byte tag) framing of about three frames each way.
STREAM_BYTES = 2 * (20 + 21) + 6 * (12 + 18)
NOISE_HANDSHAKE_BYTES = 32 + 80 + 48 + 3 * 18  # XX: e / e,ee,s,es + payload / s,se + payload, framed
PING_BYTES = 2 * 32 + STREAM_BYTES


def progress(text: str) -> None:
    print(f"[dht_sim {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@dataclass
class Sizes:
    """Wire sizes from py-libp2p's own encoders."""

    record: int  # a signed peer record (envelope), as named peers carry
    identify: int
    connection: int = 0
    _find_node: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def measure(cls) -> Sizes:
        host = build_host(generate_new_ed25519_identity())
        envelope, _ = env_to_send_in_RPC(host)
        identify = _mk_identify_protobuf(host, None).ByteSize()
        sizes = cls(record=len(envelope), identify=identify)
        sizes.connection = NOISE_HANDSHAKE_BYTES + 2 * (identify + STREAM_BYTES)
        return sizes

    def find_node(self, key: bytes, named: Sequence[PeerInfo]) -> tuple[int, int]:
        """Request and answer sizes; the same for every key and peer of the same lengths (cached)."""
        shape = (len(key), len(named))
        cached = self._find_node.get(shape)
        if cached is None:
            cached = self._find_node[shape] = self._encode_find_node(key, named)
        return cached

    def _encode_find_node(self, key: bytes, named: Sequence[PeerInfo]) -> tuple[int, int]:
        request = Message(type=Message.MessageType.FIND_NODE, key=key)
        answer = Message(type=Message.MessageType.FIND_NODE)
        for info in named:
            peer = answer.closerPeers.add()
            peer.id = info.peer_id.to_bytes()
            peer.addrs.extend(addr.to_bytes() for addr in info.addrs)
            peer.signedRecord = b"\x00" * self.record
        return request.ByteSize() + 1, answer.ByteSize() + 2


@dataclass
class Counters:
    messages: int = 0
    bytes: int = 0

    def add(self, messages: int, size: int) -> None:
        self.messages += messages
        self.bytes += size


class _Peerstore:
    """What ``RoutingTable.add_peer`` asks of a peer store; identify never ran (servers all)."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    def get_protocols(self, peer_id: ID) -> list[str]:
        return []

    def addrs(self, peer_id: ID) -> list[multiaddr.Multiaddr]:
        node = self.sim.nodes.get(peer_id)
        return list(node.info.addrs) if node else []

    def peer_ids(self) -> list[ID]:
        return []


class _Host:
    def __init__(self, sim: Sim, peer_id: ID) -> None:
        self._id = peer_id
        self._peerstore = _Peerstore(sim)

    def get_id(self) -> ID:
        return self._id

    def get_connected_peers(self) -> list[ID]:
        return []  # connections are not kept (the connection budget closes idle ones)

    def get_peerstore(self) -> _Peerstore:
        return self._peerstore


@dataclass
class SimNode:
    info: PeerInfo
    table: RoutingTable
    routing: PeerRouting
    alive: bool = True
    joined_at: float = 0.0
    left_at: float | None = None
    silent: SilentPeers[ID] = field(default_factory=SilentPeers)
    providers: dict[bytes, set[ID]] = field(default_factory=dict)

    @property
    def peer_id(self) -> ID:
        return self.info.peer_id


@dataclass
class LookupStats:
    target: ID
    rounds: int = 0
    found_round: int | None = None


CURRENT: contextvars.ContextVar[LookupStats | None] = contextvars.ContextVar("current_lookup", default=None)


class _RoundCountingTrio:
    """Stands in for ``trio`` inside ``peer_routing``: one ``open_nursery`` per lookup round."""

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)

    def open_nursery(self, *args: Any, **kwargs: Any) -> Any:
        stats = CURRENT.get()
        if stats is not None:
            stats.rounds += 1
        return trio.open_nursery(*args, **kwargs)


SIM: Sim | None = None


async def _ping_in_sim(self: KBucket, peer_id: ID) -> bool:
    """KBucket's liveness check of the oldest peer when a bucket is full, over the simulated network."""
    assert SIM is not None
    return await SIM.ping(peer_id)


class Sim:
    def __init__(self, size: int, options: argparse.Namespace, sizes: Sizes, seed: int) -> None:
        self.size = size
        self.options = options
        self.sizes = sizes
        self.rng = random.Random(seed)
        self.nodes: dict[ID, SimNode] = {}
        self.alive: list[ID] = []
        self._alive_index: dict[ID, int] = {}
        self.counters = Counters()
        self.lookups: list[tuple[bool, int | None, int]] = []  # success, found round, rounds
        self.records: dict[bytes, ID] = {}
        self.record_holders_at_start: dict[bytes, set[ID]] = {}
        self.found_records: list[bool] = []
        self.holders_gone: list[float] = []
        self.joins = 0
        self.leaves = 0
        self.upkeep: trio.Nursery | None = None
        self.end = 0.0

    # --- the simulated network ------------------------------------------------------------
    def _one_way(self) -> float:
        return self.rng.uniform(*ONE_WAY_S)

    def is_alive(self, peer_id: ID) -> bool:
        node = self.nodes.get(peer_id)
        return node is not None and node.alive

    async def _connect(self, peer_id: ID) -> bool:
        """A new connection (1.5 round trips and its bytes), or the dial timeout if the peer is gone."""
        if not self.is_alive(peer_id):
            await trio.sleep(self.options.dial_timeout_s)
            return False
        await trio.sleep(3 * self._one_way())
        self.counters.add(4, self.sizes.connection)
        return True

    async def ping(self, peer_id: ID) -> bool:
        if not await self._connect(peer_id):
            return False
        await trio.sleep(2 * self._one_way())
        self.counters.add(2, PING_BYTES)
        return True

    def make_query(self, node: SimNode) -> Any:
        async def query(peer: ID, target_key: bytes) -> list[ID]:
            now = trio.current_time()
            if node.silent.is_silent(peer, now):
                return []
            if not await self._connect(peer):
                node.silent.note(peer, trio.current_time())
                node.table.remove_peer(peer)
                return []
            remote = self.nodes[peer]
            await trio.sleep(self._one_way())
            await remote.table.add_peer(node.info)  # the asker opened a DHT stream: py-libp2p adds it
            closest = remote.table.find_local_closest_peers(target_key, BUCKET_SIZE)
            named = [self.nodes[p].info for p in closest]
            request, answer = self.sizes.find_node(target_key, named)
            self.counters.add(2, request + answer + STREAM_BYTES)
            await trio.sleep(self._one_way())
            stats = CURRENT.get()
            if stats is not None and stats.found_round is None and stats.target in closest:
                stats.found_round = stats.rounds
            for info in named:
                if info.peer_id != node.peer_id and not node.silent.is_silent(info.peer_id, trio.current_time()):
                    await node.table.add_peer(info)
            return closest

        return query

    # --- nodes ----------------------------------------------------------------------------
    def _new_node(self, now: float) -> SimNode:
        peer_id = ID(b"\x00\x24\x08\x01\x12\x20" + self.rng.randbytes(32))
        octets = self.rng.randbytes(3)
        addr = multiaddr.Multiaddr(f"/ip4/10.{octets[0]}.{octets[1]}.{octets[2]}/tcp/4021")
        info = PeerInfo(peer_id, [addr])
        host: Any = _Host(self, peer_id)
        table = RoutingTable(peer_id, host)
        routing = PeerRouting(host, table)
        node = SimNode(info, table, routing, joined_at=now)
        routing._query_peer_for_closest = self.make_query(node)  # type: ignore[method-assign]
        self.nodes[peer_id] = node
        self._alive_index[peer_id] = len(self.alive)
        self.alive.append(peer_id)
        return node

    def _leave(self, peer_id: ID, now: float) -> None:
        node = self.nodes[peer_id]
        node.alive, node.left_at = False, now
        index = self._alive_index.pop(peer_id)
        last = self.alive.pop()
        if last != peer_id:
            self.alive[index] = last
            self._alive_index[last] = index
        node.providers.clear()
        self.leaves += 1

    def random_alive(self, exclude: ID | None = None) -> SimNode:
        while True:
            peer_id = self.alive[self.rng.randrange(len(self.alive))]
            if peer_id != exclude:
                return self.nodes[peer_id]

    async def populate(self) -> None:
        """The first N nodes, their tables filled as a converged network's: up to k per bucket distance."""
        started = time.perf_counter()
        nodes = [self._new_node(0.0) for _ in range(self.size)]
        keys = np.array(
            [int.from_bytes(hashlib.sha256(n.peer_id.to_bytes()).digest()[:4], "big") for n in nodes], dtype=np.uint64
        )
        for index, node in enumerate(nodes):
            distance = (keys ^ keys[index]).astype(np.float64)
            distance[index] = 1.0  # itself: left out below
            prefix = 32 - np.floor(np.log2(np.maximum(distance, 1.0))).astype(np.int64) - 1
            prefix[keys == keys[index]] = 32
            chosen: list[int] = []
            for cpl in np.unique(prefix):
                members = np.flatnonzero(prefix == cpl)
                members = members[members != index]
                if len(members) > BUCKET_SIZE:
                    members = np.array(self.rng.sample(list(members), BUCKET_SIZE))
                chosen.extend(int(m) for m in members)
            self.rng.shuffle(chosen)
            for other in chosen:
                await node.table.add_peer(nodes[other].info)
            if (index + 1) % max(1, self.size // 5) == 0:
                progress(f"n={self.size}: tables of {index + 1} nodes filled ({time.perf_counter() - started:.0f}s)")

    async def join(self) -> None:
        node = self._new_node(trio.current_time())
        bootstrap = self.random_alive(exclude=node.peer_id)
        await node.table.add_peer(bootstrap.info)
        closest = await node.routing.find_closest_peers_network(node.peer_id.to_bytes())
        for peer_id in closest:
            if self.is_alive(peer_id):
                await node.table.add_peer(self.nodes[peer_id].info)
        self.joins += 1
        if self.upkeep is not None:
            self.upkeep.start_soon(self._refresh_loop, node.peer_id)

    # --- what the run does ------------------------------------------------------------------
    async def _at(self, when: float, job: Any, *args: Any) -> None:
        await trio.sleep_until(when)
        await job(*args)

    async def _leave_at(self, peer_id: ID) -> None:
        self._leave(peer_id, trio.current_time())

    async def _refresh_loop(self, peer_id: ID) -> None:
        if self.options.refresh_s <= 0:
            return
        await trio.sleep(self.rng.uniform(0, self.options.refresh_s))
        while self.is_alive(peer_id):
            node = self.nodes[peer_id]
            await node.routing.find_closest_peers_network(peer_id.to_bytes())
            await trio.sleep(self.options.refresh_s)

    async def _lookup(self) -> None:
        searcher = self.random_alive()
        target = self.random_alive(exclude=searcher.peer_id)
        searcher.table.remove_peer(target.peer_id)
        stats = LookupStats(target.peer_id)
        token = CURRENT.set(stats)
        try:
            closest = await searcher.routing.find_closest_peers_network(target.peer_id.to_bytes())
        finally:
            CURRENT.reset(token)
        self.lookups.append((target.peer_id in closest, stats.found_round, stats.rounds))

    async def _provide(self, node: SimNode, key: bytes) -> None:
        closest = await node.routing.find_closest_peers_network(key)
        for peer_id in closest:
            if peer_id == node.peer_id or not await self._connect(peer_id):
                continue
            await trio.sleep(2 * self._one_way())
            self.counters.add(2, len(key) + 2 * len(node.peer_id.to_bytes()) + 40 + STREAM_BYTES)
            self.nodes[peer_id].providers.setdefault(key, set()).add(node.peer_id)
        if key not in self.record_holders_at_start:
            self.record_holders_at_start[key] = {p for p in closest if p != node.peer_id}

    async def _provide_loop(self, peer_id: ID, key: bytes, end: float) -> None:
        await trio.sleep(self.rng.uniform(0, 5))
        while trio.current_time() + self.options.republish_s < end + self.options.republish_s:
            await self._provide(self.nodes[peer_id], key)
            await trio.sleep(self.options.republish_s)

    async def _find_record(self, key: bytes, provider: ID) -> None:
        searcher = self.random_alive(exclude=provider)
        # What ``find_providers`` reads of its service besides ``dht`` and ``host``: its closest-peer cache.
        shim = SimpleNamespace(dht=_SimKad(self, searcher), host=_Host(self, searcher.peer_id), _closest={})
        shim._remember_closest = functools.partial(DhtService._remember_closest, shim)
        shim._closest_cached = functools.partial(DhtService._closest_cached, shim)
        found = await DhtService.find_providers(shim, key)  # type: ignore[arg-type]
        self.found_records.append(any(info.peer_id == provider for info in found))
        start = self.record_holders_at_start.get(key, set())
        self.holders_gone.append(sum(not self.is_alive(p) for p in start) / max(1, len(start)))

    async def run(self) -> None:
        options = self.options
        end = options.hours * 3600.0
        await self.populate()
        initial = list(self.alive)
        leaving = self.rng.sample(initial, self.size // 2)
        staying = [p for p in initial if p not in set(leaving)]
        progress(f"n={self.size}: simulating {options.hours:g} h of churn ({len(leaving)} leave, as many join)")
        wall = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for peer_id in leaving:
                nursery.start_soon(self._at, self.rng.uniform(0, end), self._leave_at, peer_id)
            for _ in leaving:
                nursery.start_soon(self._at, self.rng.uniform(0, end), self.join)
            for index in range(options.records):
                key = hashlib.sha256(f"capability-{index}".encode()).digest()
                provider = staying[index % len(staying)]
                self.records[key] = provider
                nursery.start_soon(self._provide_loop, provider, key, end)
            for _ in range(options.lookups):
                nursery.start_soon(self._at, self.rng.uniform(60.0, end), self._lookup)
            self.upkeep = nursery
            for peer_id in initial:
                nursery.start_soon(self._refresh_loop, peer_id)
            last_report = 0.0
            while trio.current_time() < end:
                await trio.sleep(600)
                if time.perf_counter() - last_report > 20:
                    last_report = time.perf_counter()
                    progress(
                        f"n={self.size}: t={trio.current_time() / 60:.0f} min, {len(self.alive)} alive, "
                        f"{len(self.lookups)} lookups, {self.joins} joins, {self.leaves} leaves "
                        f"({time.perf_counter() - wall:.0f}s)"
                    )
            nursery.cancel_scope.cancel()
        self.upkeep = None
        self.end = trio.current_time()
        for key, provider in self.records.items():
            await self._find_record(key, provider)
        progress(f"n={self.size}: done in {time.perf_counter() - wall:.0f}s")

    def node_hours(self) -> float:
        total = 0.0
        for node in self.nodes.values():
            until = node.left_at if node.left_at is not None else self.end
            total += max(0.0, until - node.joined_at)
        return total / 3600.0


class _SimKad:
    """What ``DhtService.find_providers`` asks of py-libp2p's KadDHT, over the simulated network."""

    def __init__(self, sim: Sim, node: SimNode) -> None:
        self.sim = sim
        self.node = node
        self.peer_routing = node.routing
        self.provider_store = self

    def get_providers(self, key: bytes) -> list[PeerInfo]:
        return [self.sim.nodes[p].info for p in self.node.providers.get(key, ())]

    async def _get_providers_from_peer_with_closers(self, peer_id: ID, key: bytes) -> tuple[list[PeerInfo], list]:
        if not await self.sim._connect(peer_id):
            return [], []
        await trio.sleep(2 * self.sim._one_way())
        holder = self.sim.nodes[peer_id]
        answer = [self.sim.nodes[p].info for p in holder.providers.get(key, ())]
        self.sim.counters.add(2, len(key) + 8 + len(answer) * (40 + self.sim.sizes.record) + STREAM_BYTES)
        return answer, []


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def simulate(size: int, options: argparse.Namespace, sizes: Sizes) -> dict[str, float]:
    global SIM
    sim = Sim(size, options, sizes, options.seed + size)
    SIM = sim
    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(sim.run, clock=clock)
    hops = [float(found) for ok, found, _ in sim.lookups if ok and found is not None]
    node_hours = sim.node_hours()
    result = {
        "n": size,
        "lookups": len(sim.lookups),
        "success": sum(ok for ok, _, _ in sim.lookups) / max(1, len(sim.lookups)),
        "hops_p50": percentile(hops, 0.5),
        "hops_p90": percentile(hops, 0.9),
        "rounds_mean": sum(r for _, _, r in sim.lookups) / max(1, len(sim.lookups)),
        "records_found": sum(sim.found_records) / max(1, len(sim.found_records)),
        "holders_gone": sum(sim.holders_gone) / max(1, len(sim.holders_gone)),
        "messages_per_node_hour": sim.counters.messages / node_hours,
        "bytes_per_node_hour": sim.counters.bytes / node_hours,
        "joins": sim.joins,
        "leaves": sim.leaves,
    }
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--hours", type=float, default=2.0, help="simulated hours of churn (default 2)")
    parser.add_argument("--lookups", type=int, default=1000, help="measured lookups per size (default 1000)")
    parser.add_argument("--records", type=int, default=200, help="provider records per size (default 200)")
    parser.add_argument(
        "--refresh-s", type=float, default=1800.0, help="self lookup period per node; 0: none (default 1800)"
    )
    parser.add_argument("--republish-s", type=float, default=300.0, help="provider republish period (default 300)")
    parser.add_argument("--dial-timeout-s", type=float, default=DEFAULT_DIAL_TIMEOUT_S)
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    # A pure function of the peer id that py-libp2p recomputes (SHA-256) for every peer on every
    # closest-peers query: cached, same answers.
    routing_table.peer_id_to_key = functools.lru_cache(maxsize=1 << 16)(routing_table.peer_id_to_key)
    setattr(peer_routing, "trio", _RoundCountingTrio())  # noqa: B010 - hop counting, this process only
    KBucket._ping_peer = _ping_in_sim  # type: ignore[method-assign]
    sizes = Sizes.measure()
    progress(
        f"wire sizes (py-libp2p encoders): signed peer record {sizes.record} B, identify {sizes.identify} B, "
        f"new connection {sizes.connection} B"
    )
    results = []
    for size in sorted(int(text) for text in options.sizes.split(",") if text.strip()):
        started = time.perf_counter()
        result = simulate(size, options, sizes)
        results.append(result)
        print(
            f"n={size}: lookups={result['lookups']} success={result['success']:.4f} "
            f"hops p50/p90={result['hops_p50']:g}/{result['hops_p90']:g} "
            f"(goal <= log2(N)/2 = {math.log2(size) / 2:.1f}) "
            f"rounds/lookup={result['rounds_mean']:.2f} records_found={result['records_found']:.4f} "
            f"(of their first holders {100 * result['holders_gone']:.0f}% gone) "
            f"messages/node/h={result['messages_per_node_hour']:.0f} bytes/node/h={result['bytes_per_node_hour']:.0f} "
            f"joins={result['joins']} leaves={result['leaves']} wall={time.perf_counter() - started:.0f}s",
            flush=True,
        )
    last = results[-1]
    print(
        f"dht_sim: n={last['n']} success={last['success']:.4f} hops_p90={last['hops_p90']:g} "
        f"records_found={last['records_found']:.4f} bytes_per_node_hour={last['bytes_per_node_hour']:.0f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
