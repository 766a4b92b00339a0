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


# -- payment channels: top_up, draw, settle --


def test_a_channel_is_topped_up_drawn_in_full_without_closing_and_settled_by_the_payee(embedded: Deployed) -> None:
    d = embedded
    payer, payee, stranger = d.accounts[0], d.accounts[1], d.accounts[3]
    escrow_id = _lock(d, 1000, deadline_in=100, window=50)
    before = d.escrow.get(payer.address, escrow_id)
    as_payer, as_payee = d.as_(payer), d.as_(payee)
    # Everything locked is drawn: the channel stays open, so the payer can top it up and draw again.
    as_payee.draw(payer.address, escrow_id, 1000, as_payer.sign_voucher(escrow_id, 1000))
    assert d.escrow.get(payer.address, escrow_id).phase == "active"
    as_payer.top_up(escrow_id, amount=500, deadline=before.deadline + 300)
    state = d.escrow.get(payer.address, escrow_id)
    assert (state.amount, state.released, state.deadline) == (1500, 1000, before.deadline + 300)
    assert _reason(lambda: d.as_(stranger).top_up(escrow_id, amount=1, deadline=state.deadline)) == "not_found"
    assert _reason(lambda: as_payer.top_up(escrow_id, amount=0, deadline=state.deadline)) == "bad_amount"
    assert _reason(lambda: as_payer.top_up(escrow_id, amount=1, deadline=state.deadline - 1)) == "bad_deadline"
    # The payer cannot close it alone; the payee settles: its last voucher, and the rest to the payer at once.
    voucher = as_payer.sign_voucher(escrow_id, 1200)
    assert _reason(lambda: as_payer.settle(payer.address, escrow_id, 1200, voucher)) == "forbidden"
    as_payee.settle(payer.address, escrow_id, 1200, voucher)
    assert d.escrow.get(payer.address, escrow_id).phase == "closed"
    assert d.escrow.credit_of(payee.address) == 1200
    assert d.escrow.credit_of(payer.address) == 300
    assert d.escrow.contract_balance() == 1500
    assert _reason(lambda: as_payer.top_up(escrow_id, amount=1, deadline=state.deadline + 1)) == "closed"
    assert _reason(lambda: as_payee.settle(payer.address, escrow_id)) == "closed"


def test_top_up_is_refused_once_disputed_or_past_the_window(embedded: Deployed) -> None:
    d = embedded
    payer, payee = d.accounts[0], d.accounts[1]
    disputed = _lock(d, deadline_in=10, window=20)
    d.as_(payee).dispute(payer.address, disputed)
    deadline = d.escrow.get(payer.address, disputed).deadline
    assert _reason(lambda: d.as_(payer).top_up(disputed, amount=1, deadline=deadline + 10)) == "disputed"
    stale = _lock(d, deadline_in=10, window=20)
    d.chain.time_travel(40)
    late = d.chain.next_timestamp() + 100
    with pytest.raises(EscrowError) as caught:
        d.as_(payer).top_up(stale, amount=1, deadline=late)
    assert (caught.value.reason, caught.value.code) == ("window_closed", ErrorCode.EXPIRED)


def test_settle_with_a_forged_voucher_pays_nothing(embedded: Deployed) -> None:
    d = embedded
    payer, payee = d.accounts[0], d.accounts[1]
    escrow_id = _lock(d, 1000)
    forged = d.as_(payee).sign_voucher(escrow_id, 900)
    assert _reason(lambda: d.as_(payee).settle(payer.address, escrow_id, 900, forged)) == "bad_signature"
    assert d.escrow.get(payer.address, escrow_id).released == 0


# -- arbiter panels --


def _panel_lock(d: Deployed, amount: int = 1000, *, threshold: int = 2) -> tuple[bytes, list[str]]:
    payer, payee = d.accounts[0], d.accounts[1]
    panel = [str(a.address) for a in d.accounts[4:7]]
    escrow_id = _id()
    d.as_(payer).lock_panel(
        escrow_id,
        payee=payee.address,
        panel=panel,
        threshold=threshold,
        amount=amount,
        deadline=d.chain.next_timestamp() + 100,
        window=50,
    )
    return escrow_id, panel


