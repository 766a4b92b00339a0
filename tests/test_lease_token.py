"""A lease paid in an ERC-20 (a mock stablecoin on the embedded chain): real nodes, real streams, real ledgers.

The provider's offer prices in ``erc20:<token>``: its quote names the token, the consumer approves
and locks in it, the provider refuses a lock in anything else, claims in it and withdraws it; both
ledgers and the chain agree on every amount.
"""

from __future__ import annotations

import secrets
from dataclasses import replace

import pytest
import trio

from dht.discovery import DiscoveryQuery, ProviderResult
from dht.offers import Offer
from protocols.machines.escrow_lock import LockState, LockTerms, lock_verdict
from runtime.errors import ClawnodeError, ErrorCode
from runtime.escrow.client import ZERO_ADDRESS, record_asset
from runtime.escrow.token import TokenClient
from tests.support.market import WORD_PRICE, WORDS, SharedChain, market_nodes, wait_for

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

PROMPT = "the quick brown fox jumps over the lazy dog again"  # 10 words


def test_a_lock_in_another_asset_is_refused() -> None:
    token = "0x" + "ab" * 20
    lock = LockState("active", "0x" + "11" * 20, "0x" + "22" * 20, 100, 0, 1_000, 5, ZERO_ADDRESS)
    terms = LockTerms("lease", "0x" + "11" * 20, "0x" + "22" * 20, 100, 5, 500, token)
    refusal = lock_verdict(lock, terms)
    assert refusal is not None and refusal.reason == "lock_wrong_asset"
    assert lock_verdict(replace(lock, token=token.upper().replace("0X", "0x")), terms) is None
    assert lock_verdict(lock, LockTerms("lease", lock.payee, lock.arbiter, 100, 5, 500)) is None


async def test_a_lease_paid_in_a_mock_stablecoin() -> None:
    shared = await trio.to_thread.run_sync(SharedChain.start)
    minter = await trio.to_thread.run_sync(TokenClient.deploy, shared.chain, shared.chain.dev_accounts()[0])
    offer = Offer(name=WORDS, summary="echoes words", price_per_unit=WORD_PRICE, asset=record_asset(minter.address))  # type: ignore[call-arg]
    async with market_nodes([{}, {"offers": (offer,)}, {}], chain=shared) as (nodes, _):
        _, provider, consumer = nodes
        assert provider.escrow_client is not None and consumer.escrow_client is not None
        client, paid = consumer.escrow_client, provider.escrow_client.account.address
        await trio.to_thread.run_sync(minter.mint, client.account.address, 10_000 * WORD_PRICE)
        await wait_for(lambda: provider.publisher.record is not None)
        found: list[ProviderResult] = []
        with trio.fail_after(30):
            while not found:
                found = await consumer.discover(DiscoveryQuery(capability=WORDS))
                await trio.sleep(0.1)
        assert found[0].asset == f"erc20:{minter.address}"

        budget = 100 * WORD_PRICE
        lease = await consumer.market.open_lease(found[0].peer_id, WORDS, budget=budget, duration_s=30)
        state = await client.chain.run(client.get, client.account.address, bytes.fromhex(lease.lease_id))
        assert state.phase == "active" and state.amount == budget and state.token == minter.address
        assert await trio.to_thread.run_sync(minter.balance_of, client.account.address) == 9_900 * WORD_PRICE

        results = [await consumer.market.call(lease.lease_id, {"prompt": PROMPT}) for _ in range(3)]
        assert [r.units for r in results] == [10, 10, 10]

        async def countersigned_units() -> int:
            receipts = await provider.ledger.list_receipts(lease.lease_id)
            return max((r.units for r in receipts if r.countersigned), default=0)

        with trio.fail_after(20):
            while await countersigned_units() < 30:
                await trio.sleep(0.1)
        await consumer.market.revoke(lease.lease_id)
        with trio.fail_after(30):
            while not (settled := await provider.ledger.list_settlements()) or any(
                s.state != "landed" for s in settled
            ):
                provider._wake_settlement()
                await trio.sleep(0.2)

        # The chain: released in the token, credited in the token, nothing in the coin.
        state = await client.chain.run(client.get, client.account.address, bytes.fromhex(lease.lease_id))
        assert state.released == 30 * WORD_PRICE
        assert await client.chain.run(client.credit_of, paid, minter.address) == 30 * WORD_PRICE
        assert await client.chain.run(client.credit_of, paid) == 0
        # The ledgers say the same amounts.
        claims = [s for s in settled if s.lease_id == lease.lease_id and s.kind in ("claim", "release")]
        assert claims and max(s.amount for s in claims) == 30 * WORD_PRICE
        ours = await provider.ledger.get_lease(lease.lease_id)
        theirs = await consumer.ledger.get_lease(lease.lease_id)
        assert ours.metered_units == 30 and ours.settled_amount == 30 * WORD_PRICE
        assert theirs.price_per_unit == ours.price_per_unit == WORD_PRICE
        signed = await consumer.ledger.list_receipts(lease.lease_id)  # what the consumer countersigned
        assert max(r.units for r in signed) * theirs.price_per_unit == state.released
        # A lease on a payment channel: the channel is locked in the token too, and its draw counts.
        on_channel = await consumer.market.open_lease(
            found[0].peer_id, WORDS, budget=budget, duration_s=30, channel=True
        )
        assert (await consumer.market.call(on_channel.lease_id, {"prompt": PROMPT})).units == 10
        held = consumer.market.held[on_channel.lease_id]
        assert held.channel_id is not None and held.escrow_id is not None
        channel = await client.chain.run(client.get, client.account.address, held.escrow_id)
        assert channel.phase == "active" and channel.token == minter.address
        # A wallet short of the token is told so before anything is sent (not "the transaction reverted").
        poor = shared.connector(secrets.token_bytes(32))
        with pytest.raises(ClawnodeError) as short:
            await poor.chain.run(
                lambda: poor.lock(
                    secrets.token_bytes(32),
                    payee=paid,
                    arbiter=shared.arbiter.address,
                    amount=1,
                    deadline=2**40,
                    window=5,
                    token=minter.address,
                )
            )
        assert short.value.code == ErrorCode.INSUFFICIENT_FUNDS and short.value.reason == "insufficient_funds"
        assert await poor.chain.run(lambda: poor.chain.w3.eth.get_transaction_count(poor.account.address)) == 0
        # The provider takes its pay out in the token.
        paid_out = await provider.withdraw(None, minter.address)  # POST /api/wallet/withdraw {"token": …}
        assert paid_out.amount == 30 * WORD_PRICE and paid_out.to == paid
        assert await trio.to_thread.run_sync(minter.balance_of, paid) == 30 * WORD_PRICE
