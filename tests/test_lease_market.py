"""The lease market end to end: real nodes, real libp2p streams, real ledgers, a real escrow contract.

discover → quote → lock → grant → use → receipts → claim (release against countersigned receipts)
→ refund of the rest, and the paths where things go wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import trio

from dht.discovery import DiscoveryQuery, ProviderResult
from node.config import MarketSection
from node.daemon import Node
from node.datadir import read_api_token
from runtime.ledger import Lease
from runtime.service import ServiceRegistry
from tests.support.market import (
    WORD_OFFER,
    WORD_PRICE,
    WORDS,
    SharedChain,
    WordService,
    market_config,
    market_nodes,
    metric_samples,
    wait_for,
)

if TYPE_CHECKING:
    from trio_typing import TaskStatus

# Every log line these tests produce is checked for local paths.
pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")


PROMPT = "the quick brown fox jumps over the lazy dog again"  # 10 words


async def _settled(node: Node, lease_id: str) -> Lease:
    lease: Lease = await node.ledger.get_lease(lease_id)
    return lease


async def _metrics(node: Node) -> dict[str, float]:
    """The node's /metrics, parsed by Prometheus's own text parser: sample name{labels} → value."""
    token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"{node.api_url}/metrics", headers={"authorization": f"Bearer {token}"})
    assert reply.status_code == 200
    return metric_samples(reply.text)


async def _all_landed(node: Node) -> bool:
    settlements = await node.ledger.list_settlements()
    return bool(settlements) and all(s.state == "landed" for s in settlements)


async def _wait_landed(node: Node, timeout_s: float = 60) -> None:
    with trio.fail_after(timeout_s):
        while not await _all_landed(node):
            node._wake_settlement()
            await trio.sleep(0.2)


async def test_discover_lease_use_settle_and_refund() -> None:
    specs = [{}, {"offers": (WORD_OFFER,)}, {}]
    async with market_nodes(specs) as (nodes, shared):
        _, provider, consumer = nodes
        await wait_for(lambda: provider.publisher.record is not None)
        found: list[ProviderResult] = []
        with trio.fail_after(60):
            while not found:
                found = await consumer.discover(DiscoveryQuery(capability=WORDS))
                await trio.sleep(0.2)
        assert found[0].peer_id == str(provider.host.get_id())
        assert found[0].price_per_unit == WORD_PRICE

        budget = 100 * WORD_PRICE
        lease = await consumer.market.open_lease(found[0].peer_id, WORDS, budget=budget, duration_s=30)
        assert lease.budget == budget and lease.mode == "escrow"
        client = consumer.escrow_client
        state = await client.chain.run(client.get, client.account.address, bytes.fromhex(lease.lease_id))
        assert state.phase == "active" and state.amount == budget

        results = [await consumer.market.call(lease.lease_id, {"prompt": PROMPT}) for _ in range(3)]
        assert [r.units for r in results] == [10, 10, 10]
        assert " ".join(c["text"] for c in results[0].chunks) == PROMPT
        assert results[0].served_by == found[0].peer_id

        # Receipts every 10 units: each call's receipt is countersigned by the consumer.
        async def countersigned_units() -> int:
            receipts = await provider.ledger.list_receipts(lease.lease_id)
            return max((r.units for r in receipts if r.countersigned), default=0)

        with trio.fail_after(20):
            while await countersigned_units() < 30:
                await trio.sleep(0.1)

        await consumer.market.revoke(lease.lease_id)
        # The provider claims what the consumer countersigned: 30 words.
        await _wait_landed(provider)
        state = await client.chain.run(client.get, client.account.address, bytes.fromhex(lease.lease_id))
        assert state.released == 30 * WORD_PRICE
        assert provider.escrow_client is not None
        credit = await client.chain.run(client.credit_of, provider.escrow_client.account.address)
        assert credit == 30 * WORD_PRICE

        # The consumer's refund waits for deadline + dispute window: its queue shows it, in /metrics too.
        metrics = await _metrics(consumer)
        assert metrics["clawnode_settlement_queue_length"] == 1
        assert metrics['clawnode_leases{role="consumer",state="lease_ended"}'] == 1
        provider_metrics = await _metrics(provider)
        assert provider_metrics['clawnode_lease_units{role="provider"}'] == 30
        assert provider_metrics["clawnode_tokens_served_total"] == 30
        assert provider_metrics['clawnode_inference_duration_seconds_count{via="lease"}'] == 3
        assert provider_metrics['clawnode_inference_first_token_seconds_count{via="lease"}'] == 3
        assert metrics["clawnode_tokens_bought_total"] == 30

        # The rest comes back to the consumer once deadline + dispute window have passed.
        await trio.to_thread.run_sync(shared.chain.time_travel, 30 + 30 + 5 + 5)
        await _wait_landed(consumer)
        state = await client.chain.run(client.get, client.account.address, bytes.fromhex(lease.lease_id))
        assert state.phase == "closed"
        consumer_credit = await client.chain.run(client.credit_of, client.account.address)
        assert consumer_credit == budget - 30 * WORD_PRICE

        # Both ledgers agree with each other and with the chain.
        provider_lease = await _settled(provider, lease.lease_id)
        consumer_lease = await _settled(consumer, lease.lease_id)
        assert provider_lease.settled_amount == 30 * WORD_PRICE
        assert provider_lease.metered_units == 30
        assert consumer_lease.refunded_amount == budget - 30 * WORD_PRICE
        for node in (provider, consumer):
            assert (await node.ledger.verify_audit()).ok


async def test_a_shared_chain_fixture_is_reusable() -> None:
    """Two market runs on one chain: escrow ids never collide, wallets are funded per node."""
    shared = await trio.to_thread.run_sync(SharedChain.start)
    for _ in range(2):
        async with market_nodes([{"offers": (WORD_OFFER,)}, {}], chain=shared) as (nodes, _):
            provider, consumer = nodes
            lease = await consumer.market.open_lease(str(provider.host.get_id()), WORDS, budget=WORD_PRICE * 5)
            result = await consumer.market.call(lease.lease_id, {"prompt": "one two"})
            assert result.units == 2


async def test_a_restarted_provider_keeps_serving_its_leases(tmp_path: Path) -> None:
    """The grant is kept in the provider's ledger: after a restart the same token works, metering
    continues where the ledger left it, and receipts keep being countersigned."""
    shared = await trio.to_thread.run_sync(SharedChain.start)
    async with market_nodes([{}], chain=shared) as (nodes, _):
        consumer = nodes[0]

        async def run_provider(task_status: TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
            config = market_config(bootstrap=[], offers=(WORD_OFFER,))
            services = ServiceRegistry()
            services.register(WORDS, WordService())
            node = Node(config, tmp_path / "provider", services=services, escrow_connector=shared.connector)
            await node.run(task_status=task_status)

        async with trio.open_nursery() as nursery:
            provider: Node = await nursery.start(run_provider)
            await wait_for(lambda: provider.escrow_client is not None)
            consumer.host.get_peerstore().add_addrs(provider.host.get_id(), provider.host.get_addrs(), 3600)
            view = await consumer.market.open_lease(str(provider.host.get_id()), WORDS, budget=WORD_PRICE * 100)
            assert (await consumer.market.call(view.lease_id, {"prompt": PROMPT})).units == 10
            # The process dies with a call in flight: its pending meter row is left behind.
            await provider.ledger.reserve_call(view.lease_id, "cut-by-the-crash", reserved_units=50)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            provider = await nursery.start(run_provider)
            await wait_for(lambda: provider.escrow_client is not None)
            # Same identity, new port: what the DHT would tell the consumer.
            consumer.host.get_peerstore().add_addrs(provider.host.get_id(), provider.host.get_addrs(), 3600)
            assert (await consumer.market.call(view.lease_id, {"prompt": "three more words"})).units == 3
            # Metered once the consumer's ack of the end frame arrives, a moment after the call returns.
            with trio.fail_after(10):
                while (lease := await provider.ledger.get_lease(view.lease_id)).metered_units < 13:
                    await trio.sleep(0.05)
            # The restart settled the cut call at 0 units (never more than the consumer could count).
            assert lease.metered_units == 13 and lease.state == "lease_active"
            assert await provider.ledger.pending_calls() == []

            async def countersigned() -> int:
                receipts = await provider.ledger.list_receipts(view.lease_id)
                return max((r.units for r in receipts if r.countersigned), default=0)

            with trio.fail_after(20):
                while await countersigned() < 13:
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()


async def test_a_running_lease_is_paid_as_it_goes() -> None:
    """With ``market.claim_every_s`` the provider claims countersigned usage while the lease runs."""
    settings = MarketSection(receipt_every_units=10, receipt_every_s=2, claim_every_s=1)  # type: ignore[call-arg]
    async with market_nodes([{"offers": (WORD_OFFER,), "market": settings}, {}]) as (nodes, _):
        provider, consumer = nodes
        lease = await consumer.market.open_lease(str(provider.host.get_id()), WORDS, budget=WORD_PRICE * 100)
        await consumer.market.call(lease.lease_id, {"prompt": PROMPT})
        client = consumer.escrow_client
        escrow_id = bytes.fromhex(lease.lease_id)
        with trio.fail_after(30):
            while (await client.chain.run(client.get, client.account.address, escrow_id)).released < 10 * WORD_PRICE:
                await trio.sleep(0.2)
        assert (await provider.ledger.get_lease(lease.lease_id)).state == "lease_active"
        await consumer.market.call(lease.lease_id, {"prompt": PROMPT})
        with trio.fail_after(30):
            while (await client.chain.run(client.get, client.account.address, escrow_id)).released < 20 * WORD_PRICE:
                await trio.sleep(0.2)
