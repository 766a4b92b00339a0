"""Payment channels end to end (issue 20): real nodes, real libp2p streams, real ledgers, the escrow contract.

Several leases between one consumer and one provider draw on one escrow: one lock, one close, and the
consumer's ledger, the provider's ledger and the chain agree on every wei.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from dht.discovery import DiscoveryQuery
from node.config import MarketSection
from node.daemon import Node
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes, wait_for

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

PROMPT = "the quick brown fox jumps over the lazy dog again"  # 10 words

CHANNEL_MARKET = MarketSection(  # type: ignore[call-arg]
    receipt_every_units=10,
    receipt_every_s=2,
    channel_leases_per_lock=1,  # each lease after the first finds the channel short: it is topped up
    channel_duration_s=600,
    channel_idle_close_s=3600,
    channel_claim_idle_s=1,
    channel_margin_s=0,
)


async def _money(node: Node, direction: str) -> dict[str, int]:
    """Income or spend per lease id, as the node's ledger booked it."""
    rows = node.ledger.store._conn.execute(  # a read of the real file; the API has no per-lease money view
        "SELECT lease_id, amount FROM money WHERE direction = ?", (direction,)
    ).fetchall()
    out: dict[str, int] = {}
    for lease_id, amount in rows:
        out[lease_id] = out.get(lease_id, 0) + int(amount)
    return out


async def _wait_settled(node: Node, timeout_s: float = 30) -> None:
    with trio.fail_after(timeout_s):
        while True:
            rows = await node.ledger.list_settlements()
            if rows and all(s.state == "landed" for s in rows):
                return
            node._wake_settlement()
            await trio.sleep(0.2)


async def test_leases_between_one_pair_draw_on_one_channel() -> None:
    consumer_market = CHANNEL_MARKET.model_copy(update={"channel_idle_close_s": 3})
    specs: list[dict[str, Any]] = [{}, {"offers": (WORD_OFFER,), "market": CHANNEL_MARKET}, {"market": consumer_market}]
    async with market_nodes(specs) as (nodes, _shared):
        _, provider, consumer = nodes
        await wait_for(lambda: provider.publisher.record is not None)
        peer = str(provider.host.get_id())
        with trio.fail_after(60):  # discovery puts the provider's addresses in the consumer's peer store
            while not await consumer.discover(DiscoveryQuery(capability=WORDS)):
                await trio.sleep(0.2)
        client = consumer.escrow_client
        assert client is not None and provider.escrow_client is not None
        budget = 50 * WORD_PRICE
        leases = []
        for calls in (1, 2, 3):  # three leases, one after the other, as the router renews them
            view = await consumer.market.open_lease(peer, WORDS, budget=budget, duration_s=60, channel=True)
            for _ in range(calls):
                assert (await consumer.market.call(view.lease_id, {"prompt": PROMPT})).units == 10
            await consumer.market.revoke(view.lease_id)
            leases.append(view.lease_id)

        channels = await consumer.market.channels.list(role="consumer")
        assert len(channels) == 1, "every lease drew on the one channel"
        channel = channels[0]
        assert channel.leases == 3 and channel.committed == 60 * WORD_PRICE
        # 50 words locked; the second lease found 40 free and the third 30: each topped it up to its budget.
        assert consumer.market.channel_top_ups == 2
        locked = budget + 10 * WORD_PRICE + 20 * WORD_PRICE
        escrow_id = bytes.fromhex(channel.channel_id[2:])
        # One lock on chain for three leases (and two top-ups): the consumer's lock journal has one row.
        locks = consumer.ledger.store._conn.execute("SELECT escrow_id FROM escrow_locks").fetchall()
        assert locks == [(channel.channel_id,)]
        state = await client.chain.run(client.get, client.account.address, escrow_id)
        assert state.amount == locked == channel.amount and state.phase == "active"

        # The provider closes the idle channel: its highest voucher (60 words), once, for all three leases.
        await _wait_settled(provider)
        claims = [s for s in await provider.ledger.list_settlements() if s.kind == "claim"]
        assert len(claims) == 1 and claims[0].amount == 60 * WORD_PRICE and claims[0].lease_id is None
        state = await client.chain.run(client.get, client.account.address, escrow_id)
        assert state.released == 60 * WORD_PRICE
        assert state.phase == "closed", "one settle paid the provider and gave the rest back at once"
        await _wait_settled(consumer)
        [refund_row] = [s for s in await consumer.ledger.list_settlements() if s.kind == "refund"]
        assert refund_row.tx_hash is None, "the consumer's refund found the channel closed: no transaction"
        after = await client.chain.run(client.get, client.account.address, escrow_id)
        assert after.phase == "closed"

        # The ledgers and the chain agree: per lease, the provider's income is the consumer's spend.
        income, spend = await _money(provider, "income"), await _money(consumer, "spend")
        assert income == spend == {leases[0]: 10 * WORD_PRICE, leases[1]: 20 * WORD_PRICE, leases[2]: 30 * WORD_PRICE}
        credit = await client.chain.run(provider.escrow_client.credit_of, provider.escrow_client.account.address)
        assert credit == sum(income.values())
        refund = await client.chain.run(client.credit_of, client.account.address)
        assert refund == locked - 60 * WORD_PRICE
        closed = await consumer.market.channels.get(channel.channel_id)
        assert closed.state == "channel_closed" and closed.refunded == locked - 60 * WORD_PRICE
        for lease_id in leases:
            assert (await consumer.ledger.get_lease(lease_id)).state == "lease_settled"
            assert (await provider.ledger.get_lease(lease_id)).settled_amount == income[lease_id]
