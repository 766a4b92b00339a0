"""A restarted bootstrap brings a fresh dev chain: the nodes that had joined the old one join again (issue 20)."""

from __future__ import annotations

from pathlib import Path

import trio

from node.config import ApiSection, BootstrapSection, Config, EscrowSection, NodeSection
from node.daemon import Node
from node.localnet import wait_for
from tests.support.processes import DaemonProcess


async def test_a_joined_node_follows_its_restarted_bootstrap_to_a_fresh_chain(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    boot = DaemonProcess(
        tmp_path / "bootstrap", ["--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0", "--role", "bootstrap"]
    )
    await trio.to_thread.run_sync(boot.start)
    daemons.append(boot)
    identity = await trio.to_thread.run_sync(boot.identity)
    boot_addr = identity["listen_addrs"][0]

    def boot_chain() -> int | None:
        escrow = boot.api("/api/ledger/summary")["escrow"]
        return int(escrow["chain_id"]) if escrow["state"] == "connected" else None

    config = Config(
        node=NodeSection(listen=["/ip4/127.0.0.1/tcp/0"]),  # type: ignore[call-arg]
        api=ApiSection(port=0),
        bootstrap=BootstrapSection(peers=[boot_addr], use_defaults=False),
        escrow=EscrowSection(health_interval_s=0.2),  # type: ignore[call-arg]
    )
    joiner = Node(config, tmp_path / "joiner")
    joiner.rejoin_after_s = 1.0
    async with trio.open_nursery() as nursery:
        await nursery.start(joiner.run)

        def joined() -> bool:
            return joiner.escrow_client is not None and joiner.network is not None and joiner.network.state == "joined"

        await wait_for(joined, 60, "the first join")
        first = joiner.escrow_client.chain.chain_id
        assert first == await trio.to_thread.run_sync(boot_chain)

        # The bootstrap restarts on the same address, with a fresh chain: the old one is gone with its process.
        await trio.to_thread.run_sync(boot.stop)
        boot = DaemonProcess(
            boot.data_dir, ["--listen", boot_addr.split("/p2p/")[0], "--api-port", "0", "--role", "bootstrap"]
        )
        await trio.to_thread.run_sync(boot.start)
        daemons.append(boot)
        second = None
        with trio.fail_after(60):
            while second is None:
                second = await trio.to_thread.run_sync(boot_chain)
                await trio.sleep(0.2)
        assert second != first

        await wait_for(
            lambda: joiner.escrow_client is not None and joiner.escrow_client.chain.chain_id == second,
            60,
            "the joiner on the new chain",
        )
        assert joiner.network is not None and joiner.network.state == "joined"
        await wait_for(lambda: joiner.escrow_status.state == "connected", 30, "connected")
        wallet = await joiner.wallet()
        assert wallet.chain == f"eip155:{second}" and wallet.balance > 0  # funded again, by the new faucet
        nursery.cancel_scope.cancel()
