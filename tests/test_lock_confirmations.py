"""A seller counts a buyer's escrow lock only once it is ``escrow.confirmations`` blocks deep.

A lock that only the chain's head shows is refused ``lock_unconfirmed`` (E_UNAVAILABLE, retryable),
never read as "no lock" (which would blame the buyer's funds), and the consumer sends the same open
again until the provider counts it.
"""

from __future__ import annotations

import logging
import secrets

import pytest
import trio

from dht.discovery import DiscoveryQuery, ProviderResult
from protocols.confirmed import confirmed_lock
from protocols.machines.escrow_lock import LOCK_UNCONFIRMED
from runtime.errors import ClawnodeError, ErrorCode
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, SharedChain, market_nodes, wait_for


async def test_a_lock_counts_only_once_it_is_deep_enough() -> None:
    shared = SharedChain.start()
    buyer = shared.connector(secrets.token_bytes(32))
    seller = shared.connector(secrets.token_bytes(32))
    seller.confirmations = 3
    escrow_id = secrets.token_bytes(32)
    chain_now = await buyer.chain.run(buyer.chain.next_timestamp)
    await buyer.chain.run(
        lambda: buyer.lock(
            escrow_id,
            payee=seller.account.address,
            arbiter=shared.arbiter.address,
            amount=1000,
            deadline=chain_now + 600,
            window=5,
        )
    )
    # In the head's block only: refused with the retryable reason, not read as a missing lock.
    with pytest.raises(ClawnodeError) as refused:
        await confirmed_lock(seller, buyer.account.address, escrow_id)
    assert refused.value.code == ErrorCode.UNAVAILABLE and refused.value.reason == LOCK_UNCONFIRMED
    # A lock that was never made is "none" (the grant then refuses it as not active), not unconfirmed.
    missing = await confirmed_lock(seller, buyer.account.address, secrets.token_bytes(32))
    assert missing.phase == "none"
    await seller.chain.run(seller.chain.time_travel, 1)
    with pytest.raises(ClawnodeError):  # two blocks deep of three
        await confirmed_lock(seller, buyer.account.address, escrow_id)
    await seller.chain.run(seller.chain.time_travel, 1)
    state = await confirmed_lock(seller, buyer.account.address, escrow_id)
    assert state.phase == "active" and state.amount == 1000

    # A top-up (a payment channel's) returns, like a lock, only once it is the payer's confirmations deep.
    buyer.confirmations, buyer.confirmation_poll_s = 3, 0.05
    returned_at: list[int] = []

    def top_up() -> None:
        result = buyer.top_up(escrow_id, amount=500, deadline=chain_now + 700)
        returned_at.append(result.block_number)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, top_up)
        for _ in range(2):
            await trio.sleep(0.3)
            assert not returned_at  # not yet deep enough
            await seller.chain.run(seller.chain.time_travel, 1)
    assert returned_at
    state = await confirmed_lock(seller, buyer.account.address, escrow_id)
    assert state.amount == 1500  # the seller at 3 confirmations counts it as soon as it returned


async def test_the_consumer_asks_again_until_the_provider_counts_its_lock(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="protocols.lease")
    async with market_nodes([{}, {"offers": (WORD_OFFER,)}, {}]) as (nodes, _shared):
        _, provider, consumer = nodes
        await wait_for(lambda: provider.publisher.record is not None)
        assert provider.escrow_client is not None and consumer.escrow_client is not None
        provider.escrow_client.confirmations = 3  # the consumer's lock returns at 1 block deep
        found: list[ProviderResult] = []
        with trio.fail_after(30):
            while not found:
                found = await consumer.discover(DiscoveryQuery(capability=WORDS))
                await trio.sleep(0.1)
        chain = consumer.escrow_client.chain
        start = await chain.run(lambda: int(chain.w3.eth.block_number))

        async def blocks() -> None:  # a dev chain that mines on transactions only: blocks come from here
            while True:
                await trio.sleep(0.4)
                await chain.run(chain.time_travel, 1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocks)
            with trio.fail_after(20):
                lease = await consumer.market.open_lease(found[0].peer_id, WORDS, budget=50 * WORD_PRICE, duration_s=60)
            nursery.cancel_scope.cancel()
        assert lease.mode == "escrow"
        # The open was refused at least once, then granted on the same lock (no second lock).
        assert any(LOCK_UNCONFIRMED in r.getMessage() for r in caplog.records)
        locks_block = await chain.run(lambda: int(chain.w3.eth.block_number))
        assert locks_block >= start + 3
        result = await consumer.market.call(lease.lease_id, {"prompt": "one two three"})
        assert result.units == 3
