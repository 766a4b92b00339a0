"""The provider's one notice to the consumer that a lease ended (``RevokeRequest``, no retry) may be
lost; the consumer must not depend on it.

Real nodes over loopback and the embedded chain with the escrow contract. With every such notice
dropped: a dispute on chain ends the consumer's held lease all the same (its escrow sweep reads the
frozen escrow), the arbiter's release is booked as its spend and its refund lands, and the chain and
both ledgers agree to the wei; a call the provider refuses because it ended the lease ends the held
lease in the consumer's machine (no further call is sent), and revoking it still queues the refund.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from node.daemon import Node
from protocols import lease_wire as w
from protocols.lease import consumer as lease_consumer
from protocols.lease import provider as lease_provider
from protocols.machines.lease_consumer import ConsumerEvent, ConsumerState
from protocols.settings import MarketSection
from runtime.errors import ClawnodeError, ErrorCode, Reason
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes

FAST = MarketSection(  # type: ignore[call-arg]
    receipt_every_units=4, receipt_every_s=1, countersign_timeout_s=2, abandon_after_s=60, claim_every_s=1
)
BUDGET = 20 * WORD_PRICE
WAIT_S = 10


@pytest.fixture
def notices_lost(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``RevokeRequest`` the provider sends is lost; the reasons it tried are listed."""
    original = lease_provider.request
    dropped: list[str] = []

    async def lossy(host: Any, peer: Any, protocol: Any, message: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(message, w.RevokeRequest):
            dropped.append(message.reason)
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "the notice was lost")
        return await original(host, peer, protocol, message, *args, **kwargs)

    monkeypatch.setattr(lease_provider, "request", lossy)
    # The provider rereads an idle lease's escrow soon, so it sees the dispute after the last call.
    monkeypatch.setattr(lease_provider, "ESCROW_IDLE_CHECK_S", lease_provider.ESCROW_CHECK_S)
    # And the consumer rereads a booked lease's escrow as soon, so it sees the dispute before the
    # arbiter closes the escrow (a read after that sees it closed, which ends the lease all the same).
    monkeypatch.setattr(lease_consumer, "ESCROW_IDLE_CHECK_S", lease_consumer.ESCROW_CHECK_S)
    return dropped


async def _until(check: Any, what: str) -> None:
    try:
        with trio.fail_after(WAIT_S):
            while not await check():
                await trio.sleep(0.1)
    except trio.TooSlowError:
        raise AssertionError(f"{what}: not after {WAIT_S} s") from None


async def _money(node: Node) -> tuple[int, int]:
    totals = await node.ledger.totals_by_peer()
    return sum(t.income for t in totals), sum(t.spend for t in totals)


async def _refund_landed(node: Node) -> bool:
    return any(s.kind == "refund" and s.state == "landed" for s in await node.ledger.list_settlements())


async def _use(consumer: Node, lease_id: str, *words: int) -> None:
    for count in words:
        await consumer.market.call(lease_id, {"prompt": " ".join(f"w{i}" for i in range(count))})


async def test_a_dispute_ends_the_held_lease_when_the_providers_notice_is_lost(notices_lost: list[str]) -> None:
    async with market_nodes([{"offers": (WORD_OFFER,), "market": FAST}, {}]) as (nodes, shared):
        provider, consumer = nodes
        view = await consumer.market.open_lease(str(provider.host.get_id()), WORDS, budget=BUDGET, duration_s=300)
        lease_id, escrow_id = view.lease_id, bytes.fromhex(view.lease_id)
        held, served = consumer.market.held[lease_id], provider.market.served[lease_id]
        payer = consumer.escrow_client
        assert payer is not None
        await _use(consumer, lease_id, 5, 4)

        async def countersigned() -> bool:
            return held.committed == 9 * WORD_PRICE

        await _until(countersigned, "the consumer countersigns the 9 units")
        await payer.chain.run(payer.dispute, payer.account.address, escrow_id)

        async def provider_stopped() -> bool:
            return (
                served.ended_reason is not None and (await provider.ledger.get_lease(lease_id)).state != "lease_active"
            )

        await _until(provider_stopped, "the provider ends the frozen lease")
        assert notices_lost == ["escrow disputed"]  # the consumer was never told

        async def consumer_stopped() -> bool:
            return held.ended_reason is not None

        await _until(consumer_stopped, "the consumer ends the frozen lease on its own")
        assert held.ended_reason == "escrow disputed"
        owed = await provider.ledger.countersigned_amount(lease_id)
        state = await payer.chain.run(payer.get, payer.account.address, escrow_id)
        arbiter = shared.deployer.for_account(shared.arbiter)
        await arbiter.chain.run(arbiter.resolve, payer.account.address, escrow_id, owed - state.released)

        async def closed_out() -> bool:
            return (
                await _refund_landed(consumer)
                and held.machine.state == ConsumerState.SETTLED
                and all(s.state != "pending" for s in await provider.ledger.list_settlements())
            )

        await _until(closed_out, "the consumer's refund and spend after the resolution")
        assert ConsumerEvent.FREEZE in [event for _, event, _ in held.machine.history]
        state = await payer.chain.run(payer.get, payer.account.address, escrow_id)
        assert (state.phase, state.released) == ("closed", owed) and owed == 9 * WORD_PRICE
        # The chain and both ledgers agree to the wei: the release is the provider's income and the
        # consumer's spend; the rest of the lock came back to the consumer.
        income, _ = await _money(provider)
        _, spend = await _money(consumer)
        assert income == spend == state.released
        lease = await consumer.ledger.get_lease(lease_id)
        assert lease.state != "lease_active"
        assert (lease.settled_amount, lease.refunded_amount) == (state.released, BUDGET - state.released)
        for node in (provider, consumer):
            assert (await node.ledger.verify_audit()).ok


async def test_a_call_refused_on_an_ended_lease_ends_the_held_lease(notices_lost: list[str]) -> None:
    async with market_nodes([{"offers": (WORD_OFFER,), "market": FAST}, {}]) as (nodes, _):
        provider, consumer = nodes
        view = await consumer.market.open_lease(str(provider.host.get_id()), WORDS, budget=BUDGET, duration_s=300)
        lease_id = view.lease_id
        held = consumer.market.held[lease_id]
        await _use(consumer, lease_id, 3)
        await provider.market.revoke(lease_id)
        assert notices_lost == ["revoked by the provider"]
        assert held.machine.state == ConsumerState.ACTIVE  # not told
        with pytest.raises(ClawnodeError) as refused:
            await _use(consumer, lease_id, 2)
        assert refused.value.reason == Reason.ENDED
        assert held.machine.state == ConsumerState.ENDED  # spent: the next call is refused here
        served_before = provider.market.failures.copy()
        with pytest.raises(ClawnodeError) as again:
            await _use(consumer, lease_id, 2)
        assert again.value.reason == Reason.ENDED and provider.market.failures == served_before
        await consumer.market.revoke(lease_id)  # its end work: the ledger row closed, the rest refunded
        assert held.ended_reason == "revoked by the consumer"
        assert (await consumer.ledger.get_lease(lease_id)).state != "lease_active"

        async def booked() -> bool:
            income, _ = await _money(provider)
            return income == 3 * WORD_PRICE and (await _money(consumer))[1] == income

        await _until(booked, "the provider's claim, booked as the consumer's spend")
        # The rest of the lock is queued back to the consumer (the contract pays it after the deadline).
        [refund] = [s for s in await consumer.ledger.list_settlements() if s.kind == "refund"]
        assert refund.state == "pending" and refund.lease_id == lease_id
