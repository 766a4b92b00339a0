"""A joining node takes a bootstrap's network profile only for a development chain.

A profile is only ever handed out for a network's development chain (a private chain id, random in
[2**32, 2**48)). A hostile bootstrap naming ``eip155:1`` and an RPC URL it runs made a joining
node sign its escrow transactions for Ethereum mainnet and hand them to that URL: with a wallet
imported from elsewhere (``clawnode wallet import``) each one could be replayed on mainnet, paying
the contract the stranger named. Now such a profile counts as none.
"""

from __future__ import annotations

import multiaddr
import pytest
import trio
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr

from bootstrap.network import NetworkProfile, NetworkService, find_profile
from node.host import build_host
from runtime.escrow.chain import PRIVATE_CHAIN_ID_MIN

CONTRACT = "0x" + "ab" * 20
LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


async def _found(chain: str) -> NetworkProfile | None:
    bootstrap, joiner = build_host(create_new_key_pair()), build_host(create_new_key_pair())
    async with bootstrap.run(LOOPBACK), joiner.run(LOOPBACK), trio.open_nursery() as nursery:
        service = await nursery.start(NetworkService(bootstrap).run)
        service.profile = NetworkProfile(chain=chain, contract=CONTRACT, rpc_urls=["http://127.0.0.1:8545"])
        addr = f"{bootstrap.get_addrs()[0]}"
        await joiner.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))  # as the daemon does first
        found = await find_profile(joiner, [addr], timeout_s=5)
        nursery.cancel_scope.cancel()
    return found[1] if found is not None else None


@pytest.mark.parametrize("chain", ["eip155:1", "eip155:137", "eip155:31337", f"eip155:{2**48}"])
async def test_a_profile_naming_a_public_chain_is_not_joined(chain: str) -> None:
    assert await _found(chain) is None


async def test_a_development_chains_profile_is_joined() -> None:
    found = await _found(f"eip155:{PRIVATE_CHAIN_ID_MIN + 12345}")
    assert found is not None and found.chain_id == PRIVATE_CHAIN_ID_MIN + 12345
