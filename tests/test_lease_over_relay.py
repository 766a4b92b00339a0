"""A lease whose control messages ride a relay, then whose inference moves to a punched direct path.

Real nodes on loopback: two relays with tight circuit limits, a private provider that is known only
by its signed record (circuit addresses), a private consumer, one embedded EVM chain for escrow.

The consumer's own hole punching is switched off (``[nat] hole_punch = false``) so that quote,
escrow lock, grant, calls and receipts provably travel over the relayed connection; the test then
starts the same ``HolePunchService`` the daemon runs and asks it to punch, which on loopback always
succeeds (the NAT matrix shows where it does not).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID

from nat.holepunch import HolePunchService
from node.config import BootstrapSection, Config, EscrowSection, MarketSection, NatSection, NodeSection, RelaySection
from node.daemon import Node
from runtime.service import ServiceRegistry
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, SharedChain, WordService, market_config, metric_samples

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

# The circuit v2 spec's example of a limited relay is 128 KiB and 2 minutes; ours are tighter.
CIRCUIT_BYTES = 48 * 1024
CIRCUIT_SECONDS = 90
PROMPT = "the quick brown fox jumps over the lazy dog again"  # 10 words
# One call whose stream alone is larger than a relay lets a circuit carry.
BIG_PROMPT = " ".join(f"token{i:05d}" for i in range(3000))


def _private(relays: list[str], *, offers: bool, hole_punch: bool) -> Config:
    base = market_config(
        bootstrap=relays,
        offers=(WORD_OFFER,) if offers else (),
        market=MarketSection(receipt_every_units=10, receipt_every_s=1),  # type: ignore[call-arg]
    )
    return base.model_copy(
        update={
            "node": NodeSection(listen=["/ip4/127.0.0.1/tcp/0"], reachability="private"),  # type: ignore[call-arg]
            "relay": RelaySection(static_relays=relays),  # type: ignore[call-arg]
            "bootstrap": BootstrapSection(peers=relays, use_defaults=False),
            "nat": NatSection(hole_punch=hole_punch),  # type: ignore[call-arg]
        }
    )


async def _countersigned(provider: Node, lease_id: str, units: int, *, timeout_s: float) -> None:
    """Until the provider holds a receipt for ``units`` that the consumer countersigned."""
    with trio.fail_after(timeout_s):
        while True:
            receipts = await provider.ledger.list_receipts(lease_id)
            if max((r.units for r in receipts if r.countersigned), default=0) >= units:
                return
            await trio.sleep(0.1)


async def _relayed_bytes(relays: list[Node]) -> int:
    total = 0
    for relay in relays:
        samples = metric_samples((await relay.metrics()).decode())
        assert samples['clawnode_relay_circuits_cut_total{limit="data"}'] == 0
        assert samples['clawnode_relay_circuits_cut_total{limit="duration"}'] == 0
        total += int(samples["clawnode_relay_circuit_bytes_total"])
    return total


async def test_lease_control_rides_the_relay_within_limits_and_inference_moves_to_the_punched_path(
    tmp_path: Path,
) -> None:
    shared = await trio.to_thread.run_sync(SharedChain.start)
    async with trio.open_nursery() as nursery:
        relays: list[Node] = []
        for name in ("relay1", "relay2"):
            relay_config = market_config(bootstrap=[]).model_copy(
                update={
                    "node": NodeSection(listen=["/ip4/127.0.0.1/tcp/0"], role="relay"),  # type: ignore[call-arg]
                    "relay": RelaySection(  # type: ignore[call-arg]
                        max_circuit_bytes=CIRCUIT_BYTES, max_circuit_duration_s=CIRCUIT_SECONDS
                    ),
                    "escrow": EscrowSection(mode="off"),  # type: ignore[call-arg]
                }
            )
            relay = Node(relay_config, tmp_path / name)
            await nursery.start(relay.run)
            relays.append(relay)
        relay_addrs = [str(relay.listen_addrs()[0]) for relay in relays]
        services = ServiceRegistry()
        services.register(WORDS, WordService())
        provider = Node(
            _private(relay_addrs, offers=True, hole_punch=True),
            tmp_path / "provider",
            services=services,
            escrow_connector=shared.connector,
        )
        consumer = Node(
            _private(relay_addrs, offers=False, hole_punch=False),
            tmp_path / "consumer",
            escrow_connector=shared.connector,
        )
        for node in (provider, consumer):
            await nursery.start(node.run)
        provider_id = provider.host.get_id()
        with trio.fail_after(60):
            while not (
                provider.publisher.published_at
                and len(provider.relayed_addrs()) == 2
                and consumer.escrow_client is not None
                and provider.escrow_client is not None
            ):
                await trio.sleep(0.1)

        # As in the hole-punch test: on loopback the provider's own address is dialable, so the
        # auto-connectors stop and the consumer goes by the signed record (relays first); a
        # background dial that still wins the race sets the precondition up again (3 tries).
        for node in (provider, consumer):
            await node.host.get_network().auto_connector.stop()  # type: ignore[attr-defined]
        assert consumer.relay is not None and consumer.holepunch is not None
        for _attempt in range(3):
            if consumer.host.get_network().get_connections(provider_id):
                await consumer.host.disconnect(provider_id)
            consumer.host.get_peerstore().clear_addrs(provider_id)
            described = await consumer.describe(str(provider_id))
            assert described.reachable
            if consumer.holepunch.path_to(provider_id) == "relayed":
                break
        assert consumer.holepunch.path_to(provider_id) == "relayed", "every try found a direct connection"

        # Quote, escrow lock, grant, three calls and their countersigned receipts: all over the relay.
        before_lease = await _relayed_bytes(relays)
        lease = await consumer.market.open_lease(
            str(provider_id), WORDS, budget=4000 * WORD_PRICE, duration_s=CIRCUIT_SECONDS
        )
        assert lease.mode == "escrow"
        opened = await _relayed_bytes(relays)
        results = [await consumer.market.call(lease.lease_id, {"prompt": PROMPT}) for _ in range(3)]
        assert [r.units for r in results] == [10, 10, 10]
        await _countersigned(provider, lease.lease_id, 30, timeout_s=20)
        over_relay = await _relayed_bytes(relays)
        assert consumer.holepunch.path_to(provider_id) == "relayed"
        assert provider.status().reached_by.startswith("relay")
        # Well inside the limit: the lease's control traffic is a small part of one circuit's budget.
        print(f"relay bytes: lease open {opened - before_lease}, 3 calls + receipts {over_relay - opened}")
        assert over_relay - before_lease < CIRCUIT_BYTES // 2

        # A hole punch turns the relayed connection direct; the next call (larger than a whole
        # circuit may carry) goes over it and the relays see none of it.
        punch = HolePunchService(consumer.host)
        await nursery.start(punch.run)
        punch.relayed_dial(provider_id)
        with trio.fail_after(20):
            while punch.counts["direct"] + punch.counts["failed"] < 1:
                await trio.sleep(0.05)
        assert punch.counts["direct"] == 1
        assert consumer.holepunch.path_to(provider_id) == "direct"
        before_big = await _relayed_bytes(relays)
        big = await consumer.market.call(lease.lease_id, {"prompt": BIG_PROMPT, "max_tokens": 3000})
        assert big.units == 3000 and big.chunks[-1]["text"] == "token02999"
        after_big = await _relayed_bytes(relays)
        print(f"relay bytes during the {3000}-word call on the punched path: {after_big - before_big}")
        assert after_big - before_big < 4096  # the relayed connection's keep-alives at most

        # The lease still settles: the provider claims what the consumer countersigned.
        await _countersigned(provider, lease.lease_id, 3030, timeout_s=30)
        await consumer.market.revoke(lease.lease_id)
        client = consumer.escrow_client
        assert client is not None
        with trio.fail_after(60):
            while (
                await client.chain.run(client.get, client.account.address, bytes.fromhex(lease.lease_id))
            ).released != 3030 * WORD_PRICE:
                provider._wake_settlement()
                await trio.sleep(0.2)
        assert ID.from_base58(lease.provider) == provider_id
        nursery.cancel_scope.cancel()
