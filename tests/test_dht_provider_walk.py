"""A find's provider lookup reads provider lists on its walk (issue 23): the walk asks GET_PROVIDERS
instead of FIND_NODE, so the key's closest peers have answered with their lists when it ends and no
second round of asks follows; a peer on the path that names junk cannot push the real providers out.
Real hosts on loopback (the swarm test); the ranking test feeds protobuf answers as a peer sends them."""

from __future__ import annotations

import trio
from libp2p import generate_new_ed25519_identity
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID

from dht.lookup import Providers
from dht.offers import provider_key
from tests.support.records import GEMMA
from tests.support.swarm import NodeSpec, open_swarm


def _peer_id() -> ID:
    return ID.from_pubkey(generate_new_ed25519_identity().public_key)


def _answer(providers: list[ID]) -> Message:
    response = Message()
    response.type = Message.MessageType.GET_PROVIDERS
    for provider in providers:
        entry = response.providerPeers.add()
        entry.id = provider.to_bytes()
        entry.addrs.append(b"\x04\x7f\x00\x00\x01\x06\x0f\xa0")  # /ip4/127.0.0.1/tcp/4000
    return response


async def test_a_cold_find_reads_provider_lists_on_its_walk_with_no_second_round() -> None:
    async with open_swarm(6, specs={4: NodeSpec(offers=(GEMMA,)), 5: NodeSpec(offers=(GEMMA,))}) as nodes:
        asker = nodes[1]
        expected = {nodes[4].host.get_id(), nodes[5].host.get_id()}
        key = provider_key(GEMMA.name)
        with trio.fail_after(20):
            while True:  # both providers' announcements have landed somewhere
                held = {info.peer_id for node in nodes for info in node.dht.dht.provider_store.get_providers(key)}
                if expected <= held:
                    break
                await trio.sleep(0.1)
        asked_after_walk: list[ID] = []
        store = asker.dht.dht.provider_store
        ask = store._get_providers_from_peer_with_closers

        async def counting(peer_id: ID, key: bytes):  # type: ignore[no-untyped-def]
            asked_after_walk.append(peer_id)
            return await ask(peer_id, key)

        store._get_providers_from_peer_with_closers = counting  # type: ignore[method-assign]
        asker.dht._closest.clear()  # cold: nothing remembered of the key's closest peers
        with trio.fail_after(20):
            found = {info.peer_id for info in await asker.dht.find_providers(key)}
        assert found == expected
        assert asked_after_walk == []  # the walk's own answers gave the lists


def test_one_answer_full_of_junk_does_not_push_out_the_providers_the_others_agree_on() -> None:
    real = [_peer_id() for _ in range(3)]
    junk = [_peer_id() for _ in range(60)]
    kept = Providers(limit=20)
    kept.take(None, _answer(junk).providerPeers)  # type: ignore[arg-type]  # no signed records: no host needed
    for _ in range(3):
        kept.take(None, _answer(real).providerPeers)  # type: ignore[arg-type]
    best = [info.peer_id for info in kept.best()]
    assert best[:3] == real  # named by three answers: ahead of anything one answer named
    assert len(best) == 20
    assert len(kept.found) <= Providers.KEPT_FACTOR * 20
    assert all(info.addrs for info in kept.best())
