"""A network's dev chain carries a mock stablecoin: the bootstrap deploys it, its profile names it, the
faucet hands each joining wallet some, and ``clawnode wallet`` (``/api/wallet``) shows it (issue 20)."""

from __future__ import annotations

from pathlib import Path

import trio

from node.config import ApiSection, BootstrapSection, Config, EscrowSection, NodeSection
from node.daemon import Node
from node.localnet import wait_for
from runtime.escrow.devchain import FAUCET_TOKENS


def _config(peers: list[str], role: str = "node") -> Config:
    return Config(
        node=NodeSection(listen=["/ip4/127.0.0.1/tcp/0"], role=role),  # type: ignore[call-arg, arg-type]
        api=ApiSection(port=0),
        bootstrap=BootstrapSection(peers=peers, use_defaults=False),
        escrow=EscrowSection(health_interval_s=0.2),  # type: ignore[call-arg]
    )


async def test_joining_wallets_get_the_networks_stablecoin(tmp_path: Path) -> None:
    boot = Node(_config([], "bootstrap"), tmp_path / "bootstrap")
    async with trio.open_nursery() as nursery:
        await nursery.start(boot.run)
        await wait_for(lambda: boot.network is not None and boot.network.state == "serving", 60, "the dev chain")
        assert boot.network is not None and boot.network.profile is not None
        token = boot.network.profile.stablecoin
        assert token is not None and token.startswith("0x")
        joiner = Node(_config([str(boot.listen_addrs()[0])]), tmp_path / "joiner")
        await nursery.start(joiner.run)

        def joined() -> bool:
            return joiner.escrow_client is not None and joiner.network is not None and joiner.network.state == "joined"

        await wait_for(joined, 60, "the join")
        assert joiner.network is not None and joiner.network.profile is not None
        assert joiner.network.profile.stablecoin == token
        wallet = await joiner.wallet()
        assert wallet.stablecoin == token
        assert wallet.stablecoin_balance == FAUCET_TOKENS and wallet.stablecoin_credit == 0
        assert wallet.balance > 0
        nursery.cancel_scope.cancel()
