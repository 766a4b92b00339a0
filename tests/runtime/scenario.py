"""The paid-lease story, end to end, on any chain: lock → meter → countersign → claim part → refund the rest.

Both sides run their own ledger and settlement queue; the test checks the chain, both ledgers and
the audit chains agree at the end.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount

from runtime.escrow import Chain, EscrowClient
from runtime.ledger import EscrowRef, Ledger
from runtime.settlement import Backoff, EscrowSettler, SettlementQueue
from tests.runtime.support import lease_for, peer_id, peer_key, receipt_key_of
from wire.peer_keys import ed25519_public_key

PROVIDER, CONSUMER = peer_key("provider"), peer_key("consumer")
PRICE = 10**12  # wei per token
BUDGET = 1000 * PRICE
LEASE = "lease-e2e"


@dataclass
class Side:
    ledger: Ledger
    escrow: EscrowClient
    queue: SettlementQueue


class ManualClock:
    """The queues' clock, moved by the test so backoff delays pass instantly."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Market:
    chain: Chain
    escrow_id: bytes
    payer: LocalAccount
    payee: LocalAccount
    provider: Side
    consumer: Side
    deadline: int
    window: int
    clock: ManualClock


async def open_market(chain: Chain, tmp_path: Path, *, backoff: Backoff | None = None) -> Market:
    clock = ManualClock()
    payer, payee, arbiter, deployer = chain.dev_accounts()[:4]
    deployed = await chain.run(EscrowClient.deploy, chain, deployer)
    escrow_id = os.urandom(32)
    deadline, window = await chain.run(chain.next_timestamp) + 60, 30
    payer_escrow, payee_escrow = deployed.for_account(payer), deployed.for_account(payee)
    await chain.run(
        payer_escrow.lock,
        escrow_id,
        payee=payee.address,
        arbiter=arbiter.address,
        amount=BUDGET,
        deadline=deadline,
        window=window,
    )
    ref = EscrowRef(contract=deployed.address, payer=payer.address, escrow_id="0x" + escrow_id.hex())
    sides = []
    for role, escrow in (("provider", payee_escrow), ("consumer", payer_escrow)):
        ledger = await Ledger.open(tmp_path / f"{role}.db", clock=lambda: int(clock()), peer_keys=ed25519_public_key)
        lease = lease_for(role, LEASE, PROVIDER, CONSUMER, price_per_unit=PRICE, budget=BUDGET, escrow=ref)
        await ledger.open_lease(lease, idempotency_key=f"open-{LEASE}")
        queue = SettlementQueue(ledger, chain, EscrowSettler(escrow), backoff=backoff, clock=clock)
        sides.append(Side(ledger, escrow, queue))
    return Market(chain, escrow_id, payer, payee, sides[0], sides[1], deadline, window, clock)


async def meter_and_countersign(m: Market, units: int, key: str) -> int:
    """The provider meters ``units``, issues a receipt; the consumer countersigns it with a voucher."""
    await m.provider.ledger.record_usage(LEASE, writer=peer_id(PROVIDER), units=units, idempotency_key=key)
    receipt = await m.provider.ledger.issue_receipt(LEASE, receipt_key_of(PROVIDER))
    voucher = "0x" + m.consumer.escrow.sign_voucher(m.escrow_id, receipt.body.amount).hex()
    signed = await m.consumer.ledger.countersign_receipt(receipt, receipt_key_of(CONSUMER), voucher=voucher)
    await m.provider.ledger.record_countersigned(signed)
    return receipt.body.amount


async def run_lease_end_to_end(chain: Chain, tmp_path: Path) -> None:
    m = await open_market(chain, tmp_path)
    owed = 0
    for i, units in enumerate((100, 50, 70)):
        owed = await meter_and_countersign(m, units, f"usage-{i}")
    assert owed == 220 * PRICE

    # Release part: the provider claims what the newest countersigned receipt says.
    claim = await m.provider.ledger.enqueue_claim(LEASE)
    report = await m.provider.queue.flush()
    assert (report.landed, report.retried, report.failed) == (1, 0, 0)
    escrow = await chain.run(m.provider.escrow.get, m.payer.address, m.escrow_id)
    assert (escrow.released, escrow.phase) == (owed, "active")
    # Settling again changes nothing: same id, already landed, nothing due.
    assert (await m.provider.ledger.enqueue_claim(LEASE)).state == "landed"
    assert (await m.provider.queue.flush()).landed == 0
    assert (await m.provider.ledger.get_settlement(claim.settlement_id)).state == "landed"

    # Refund the rest: refused by the contract until deadline + window, then lands.
    await m.consumer.ledger.end_lease(LEASE, idempotency_key="end")
    refund = await m.consumer.ledger.enqueue_refund(LEASE)
    report = await m.consumer.queue.flush()
    assert report.retried == 1
    assert (await m.consumer.ledger.get_settlement(refund.settlement_id)).last_error == "too_early"
    await chain.run(chain.time_travel, m.deadline + m.window - await chain.run(chain.now) + 5)
    assert (await m.consumer.queue.flush()).landed == 0  # backing off: not due yet
    m.clock.advance(600)
    report = await m.consumer.queue.flush()
    assert report.landed == 1
    payer_credit = await chain.run(m.consumer.escrow.credit_of, m.payer.address)
    payee_credit = await chain.run(m.consumer.escrow.credit_of, m.payee.address)
    assert (payer_credit, payee_credit) == (BUDGET - owed, owed)
    assert await chain.run(m.consumer.escrow.contract_balance) == BUDGET

    # Both withdraw through their queues; the contract ends empty and the payee's wallet got `owed`.
    before = await chain.run(chain.w3.eth.get_balance, m.payee.address)
    await m.provider.ledger.enqueue_withdraw(idempotency_key="w1")
    await m.consumer.ledger.enqueue_withdraw(idempotency_key="w1")
    assert (await m.provider.queue.flush()).landed == 1
    assert (await m.consumer.queue.flush()).landed == 1
    assert await chain.run(m.consumer.escrow.contract_balance) == 0
    withdrawal = (await m.provider.ledger.get_settlement("withdraw/w1")).tx_hash
    assert withdrawal is not None
    tx = await chain.run(chain.w3.eth.get_transaction_receipt, withdrawal)
    after = await chain.run(chain.w3.eth.get_balance, m.payee.address)
    assert after - before + tx["gasUsed"] * tx["effectiveGasPrice"] == owed

    # The two ledgers agree with the chain and with each other.
    [income] = await m.provider.ledger.totals_by_peer()
    [spend] = await m.consumer.ledger.totals_by_peer()
    assert (income.key, income.income, income.spend, income.net) == (peer_id(CONSUMER), owed, 0, owed)
    assert (spend.key, spend.income, spend.spend, spend.net) == (peer_id(PROVIDER), 0, owed, -owed)
    [day] = await m.provider.ledger.totals_by_day()
    assert day.income == owed
    lease = await m.consumer.ledger.get_lease(LEASE)
    assert (lease.state, lease.settled_amount, lease.refunded_amount) == ("lease_settled", owed, BUDGET - owed)
    assert all(r.settled for r in await m.provider.ledger.list_receipts(LEASE))
    for side in (m.provider, m.consumer):
        assert (await side.ledger.verify_audit()).ok
        assert (await side.ledger.queue_stats()).length == 0
