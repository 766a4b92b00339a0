"""The DHT speaks /clawnode/kad/1.0.0, never the IPFS DHT's protocol."""

from __future__ import annotations

import importlib
import pkgutil

import libp2p.kad_dht
import pytest
import trio

from dht.protocol_id import CLAWNODE_KAD_PROTOCOL_ID, current_kad_protocol_id, use_kad_protocol_id
from tests.support.swarm import open_swarm


def test_every_dht_module_that_names_the_protocol_is_rebound() -> None:
    use_kad_protocol_id()
    for info in pkgutil.iter_modules(libp2p.kad_dht.__path__, "libp2p.kad_dht."):
        module = importlib.import_module(info.name)
        if hasattr(module, "PROTOCOL_ID"):
            assert module.PROTOCOL_ID == CLAWNODE_KAD_PROTOCOL_ID, info.name
    assert current_kad_protocol_id() == CLAWNODE_KAD_PROTOCOL_ID


def test_a_protocol_id_must_be_a_path() -> None:
    with pytest.raises(ValueError):
        use_kad_protocol_id("clawnode-kad")


async def test_hosts_register_and_dial_only_the_clawnode_protocol() -> None:
    async with open_swarm(3, bootstrap_count=1) as nodes:
        for node in nodes:
            protocols = node.host.get_mux().get_protocols()
            assert CLAWNODE_KAD_PROTOCOL_ID in protocols
            assert "/ipfs/kad/1.0.0" not in protocols
        with trio.fail_after(20):
            await nodes[1].dht.dht.put_value("/clawtest/greeting", b"hello")
            assert await nodes[2].dht.dht.get_value("/clawtest/greeting") == b"hello"
        remote_protocols = nodes[0].host.get_peerstore().get_protocols(nodes[1].host.get_id())
        assert CLAWNODE_KAD_PROTOCOL_ID in remote_protocols
