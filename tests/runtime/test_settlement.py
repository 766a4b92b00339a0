"""Settlement: the paid-lease story on the in-process chain, and landing exactly once whatever happened before."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from pydantic import ValidationError

from runtime.escrow import Chain, EscrowSettings, connect_escrow
from tests.runtime.scenario import LEASE, PRICE, meter_and_countersign, open_market, run_lease_end_to_end


async def test_lease_end_to_end_on_the_embedded_chain(tmp_path: Path) -> None:
    await run_lease_end_to_end(Chain.embedded(), tmp_path)


async def test_a_claim_that_landed_before_a_crash_is_not_paid_or_counted_twice(tmp_path: Path) -> None:
    chain = Chain.embedded()
    m = await open_market(chain, tmp_path)
    owed = await meter_and_countersign(m, 40, "u1")
    settlement = await m.provider.ledger.enqueue_claim(LEASE)
    # The transaction landed, then the node died before its ledger wrote that down.
    record = await m.provider.ledger.get_receipt(LEASE, 1)
    voucher = bytes.fromhex(record.receipt.voucher[2:])  # type: ignore[index]
    await chain.run(m.provider.escrow.claim, m.payer.address, m.escrow_id, owed, voucher)
    block_before = await chain.run(lambda: chain.w3.eth.block_number)
    report = await m.provider.queue.flush()
    assert report.landed == 1
    assert await chain.run(lambda: chain.w3.eth.block_number) == block_before  # no second transaction
    assert (await m.provider.ledger.get_settlement(settlement.settlement_id)).state == "landed"
    [totals] = await m.provider.ledger.totals_by_peer()
    assert totals.income == owed == 40 * PRICE
    assert await chain.run(m.provider.escrow.credit_of, m.payee.address) == owed


async def test_an_ended_lease_whose_claim_was_never_queued_is_found_until_it_is(tmp_path: Path) -> None:
    """What a restart asks the ledger for (``LeaseMarket._recover``): an ended escrowed lease of ours with
    a countersigned receipt and no claim of it queued (a crash or a full disk between the two writes)."""
    m = await open_market(Chain.embedded(), tmp_path)
    await meter_and_countersign(m, 40, "usage-0")
    assert await m.provider.ledger.unclaimed_leases() == []  # still open: the lease's end claims it
    await m.provider.ledger.end_lease(LEASE, idempotency_key="end")
    assert await m.provider.ledger.unclaimed_leases() == [LEASE]
    assert await m.consumer.ledger.unclaimed_leases() == []  # the consumer claims nothing
    await m.provider.ledger.enqueue_claim(LEASE)
    assert await m.provider.ledger.unclaimed_leases() == []


async def test_payer_release_and_later_claim_are_reconciled_not_added(tmp_path: Path) -> None:
    chain = Chain.embedded()
    m = await open_market(chain, tmp_path)
    owed = await meter_and_countersign(m, 30, "u1")
    # The consumer releases more than the receipt on its own; the provider's claim finds it paid.
    await m.consumer.ledger.enqueue_release(LEASE, owed + 5 * PRICE)
    assert (await m.consumer.queue.flush()).landed == 1
    await m.provider.ledger.enqueue_claim(LEASE)
    assert (await m.provider.queue.flush()).landed == 1
    [income] = await m.provider.ledger.totals_by_peer()
    [spend] = await m.consumer.ledger.totals_by_peer()
    assert income.income == spend.spend == owed + 5 * PRICE
    escrow = await chain.run(m.provider.escrow.get, m.payer.address, m.escrow_id)
    assert escrow.released == owed + 5 * PRICE


async def test_a_settlement_that_can_never_land_fails_visibly_instead_of_looping(tmp_path: Path) -> None:
    chain = Chain.embedded()
    m = await open_market(chain, tmp_path)
    await meter_and_countersign(m, 10, "u1")
    # The provider waited too long: the payer took everything back after deadline + window.
    await chain.run(chain.time_travel, m.deadline + m.window - await chain.run(chain.now) + 5)
    await chain.run(m.consumer.escrow.refund, m.payer.address, m.escrow_id)
    settlement = await m.provider.ledger.enqueue_claim(LEASE)
    report = await m.provider.queue.flush()
    assert report.failed == 1
    failed = await m.provider.ledger.get_settlement(settlement.settlement_id)
    assert (failed.state, failed.last_error) == ("failed", "closed")
    assert (await m.provider.ledger.queue_stats()).length == 0
    assert [e.kind for e in await m.provider.ledger.audit_entries(after_seq=0, limit=100)][-1] == "settlement.failed"


async def test_queue_runs_as_a_service_and_flushes_when_woken(tmp_path: Path) -> None:
    chain = Chain.embedded()
    m = await open_market(chain, tmp_path)
    owed = await meter_and_countersign(m, 12, "u1")
    m.provider.queue.interval_s = 3600.0  # only a wake-up can make it flush in time
    async with trio.open_nursery() as nursery:
        queue = await nursery.start(m.provider.queue.run)
        settlement = await m.provider.ledger.enqueue_claim(LEASE)
        queue.wake()
        with trio.fail_after(10):
            while (await m.provider.ledger.get_settlement(settlement.settlement_id)).state != "landed":
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert (await chain.run(m.provider.escrow.get, m.payer.address, m.escrow_id)).released == owed


def test_escrow_settings_pick_the_chain() -> None:
    assert connect_escrow(EscrowSettings(mode="off")) is None
    client = connect_escrow(EscrowSettings(mode="embedded"))
    assert client is not None and client.chain.mode == "embedded"
    assert client.chain.w3.eth.get_code(client.address)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        EscrowSettings(mode="rpc")
