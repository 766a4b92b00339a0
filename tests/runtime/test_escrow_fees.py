"""What the escrow client offers per gas (EIP-1559 within escrow.max_fee_gwei) and when it counts a lock
(escrow.confirmations), on the in-process chain."""

from __future__ import annotations

import os
import threading

import pytest

from runtime.errors import ErrorCode
from runtime.escrow import EscrowError
from runtime.escrow.fees import Fees, choose_fees
from tests.runtime.conftest import Deployed

GWEI = 10**9


def test_fees_follow_the_base_fee_within_the_cap() -> None:
    # The chain suggests 3 gwei with a 1 gwei base fee: a 2 gwei tip, room for the base fee to double.
    assert choose_fees(base_fee=GWEI, gas_price=3 * GWEI, max_fee_cap=0) == Fees(max_fee=4 * GWEI, tip=2 * GWEI)
    # A cap cuts the fee cap first, then the tip so that the base fee is always covered.
    assert choose_fees(base_fee=GWEI, gas_price=3 * GWEI, max_fee_cap=2 * GWEI) == Fees(max_fee=2 * GWEI, tip=GWEI)
    refusal = choose_fees(base_fee=5 * GWEI, gas_price=6 * GWEI, max_fee_cap=2 * GWEI)
    assert not isinstance(refusal, Fees) and refusal[:2] == (ErrorCode.UNAVAILABLE, "fee_cap")
    # A chain without a base fee gets a legacy price, capped the same way.
    assert choose_fees(base_fee=None, gas_price=GWEI, max_fee_cap=0) == Fees(gas_price=GWEI)
    assert not isinstance(choose_fees(base_fee=None, gas_price=3 * GWEI, max_fee_cap=GWEI), Fees)


def _lock(d: Deployed, escrow_id: bytes) -> None:
    payer, payee, arbiter = d.accounts[0], d.accounts[1], d.accounts[2]
    d.as_(payer).lock(
        escrow_id,
        payee=payee.address,
        arbiter=arbiter.address,
        amount=1000,
        deadline=d.chain.next_timestamp() + 100,
        window=0,
    )


def test_transactions_are_eip1559_and_a_base_fee_above_the_cap_sends_nothing(embedded: Deployed) -> None:
    d = embedded
    payer = d.accounts[0]
    escrow_id = os.urandom(32)
    client = d.as_(payer)
    w3 = d.chain.w3
    base = int(w3.eth.get_block("latest")["baseFeePerGas"])
    client.max_fee_per_gas = 3 * base
    client.lock(
        escrow_id, payee=d.accounts[1].address, arbiter=d.accounts[2].address, amount=1000,
        deadline=d.chain.next_timestamp() + 100, window=0,
    )  # fmt: skip
    sent = w3.eth.get_transaction(w3.eth.get_block("latest")["transactions"][-1])  # type: ignore[arg-type]
    assert sent["type"] == 2 and sent["maxFeePerGas"] <= 3 * base
    nonce = w3.eth.get_transaction_count(payer.address, "pending")
    client.max_fee_per_gas = int(w3.eth.get_block("latest")["baseFeePerGas"]) - 1
    with pytest.raises(EscrowError) as caught:
        client.release(escrow_id, 10)
    assert (caught.value.code, caught.value.reason, caught.value.retryable) == (ErrorCode.UNAVAILABLE, "fee_cap", True)
    assert w3.eth.get_transaction_count(payer.address, "pending") == nonce  # nothing was sent
    assert d.escrow.get(payer.address, escrow_id).released == 0


def test_a_lock_counts_only_once_it_is_confirmations_deep(embedded: Deployed) -> None:
    d = embedded
    payer = d.accounts[0]
    reader = d.as_(d.accounts[1])
    reader.confirmations = 2
    escrow_id = os.urandom(32)
    _lock(d, escrow_id)  # with 1 confirmation (the default) the lock returns at once
    assert reader.get(payer.address, escrow_id).phase == "active"
    assert reader.get_confirmed(payer.address, escrow_id).phase == "none"  # one block deep only
    d.chain.time_travel(1)  # one more block
    assert reader.get_confirmed(payer.address, escrow_id).amount == 1000
    # The payer's own lock returns only once the chain has one block more above it.
    client = d.as_(payer)
    client.confirmations, client.confirmation_poll_s = 2, 0.05
    later = os.urandom(32)
    miner = threading.Timer(0.3, d.chain.time_travel, args=(1,))
    miner.start()
    head = d.chain.w3.eth.block_number
    client.lock(
        later, payee=d.accounts[1].address, arbiter=d.accounts[2].address, amount=5,
        deadline=d.chain.next_timestamp() + 100, window=0,
    )  # fmt: skip
    miner.join()
    assert d.chain.w3.eth.block_number == head + 2
    assert reader.get_confirmed(payer.address, later).amount == 5
    client.receipt_timeout_s = 0.2  # nobody mines now: the lock lands but is never counted
    with pytest.raises(EscrowError) as caught:
        _lock_as(client, d)
    assert (caught.value.reason, caught.value.code) == ("unconfirmed", ErrorCode.TIMEOUT)


def _lock_as(client: object, d: Deployed) -> None:
    client.lock(  # type: ignore[attr-defined]
        os.urandom(32), payee=d.accounts[1].address, arbiter=d.accounts[2].address, amount=5,
        deadline=d.chain.next_timestamp() + 100, window=0,
    )  # fmt: skip