def test_two_of_three_panel_votes_resolve_a_dispute_and_one_does_not(embedded: Deployed) -> None:
    d = embedded
    payer, payee, stranger = d.accounts[0], d.accounts[1], d.accounts[3]
    escrow_id, panel = _panel_lock(d)
    assert d.escrow.panel_of(payer.address, escrow_id) == tuple(panel)
    assert d.escrow.get(payer.address, escrow_id).threshold == 2
    a, b, c = (d.as_(account) for account in d.accounts[4:7])
    early = [a.sign_panel_vote(payer.address, escrow_id, 700), b.sign_panel_vote(payer.address, escrow_id, 700)]
    assert _reason(lambda: d.escrow.resolve_by_panel(payer.address, escrow_id, 700, early)) == "not_disputed"
    d.as_(payee).dispute(payer.address, escrow_id)
    vote_a = a.sign_panel_vote(payer.address, escrow_id, 700)
    vote_c_other = c.sign_panel_vote(payer.address, escrow_id, 100)
    outsider = d.as_(stranger).sign_panel_vote(payer.address, escrow_id, 700)
    resolve = d.as_(stranger).resolve_by_panel
    assert _reason(lambda: resolve(payer.address, escrow_id, 700, [vote_a])) == "too_few_votes"
    assert _reason(lambda: resolve(payer.address, escrow_id, 700, [vote_a, vote_a])) == "duplicate_vote"
    assert _reason(lambda: resolve(payer.address, escrow_id, 700, [vote_a, outsider])) == "bad_signature"
    # A vote for another split does not count towards this one.
    assert _reason(lambda: resolve(payer.address, escrow_id, 700, [vote_a, vote_c_other])) == "bad_signature"
    # No single arbiter can decide a panel escrow.
    assert _reason(lambda: a.resolve(payer.address, escrow_id, 700)) == "forbidden"
    resolve(payer.address, escrow_id, 700, [vote_a, b.sign_panel_vote(payer.address, escrow_id, 700)])
    assert d.escrow.credit_of(payee.address) == 700
    assert d.escrow.credit_of(payer.address) == 300
    assert d.escrow.get(payer.address, escrow_id).phase == "closed"


def test_a_panel_vote_checks_off_chain_as_on_chain_and_is_no_voucher(embedded: Deployed) -> None:
    from runtime.escrow import panel_vote_signer, voucher_signer

    d = embedded
    payer, arbiter = d.accounts[0], d.accounts[4]
    escrow_id, _ = _panel_lock(d)
    vote = d.as_(arbiter).sign_panel_vote(payer.address, escrow_id, 700)
    args = (d.chain.chain_id, d.escrow.address, payer.address, escrow_id)
    assert panel_vote_signer(*args, 700, vote) == arbiter.address
    assert panel_vote_signer(*args, 701, vote) != arbiter.address
    assert voucher_signer(*args, 700, vote) != arbiter.address


def test_a_panel_must_be_distinct_outsiders_with_a_reachable_threshold(embedded: Deployed) -> None:
    d = embedded
    payer, payee = d.accounts[0], d.accounts[1]
    a, b = d.accounts[4].address, d.accounts[5].address

    def lock(panel: list[str], threshold: int) -> object:
        return lambda: d.as_(payer).lock_panel(
            _id(),
            payee=payee.address,
            panel=panel,
            threshold=threshold,
            amount=10,
            deadline=d.chain.next_timestamp() + 100,
            window=0,
        )

    assert _reason(lock([a, b], 3)) == "bad_panel"
    assert _reason(lock([a, a], 1)) == "bad_panel"
    assert _reason(lock([a, payee.address], 1)) == "bad_panel"
    assert _reason(lock([a, payer.address], 1)) == "bad_panel"
    escrow_id, _ = _panel_lock(d, threshold=1)
    assert _reason(lambda: d.escrow.resolve_by_panel(payer.address, _lock(d), 0, [])) == "no_panel"
    assert d.escrow.get(payer.address, escrow_id).arbiter == "0x0000000000000000000000000000000000000000"


