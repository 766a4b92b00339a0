"""A node that joins learns peers in the far half of the key space, not only those close to it (issue 23).

The join's self lookup meets the peers closest to the node's own id; a swarm with more than 20 of them
left its routing table with nobody in the other half, and a lookup of a node there walked to the edge
of its own half and ended among peers that knew nobody past it (bench/dht_swarm.py --trace). Real hosts
over loopback, each running the node's DHT; ids are drawn so that the joiner's 20 closest are all in its
own half.
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from pathlib import Path

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from bootstrap.peer_book import PeerBook
from dht.lookup import far_keys, key_of
from dht.protocol_id import use_kad_protocol_id
from dht.service import DhtService
from node.host import build_host

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def _point(key_pair: KeyPair) -> int:
    return key_of(ID.from_pubkey(key_pair.public_key).to_bytes())


def test_far_keys_fall_in_the_farthest_buckets_in_order() -> None:
    me = key_of(b"me")
    for bucket, key in enumerate(far_keys(me, 6, random.Random(7))):
        assert (key_of(key) ^ me).bit_length() == 256 - bucket


async def test_a_joining_node_holds_peers_of_the_far_half_of_the_key_space(tmp_path: Path) -> None:
    use_kad_protocol_id()
    joiner_key = generate_new_ed25519_identity()
    me = _point(joiner_key)
    near: list[KeyPair] = []
    far: list[KeyPair] = []
    while len(near) < 22 or len(far) < 3:
        key_pair = generate_new_ed25519_identity()
        side = near if (_point(key_pair) ^ me) >> 255 == 0 else far
        if len(side) < (22 if side is near else 3):
            side.append(key_pair)
    hosts: list[IHost] = [build_host(key_pair) for key_pair in [*near, *far]]
    far_ids = {ID.from_pubkey(key_pair.public_key) for key_pair in far}
    joiner = build_host(joiner_key)
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        services: list[DhtService] = []
        for index, host in enumerate(hosts):
            await stack.enter_async_context(host.run(LOOPBACK))
            book = PeerBook(tmp_path / f"{index}.json")
            dht = DhtService(host, bootstrap_addrs=[], peer_book=book, refresh_interval_s=3600)
            await nursery.start(dht.run)
            services.append(dht)
        # The first node knows everyone (as a long-running bootstrap node does); the others know only it.
        bootstrap, bootstrap_dht = hosts[0], services[0]
        for host, dht in zip(hosts, services, strict=True):
            if host is not bootstrap:
                bootstrap.get_peerstore().add_addrs(host.get_id(), host.get_addrs(), 3600)
                assert await bootstrap_dht.dht.routing_table.add_peer(PeerInfo(host.get_id(), host.get_addrs()))
                host.get_peerstore().add_addrs(bootstrap.get_id(), bootstrap.get_addrs(), 3600)
                await dht.dht.routing_table.add_peer(PeerInfo(bootstrap.get_id(), bootstrap.get_addrs()))
        await stack.enter_async_context(joiner.run(LOOPBACK))
        joining = DhtService(
            joiner,
            bootstrap_addrs=[f"{bootstrap.get_addrs()[0]}"],
            peer_book=PeerBook(tmp_path / "joiner.json"),
            refresh_interval_s=3600,
        )
        await nursery.start(joining.run)
        with trio.fail_after(8):
            await joining.joined.wait()
        table = set(joining.dht.routing_table.get_peer_ids())
    assert table & far_ids, f"the joiner's table ({len(table)} peers) holds none of the far half's {len(far_ids)}"
