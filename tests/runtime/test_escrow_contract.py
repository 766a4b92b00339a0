"""The escrow contract's rules, one behaviour at a time, on the in-process chain."""

from __future__ import annotations

import os
from typing import Any

import pytest

from runtime.errors import ErrorCode
from runtime.escrow import Chain, EscrowError
from tests.runtime.conftest import Deployed
from tests.runtime.support import free_port

ETH = 10**18


def _id() -> bytes:
    return os.urandom(32)


def _lock(d: Deployed, amount: int = ETH, *, deadline_in: int = 100, window: int = 50) -> bytes:
    payer, payee, arbiter = d.accounts[0], d.accounts[1], d.accounts[2]
    escrow_id = _id()
    d.as_(payer).lock(
        escrow_id,
        payee=payee.address,
        arbiter=arbiter.address,
        amount=amount,
        deadline=d.chain.next_timestamp() + deadline_in,
        window=window,
    )
    return escrow_id


def _reason(call: object) -> str:
    with pytest.raises(EscrowError) as caught:
        call()  # type: ignore[operator]
    return caught.value.reason


def test_ids_are_per_payer_so_nobody_can_squat_another_payers_id(embedded: Deployed) -> None:
    d = embedded
    payer, payee, arbiter, other = d.accounts[:4]
    escrow_id = _lock(d)
    # The same id by another payer is a different escrow.
    d.as_(other).lock(
        escrow_id, payee=payee.address, arbiter=arbiter.address, amount=5, deadline=d.chain.now() + 100, window=0
    )
    assert d.escrow.get(payer.address, escrow_id).amount == ETH
    assert d.escrow.get(other.address, escrow_id).amount == 5
    again = _reason(
        lambda: d.as_(payer).lock(
            escrow_id, payee=payee.address, arbiter=arbiter.address, amount=1, deadline=d.chain.now() + 100, window=0
        )
    )
    assert again == "exists"