# -- ERC-20 escrow --


def test_a_token_escrow_locks_pays_tops_up_and_withdraws_in_the_token(embedded: Deployed) -> None:
    from runtime.escrow.token import TokenClient

    d = embedded
    payer, payee, arbiter, sink = d.accounts[0], d.accounts[1], d.accounts[2], d.accounts[5]
    token = TokenClient.deploy(d.chain, d.accounts[8])
    token.mint(payer.address, 10_000)
    escrow_id = _id()
    deadline = d.chain.next_timestamp() + 100
    as_payer = d.as_(payer)
    coin_before = d.escrow.contract_balance()
    as_payer.lock(
        escrow_id, payee=payee.address, arbiter=arbiter.address, amount=4_000, deadline=deadline, window=10,
        token=token.address,
    )  # fmt: skip
    state = d.escrow.get(payer.address, escrow_id)
    assert (state.token, state.amount, state.native) == (token.address, 4_000, False)
    assert token.balance_of(d.escrow.address) == 4_000 and token.balance_of(payer.address) == 6_000
    as_payer.top_up(escrow_id, amount=1_000, deadline=deadline)
    d.as_(payee).claim(payer.address, escrow_id, 3_000, as_payer.sign_voucher(escrow_id, 3_000))
    # Credited in the token, not in coin.
    assert d.escrow.credit_of(payee.address, token.address) == 3_000
    assert d.escrow.credit_of(payee.address) == 0
    assert _reason(lambda: d.as_(payee).withdraw()) == "nothing_to_withdraw"
    d.as_(payee).withdraw(sink.address, token=token.address)
    assert token.balance_of(sink.address) == 3_000
    d.chain.time_travel(200)
    d.escrow.refund(payer.address, escrow_id)
    as_payer.withdraw(token=token.address)
    assert token.balance_of(payer.address) == 10_000 - 3_000
    assert token.balance_of(d.escrow.address) == 0 and d.escrow.contract_balance() == coin_before


def test_a_fee_on_transfer_token_and_coin_sent_with_a_token_lock_are_refused(embedded: Deployed) -> None:
    from runtime.escrow.token import TokenClient

    d = embedded
    payer, payee, arbiter = d.accounts[0], d.accounts[1], d.accounts[2]
    token = TokenClient.deploy(d.chain, d.accounts[8])
    token.mint(payer.address, 10_000)
    token.set_fee(100)  # 1 % of every transfer burnt: the escrow would hold less than it books
    lock = d.as_(payer).lock
    deadline = d.chain.next_timestamp() + 100
    with pytest.raises(EscrowError) as caught:
        lock(_id(), payee=payee.address, arbiter=arbiter.address, amount=1_000, deadline=deadline, window=0,
             token=token.address)  # fmt: skip
    assert (caught.value.reason, caught.value.code) == ("bad_token", ErrorCode.INVALID_ARGUMENT)
    # A panel lock in a token must not also carry coin.
    token.set_fee(0)
    d.as_(payer).approve(token.address, 1_000)
    call = d.escrow.contract.functions.lock_panel(
        _id(), token.address, 1_000, payee.address, [arbiter.address], 1, deadline, 0
    )
    assert _reason(lambda: d.as_(payer)._transact(call, "lock_panel", 5)) == "bad_amount"
    assert token.balance_of(d.escrow.address) == 0


def test_a_record_price_names_the_token_its_escrow_holds(embedded: Deployed) -> None:
    from dht.records import Pricing
    from runtime.escrow.client import asset_token, record_asset
    from runtime.escrow.token import TokenClient

    token = TokenClient.deploy(embedded.chain, embedded.accounts[8])
    pricing = Pricing(unit="token", price_per_unit=5, asset=record_asset(token.address.lower()))
    assert pricing.asset == f"erc20:{token.address}" and asset_token(pricing.asset) == token.address
    assert Pricing(unit="token", price_per_unit=5).asset == record_asset() == "ETH"
    assert asset_token("ETH") is None