def test_claim_needs_the_payers_voucher_and_pays_a_cumulative_amount_once(embedded: Deployed) -> None:
    d = embedded
    payer, payee = d.accounts[0], d.accounts[1]
    escrow_id = _lock(d)
    voucher = d.as_(payer).sign_voucher(escrow_id, ETH // 4)
    as_payee = d.as_(payee)
    as_payee.claim(payer.address, escrow_id, ETH // 4, voucher)
    # Replaying the same voucher pays nothing more.
    assert _reason(lambda: as_payee.claim(payer.address, escrow_id, ETH // 4, voucher)) == "already_released"
    # A voucher for one amount does not unlock another.
    assert _reason(lambda: as_payee.claim(payer.address, escrow_id, ETH // 2, voucher)) == "bad_signature"
    # The payee cannot sign its own voucher.
    forged = d.as_(payee).sign_voucher(escrow_id, ETH // 2)
    with pytest.raises(EscrowError) as caught:
        as_payee.claim(payer.address, escrow_id, ETH // 2, forged)
    assert (caught.value.reason, caught.value.code) == ("bad_signature", ErrorCode.FORBIDDEN)
    assert d.escrow.credit_of(payee.address) == ETH // 4
    assert d.escrow.get(payer.address, escrow_id).released == ETH // 4


def test_a_voucher_does_not_pay_out_on_another_escrow_of_the_same_payer(embedded: Deployed) -> None:
    d = embedded
    payer, payee = d.accounts[0], d.accounts[1]
    first, second = _lock(d), _lock(d)
    voucher = d.as_(payer).sign_voucher(first, ETH // 2)
    assert _reason(lambda: d.as_(payee).claim(payer.address, second, ETH // 2, voucher)) == "bad_signature"


def test_refund_only_after_deadline_plus_window_and_only_the_rest(embedded: Deployed) -> None:
    d = embedded
    payer, payee = d.accounts[0], d.accounts[1]
    escrow_id = _lock(d, deadline_in=100, window=50)
    d.as_(payer).release(escrow_id, ETH // 10)
    d.chain.time_travel(120)  # past the deadline, inside the window
    assert _reason(lambda: d.escrow.refund(payer.address, escrow_id)) == "too_early"
    d.chain.time_travel(40)
    d.escrow.refund(payer.address, escrow_id)  # anyone may trigger it; the coin goes to the payer
    assert d.escrow.credit_of(payer.address) == ETH - ETH // 10
    assert d.escrow.credit_of(payee.address) == ETH // 10
    assert _reason(lambda: d.escrow.refund(payer.address, escrow_id)) == "closed"


def test_dispute_freezes_everything_until_the_arbiter_splits(embedded: Deployed) -> None:
    d = embedded
    payer, payee, arbiter, stranger = d.accounts[:4]
    escrow_id = _lock(d, deadline_in=10, window=20)
    d.as_(payer).release(escrow_id, 100)
    assert _reason(lambda: d.as_(stranger).dispute(payer.address, escrow_id)) == "forbidden"
    d.as_(payee).dispute(payer.address, escrow_id)
    voucher = d.as_(payer).sign_voucher(escrow_id, 500)
    assert _reason(lambda: d.as_(payer).release(escrow_id, 200)) == "disputed"
    assert _reason(lambda: d.as_(payee).claim(payer.address, escrow_id, 500, voucher)) == "disputed"
    d.chain.time_travel(100)
    assert _reason(lambda: d.escrow.refund(payer.address, escrow_id)) == "disputed"
    assert _reason(lambda: d.as_(payer).resolve(payer.address, escrow_id, 0)) == "forbidden"
    assert _reason(lambda: d.as_(arbiter).resolve(payer.address, escrow_id, ETH)) == "exceeds_locked"
    d.as_(arbiter).resolve(payer.address, escrow_id, 1000)
    assert d.escrow.credit_of(payee.address) == 1100
    assert d.escrow.credit_of(payer.address) == ETH - 1100
    assert d.escrow.get(payer.address, escrow_id).phase == "closed"


def test_dispute_is_refused_after_the_window(embedded: Deployed) -> None:
    d = embedded
    payer = d.accounts[0]
    escrow_id = _lock(d, deadline_in=10, window=20)
    d.chain.time_travel(40)
    with pytest.raises(EscrowError) as caught:
        d.as_(payer).dispute(payer.address, escrow_id)
    assert (caught.value.reason, caught.value.code) == ("window_closed", ErrorCode.EXPIRED)


def test_a_payee_that_rejects_coin_blocks_nothing(embedded: Deployed) -> None:
    """The payee is a contract whose every call reverts; others still get paid, and it can withdraw elsewhere."""
    d = embedded
    payer, arbiter = d.accounts[0], d.accounts[2]
    # Runtime code 0x60006000fd = PUSH1 0 PUSH1 0 REVERT: a contract that refuses every payment.
    init = bytes.fromhex("6460006000fd6000526005601bf3")  # store those 5 bytes, return them as the code
    w3 = d.chain.w3
    tx: dict[str, Any] = {"from": payer.address, "data": init, "gas": 100_000, "gasPrice": w3.eth.gas_price}
    tx["nonce"] = w3.eth.get_transaction_count(payer.address)
    tx["chainId"] = d.chain.chain_id
    signed = payer.sign_transaction(tx)
    receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(signed.raw_transaction))
    rejecting = str(receipt["contractAddress"])
    assert w3.eth.get_code(rejecting).hex() == "60006000fd"  # type: ignore[arg-type]
    escrow_id = os.urandom(32)
    deadline = d.chain.next_timestamp() + 100
    d.as_(payer).lock(escrow_id, payee=rejecting, arbiter=arbiter.address, amount=1000, deadline=deadline, window=0)
    other = _lock(d, amount=2000)
    d.as_(payer).release(escrow_id, 600)  # credited, not pushed: does not revert
    d.as_(payer).release(other, 2000)
    d.as_(d.accounts[1]).withdraw()  # the ordinary payee is paid regardless
    assert d.escrow.credit_of(d.accounts[1].address) == 0
    assert d.escrow.credit_of(rejecting) == 600
    assert d.escrow.contract_balance() == 1000  # 600 credited to the rejecting payee + 400 still locked


def test_withdraw_pays_out_exactly_the_credit(embedded: Deployed) -> None:
    d = embedded
    payer, payee, sink = d.accounts[0], d.accounts[1], d.accounts[5]
    escrow_id = _lock(d)
    d.as_(payer).release(escrow_id, ETH // 2)
    before = d.chain.w3.eth.get_balance(sink.address)
    d.as_(payee).withdraw(sink.address)
    assert d.chain.w3.eth.get_balance(sink.address) - before == ETH // 2
    assert _reason(lambda: d.as_(payee).withdraw()) == "nothing_to_withdraw"
    assert d.escrow.contract_balance() == ETH // 2


def test_errors_from_a_down_chain_name_no_endpoint() -> None:
    with pytest.raises(EscrowError) as caught:
        Chain.rpc(f"http://127.0.0.1:{free_port()}", timeout_s=1.0)
    assert caught.value.reason == "chain_unavailable"
    assert "127.0.0.1" not in caught.value.message and "http" not in caught.value.message
