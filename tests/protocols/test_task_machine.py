"""The task market book: one example per guard and permission, then a random-sequence model check."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import event as hypothesis_event
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from protocols.machines.table import Machine
from protocols.machines.task import (
    AWARD_MACHINE,
    BID_MACHINE,
    DISPUTE_MACHINE,
    MACHINES,
    RECEIPT_MACHINE,
    RESULT_MACHINE,
    SYSTEM,
    TASK_MACHINE,
    Accept,
    AddEvidence,
    Award,
    AwardState,
    BidState,
    Cancel,
    DisputeOpened,
    DisputeState,
    Effect,
    EvidenceAdded,
    Expire,
    Notify,
    OpenDispute,
    PlaceBid,
    Publish,
    ReceiptState,
    Refund,
    RefundCreator,
    Reject,
    RejectDispute,
    ReleaseToBidder,
    ResolveDispute,
    ResultState,
    RevokeAward,
    RiskLimits,
    Settle,
    SubmitResult,
    TaskBook,
    TaskEvent,
    TaskRecord,
    TaskState,
    WithdrawBid,
)
from runtime.errors import ClawnodeError, ErrorCode, clean_reason

T0 = 10_000
ALICE, BOB, WORKER, WORKER2, ARB = "0xalice", "0xbob", "0xworker", "0xworker2", "0xarbiter"
LIMITS = RiskLimits(
    max_task_budget=1_000,
    max_open_tasks_per_account=2,
    max_bids_per_minute=3,
    max_disputes_per_hour=1,
    dispute_window_s=100,
)


def publish(book: TaskBook, task_id: str = "t1", *, creator: str = ALICE, budget: int = 500, now: int = T0) -> None:
    book.apply(
        Publish(
            task_id=task_id,
            budget=budget,
            deadline=now + 1_000,
            allowed_assets=frozenset({"ETH"}),
            arbiter=ARB,
            review_timeout_s=300,
        ),
        creator,
        now,
    )


def awarded(price: int = 400) -> TaskBook:
    """t1 published by ALICE, WORKER's bid b1 awarded, WORKER2's bid b2 rejected."""
    book = TaskBook(LIMITS)
    publish(book)
    book.apply(PlaceBid(task_id="t1", bid_id="b1", price=price, asset="ETH"), WORKER, T0 + 1)
    book.apply(PlaceBid(task_id="t1", bid_id="b2", price=300, asset="ETH"), WORKER2, T0 + 1)
    book.apply(Award(task_id="t1", bid_id="b1", lock_ref="lock-1"), ALICE, T0 + 2)
    return book


def delivered(price: int = 400) -> TaskBook:
    book = awarded(price)
    book.apply(SubmitResult(task_id="t1", content_hash="sha256:ab", size=3), WORKER, T0 + 10)
    return book


def code_of(book: TaskBook, event: TaskEvent, actor: str, now: float) -> ErrorCode:
    with pytest.raises(ClawnodeError) as exc:
        book.apply(event, actor, now)
    return exc.value.code


# -- examples -------------------------------------------------------------------------------
def test_happy_path_accept_then_settle_closes() -> None:
    book = delivered()
    t = book.get("t1")
    assert t.state == TaskState.AWARDED
    assert t.bids["b1"].state == BidState.ACCEPTED and t.bids["b2"].state == BidState.REJECTED
    effects = book.apply(Accept(task_id="t1"), ALICE, T0 + 20)
    assert ReleaseToBidder("t1", WORKER, 400, "lock-1") in effects
    assert t.result is not None and t.result.state == ResultState.ACCEPTED
    assert t.receipt is not None and t.receipt.state == ReceiptState.PENDING
    assert t.state == TaskState.AWARDED  # closes on settlement, not on accept
    book.apply(Settle(task_id="t1", settlement_id="lock-1"), SYSTEM, T0 + 21)
    assert t.receipt.state == ReceiptState.SETTLED and t.state == TaskState.CLOSED
    assert (t.released, t.refunded, t.locked) == (400, 0, 400)


def test_award_effects_notify_everyone() -> None:
    book = TaskBook(LIMITS)
    publish(book)
    book.apply(PlaceBid(task_id="t1", bid_id="b1", price=10, asset="ETH"), WORKER, T0)
    book.apply(PlaceBid(task_id="t1", bid_id="b2", price=10, asset="ETH"), WORKER2, T0)
    effects = book.apply(Award(task_id="t1", bid_id="b2", lock_ref="L"), ALICE, T0)
    assert set(effects) == {Notify("t1", WORKER2, "bid_accepted"), Notify("t1", WORKER, "bid_rejected")}


def test_reject_dispute_resolve_split() -> None:
    book = delivered()
    effects = book.apply(Reject(task_id="t1", reason="wrong output"), ALICE, T0 + 20)
    assert RefundCreator("t1", ALICE, 400, "lock-1", T0 + 20 + 100) in effects
    # refund must wait for the dispute window
    assert code_of(book, Refund(task_id="t1", settlement_id="lock-1"), SYSTEM, T0 + 50) == ErrorCode.CONFLICT
    (opened, *_) = book.apply(OpenDispute(task_id="t1"), WORKER, T0 + 60)
    assert isinstance(opened, DisputeOpened) and not opened.merged
    # a second dispute by the same party merges; by the other party it conflicts
    again = book.apply(OpenDispute(task_id="t1"), WORKER, T0 + 61)
    assert again == [DisputeOpened("t1", opened.dispute_id, WORKER, merged=True)]
    assert code_of(book, OpenDispute(task_id="t1"), ALICE, T0 + 61) == ErrorCode.CONFLICT
    # the old refund decision is gone
    assert code_of(book, Refund(task_id="t1", settlement_id="lock-1"), SYSTEM, T0 + 500) == ErrorCode.CONFLICT
    assert code_of(book, ResolveDispute(task_id="t1", to_bidder=1, to_creator=1), ARB, T0 + 62) == (
        ErrorCode.INVALID_ARGUMENT
    )
    assert code_of(book, ResolveDispute(task_id="t1", to_bidder=300, to_creator=100), ALICE, T0 + 62) == (
        ErrorCode.FORBIDDEN
    )
    effects = book.apply(ResolveDispute(task_id="t1", to_bidder=300, to_creator=100), ARB, T0 + 62)
    assert ReleaseToBidder("t1", WORKER, 300, "lock-1") in effects
    assert RefundCreator("t1", ALICE, 100, "lock-1", T0 + 62) in effects
    t = book.get("t1")
    assert t.dispute is not None and t.dispute.state == DisputeState.RESOLVED
    assert code_of(book, Refund(task_id="t1", settlement_id="lock-1"), SYSTEM, T0 + 63) == ErrorCode.CONFLICT
    book.apply(Settle(task_id="t1", settlement_id="lock-1"), SYSTEM, T0 + 63)
    assert t.state == TaskState.CLOSED and (t.released, t.refunded) == (300, 100)


def test_rejected_dispute_decides_against_the_opener() -> None:
    book = delivered()
    book.apply(Reject(task_id="t1", reason="no"), ALICE, T0 + 20)
    book.apply(OpenDispute(task_id="t1"), WORKER, T0 + 21)
    effects = book.apply(RejectDispute(task_id="t1"), ARB, T0 + 22)
    assert RefundCreator("t1", ALICE, 400, "lock-1", T0 + 22) in effects
    book.apply(Refund(task_id="t1", settlement_id="lock-1"), SYSTEM, T0 + 22)
    t = book.get("t1")
    assert t.receipt is not None and t.receipt.state == ReceiptState.REFUNDED and t.state == TaskState.CLOSED


def test_review_timeout_dispute() -> None:
    book = delivered()
    assert code_of(book, OpenDispute(task_id="t1"), WORKER, T0 + 309) == ErrorCode.CONFLICT
    book.apply(OpenDispute(task_id="t1"), WORKER, T0 + 310)
    t = book.get("t1")
    assert t.receipt is not None and t.receipt.state == ReceiptState.DISPUTED
    assert code_of(book, Accept(task_id="t1"), ALICE, T0 + 311) == ErrorCode.CONFLICT  # under dispute


def test_dispute_permissions_and_preconditions() -> None:
    book = awarded()
    assert code_of(book, OpenDispute(task_id="t1"), WORKER2, T0 + 5) == ErrorCode.FORBIDDEN
    assert code_of(book, OpenDispute(task_id="t1"), ARB, T0 + 5) == ErrorCode.FORBIDDEN
    assert code_of(book, OpenDispute(task_id="t1"), WORKER, T0 + 5) == ErrorCode.CONFLICT  # nothing delivered
    book2 = TaskBook(LIMITS)
    publish(book2)
    assert code_of(book2, OpenDispute(task_id="t1"), ALICE, T0) == ErrorCode.CONFLICT  # no award
    assert code_of(book2, RejectDispute(task_id="t1"), ARB, T0) == ErrorCode.CONFLICT  # no dispute


def test_evidence_joins_an_open_dispute_only() -> None:
    book = delivered()
    assert code_of(book, AddEvidence(task_id="t1", evidence_id="e1", content_hash="h1"), WORKER, T0 + 20) == (
        ErrorCode.CONFLICT  # no dispute yet
    )
    book.apply(Reject(task_id="t1", reason="no"), ALICE, T0 + 20)
    book.apply(OpenDispute(task_id="t1"), WORKER, T0 + 21)
    effects = book.apply(AddEvidence(task_id="t1", evidence_id="e1", content_hash="h1"), WORKER, T0 + 22)
    assert effects == [
        EvidenceAdded("t1", "e1", WORKER, merged=False),
        Notify("t1", ARB, "evidence_added"),
        Notify("t1", ALICE, "evidence_added"),
    ]
    # the same piece again merges; its id with other content, or from the other party, conflicts
    again = book.apply(AddEvidence(task_id="t1", evidence_id="e1", content_hash="h1"), WORKER, T0 + 23)
    assert again == [EvidenceAdded("t1", "e1", WORKER, merged=True)]
    assert code_of(book, AddEvidence(task_id="t1", evidence_id="e1", content_hash="h2"), WORKER, T0 + 23) == (
        ErrorCode.CONFLICT
    )
    assert code_of(book, AddEvidence(task_id="t1", evidence_id="e1", content_hash="h1"), ALICE, T0 + 23) == (
        ErrorCode.CONFLICT
    )
    book.apply(AddEvidence(task_id="t1", evidence_id="e2", content_hash="h2"), ALICE, T0 + 24)
    # strangers and the arbiter bring no evidence; empty ids are refused
    assert code_of(book, AddEvidence(task_id="t1", evidence_id="e3", content_hash="h"), WORKER2, T0) == (
        ErrorCode.FORBIDDEN
    )
    assert code_of(book, AddEvidence(task_id="t1", evidence_id="e3", content_hash="h"), ARB, T0) == ErrorCode.FORBIDDEN
    assert code_of(book, AddEvidence(task_id="t1", evidence_id="", content_hash="h"), ALICE, T0) == (
        ErrorCode.INVALID_ARGUMENT
    )
    t = book.get("t1")
    assert t.dispute is not None and [(e.evidence_id, e.submitted_by) for e in t.dispute.evidence.values()] == [
        ("e1", WORKER),
        ("e2", ALICE),
    ]
    # each party's share is limited
    limit = book.limits.max_evidence_per_party
    for n in range(limit - 1):
        book.apply(AddEvidence(task_id="t1", evidence_id=f"w{n}", content_hash="h"), WORKER, T0 + 30)
    assert code_of(book, AddEvidence(task_id="t1", evidence_id="w-last", content_hash="h"), WORKER, T0 + 31) == (
        ErrorCode.RATE_LIMITED
    )
    # once decided, the dispute takes no more
    book.apply(RejectDispute(task_id="t1"), ARB, T0 + 40)
    assert code_of(book, AddEvidence(task_id="t1", evidence_id="e9", content_hash="h"), ALICE, T0 + 41) == (
        ErrorCode.CONFLICT
    )


def test_dispute_rate_limit_per_account() -> None:
    book = TaskBook(LIMITS)
    for tid in ("t1", "t2"):
        publish(book, tid, creator=ALICE if tid == "t1" else BOB)
        book.apply(PlaceBid(task_id=tid, bid_id="b", price=10, asset="ETH"), WORKER, T0)
        book.apply(Award(task_id=tid, bid_id="b", lock_ref=f"L{tid}"), book.get(tid).creator, T0)
        book.apply(SubmitResult(task_id=tid, content_hash="h", size=1), WORKER, T0)
        book.apply(Reject(task_id=tid, reason="no"), book.get(tid).creator, T0)
    book.apply(OpenDispute(task_id="t1"), WORKER, T0 + 1)
    assert code_of(book, OpenDispute(task_id="t2"), WORKER, T0 + 2) == ErrorCode.RATE_LIMITED
    book.apply(OpenDispute(task_id="t1"), WORKER, T0 + 3)  # merging is not rate limited
    book.apply(OpenDispute(task_id="t2"), WORKER, T0 + 1 + 3_600)


def test_publish_guards() -> None:
    book = TaskBook(LIMITS)
    publish(book, "t1")
    base: dict[str, Any] = {
        "deadline": T0 + 9,
        "allowed_assets": frozenset({"ETH"}),
        "arbiter": ARB,
        "review_timeout_s": 1,
    }
    assert code_of(book, Publish(task_id="t1", budget=1, **base), BOB, T0) == ErrorCode.CONFLICT  # id taken
    cases: list[tuple[dict[str, Any], str, ErrorCode]] = [
        ({"budget": 1_001}, BOB, ErrorCode.INVALID_ARGUMENT),
        ({"budget": 0}, BOB, ErrorCode.INVALID_ARGUMENT),
        ({"budget": 1, "deadline": T0}, BOB, ErrorCode.INVALID_ARGUMENT),
        ({"budget": 1, "allowed_assets": frozenset()}, BOB, ErrorCode.INVALID_ARGUMENT),
        ({"budget": 1, "arbiter": BOB}, BOB, ErrorCode.INVALID_ARGUMENT),
        ({"budget": 1}, SYSTEM, ErrorCode.FORBIDDEN),
    ]
    for override, actor, code in cases:
        event = Publish(task_id="tx", **{**base, **override})
        assert code_of(book, event, actor, T0) == code, override
    publish(book, "t2")
    assert code_of(book, Publish(task_id="t3", budget=1, **base), ALICE, T0) == ErrorCode.RATE_LIMITED
    book.apply(Cancel(task_id="t2"), ALICE, T0)
    publish(book, "t3")  # a cancelled task no longer counts


def test_a_task_holds_a_few_bids_per_account_and_a_bounded_number_in_all() -> None:
    book = TaskBook(LIMITS.model_copy(update={"max_bids_per_bidder": 2, "max_bids_per_task": 3}))
    publish(book)

    def place(bid_id: str, actor: str, now: int = T0) -> None:
        book.apply(PlaceBid(task_id="t1", bid_id=bid_id, price=10, asset="ETH"), actor, now)

    place("w1", WORKER)
    place("w2", WORKER)
    book.apply(WithdrawBid(task_id="t1", bid_id="w1"), WORKER, T0)  # a withdrawn bid still counts
    with pytest.raises(ClawnodeError) as own:
        place("w3", WORKER, T0 + 120)
    assert (own.value.code, own.value.reason) == (ErrorCode.RATE_LIMITED, "too_many_bids_on_task")
    place("v1", WORKER2)
    with pytest.raises(ClawnodeError) as full:
        place("b1", BOB)
    assert (full.value.code, full.value.reason) == (ErrorCode.RATE_LIMITED, "task_bids_full")
    assert len(book.get("t1").bids) == 3


def test_bid_guards() -> None:
    book = TaskBook(LIMITS)
    publish(book)

    def bid(bid_id: str, price: int = 10, asset: str = "ETH", actor: str = WORKER, now: int = T0) -> ErrorCode:
        return code_of(book, PlaceBid(task_id="t1", bid_id=bid_id, price=price, asset=asset), actor, now)

    assert code_of(book, PlaceBid(task_id="nope", bid_id="b", price=1, asset="ETH"), WORKER, T0) == ErrorCode.NOT_FOUND
    assert bid("b", actor=ALICE) == ErrorCode.FORBIDDEN  # the creator
    assert bid("b", actor=ARB) == ErrorCode.FORBIDDEN
    assert bid("b", actor=SYSTEM) == ErrorCode.FORBIDDEN
    assert bid("b", asset="DOGE") == ErrorCode.FORBIDDEN
    assert bid("b", price=501) == ErrorCode.CONFLICT
    assert bid("b", price=0) == ErrorCode.INVALID_ARGUMENT
    assert bid("b", now=T0 + 1_000) == ErrorCode.EXPIRED
    book.apply(PlaceBid(task_id="t1", bid_id="b1", price=10, asset="ETH"), WORKER, T0)
    assert bid("b1", actor=WORKER2) == ErrorCode.CONFLICT  # id taken
    book.apply(PlaceBid(task_id="t1", bid_id="b2", price=10, asset="ETH"), WORKER, T0 + 1)
    book.apply(PlaceBid(task_id="t1", bid_id="b3", price=10, asset="ETH"), WORKER, T0 + 2)
    assert bid("b4", now=T0 + 3) == ErrorCode.RATE_LIMITED
    book.apply(PlaceBid(task_id="t1", bid_id="b4", price=10, asset="ETH"), WORKER, T0 + 60)
    assert code_of(book, WithdrawBid(task_id="t1", bid_id="zz"), WORKER, T0) == ErrorCode.NOT_FOUND
    assert code_of(book, WithdrawBid(task_id="t1", bid_id="b1"), WORKER2, T0) == ErrorCode.FORBIDDEN
    book.apply(WithdrawBid(task_id="t1", bid_id="b1"), WORKER, T0)
    assert code_of(book, WithdrawBid(task_id="t1", bid_id="b1"), WORKER, T0) == ErrorCode.CONFLICT
    assert code_of(book, Award(task_id="t1", bid_id="b1", lock_ref="L"), ALICE, T0) == ErrorCode.CONFLICT


def test_award_guards() -> None:
    book = TaskBook(LIMITS)
    publish(book)
    book.apply(PlaceBid(task_id="t1", bid_id="b1", price=10, asset="ETH"), WORKER, T0)
    assert code_of(book, Award(task_id="t1", bid_id="b9", lock_ref="L"), ALICE, T0) == ErrorCode.NOT_FOUND
    assert code_of(book, Award(task_id="t1", bid_id="b1", lock_ref="L"), WORKER, T0) == ErrorCode.FORBIDDEN
    with pytest.raises(ClawnodeError) as exc:
        book.apply(Award(task_id="t1", bid_id="b1", lock_ref=None), ALICE, T0)
    assert exc.value.code == ErrorCode.CONFLICT and exc.value.message == "the budget is not locked"
    assert code_of(book, Award(task_id="t1", bid_id="b1", lock_ref="L"), ALICE, T0 + 1_000) == ErrorCode.EXPIRED
    book.apply(Award(task_id="t1", bid_id="b1", lock_ref="L"), ALICE, T0)
    assert code_of(book, Award(task_id="t1", bid_id="b1", lock_ref="L"), ALICE, T0) == ErrorCode.CONFLICT
    assert code_of(book, Cancel(task_id="t1"), ALICE, T0) == ErrorCode.CONFLICT
    assert code_of(book, PlaceBid(task_id="t1", bid_id="b2", price=1, asset="ETH"), WORKER2, T0) == ErrorCode.CONFLICT


def test_result_and_review_guards() -> None:
    book = awarded()
    assert code_of(book, SubmitResult(task_id="t1", content_hash="h", size=1), WORKER2, T0) == ErrorCode.FORBIDDEN
    assert code_of(book, SubmitResult(task_id="t1", content_hash="", size=1), WORKER, T0) == (
        ErrorCode.INVALID_ARGUMENT
    )
    assert code_of(book, Accept(task_id="t1"), ALICE, T0) == ErrorCode.CONFLICT  # nothing delivered
    book.apply(SubmitResult(task_id="t1", content_hash="h", size=1), WORKER, T0 + 3)
    assert code_of(book, SubmitResult(task_id="t1", content_hash="h", size=1), WORKER, T0) == ErrorCode.CONFLICT
    assert code_of(book, Accept(task_id="t1"), WORKER, T0) == ErrorCode.FORBIDDEN
    assert code_of(book, Reject(task_id="t1", reason=" "), ALICE, T0) == ErrorCode.INVALID_ARGUMENT
    assert code_of(book, RevokeAward(task_id="t1"), ALICE, T0 + 5_000) == ErrorCode.CONFLICT  # delivered
    book.apply(Accept(task_id="t1"), ALICE, T0 + 4)
    assert code_of(book, Reject(task_id="t1", reason="x"), ALICE, T0) == ErrorCode.CONFLICT


def test_revoke_award_and_refund() -> None:
    book = awarded()
    assert code_of(book, RevokeAward(task_id="t1"), WORKER, T0 + 2_000) == ErrorCode.FORBIDDEN
    assert code_of(book, RevokeAward(task_id="t1"), ALICE, T0 + 999) == ErrorCode.CONFLICT  # before the deadline
    effects = book.apply(RevokeAward(task_id="t1"), ALICE, T0 + 1_000)
    assert RefundCreator("t1", ALICE, 400, "lock-1", T0 + 1_000) in effects
    t = book.get("t1")
    assert t.award is not None and t.award.state == AwardState.REVOKED
    assert code_of(book, SubmitResult(task_id="t1", content_hash="h", size=1), WORKER, T0) == ErrorCode.CONFLICT
    assert code_of(book, Settle(task_id="t1", settlement_id="lock-1"), SYSTEM, T0 + 1_001) == ErrorCode.CONFLICT
    assert code_of(book, Refund(task_id="t1", settlement_id="lock-2"), SYSTEM, T0 + 1_001) == ErrorCode.CONFLICT
    assert code_of(book, Refund(task_id="t1", settlement_id=""), SYSTEM, T0 + 1_001) == ErrorCode.INVALID_ARGUMENT
    assert code_of(book, Refund(task_id="t1", settlement_id="lock-1"), ALICE, T0 + 1_001) == ErrorCode.FORBIDDEN
    book.apply(Refund(task_id="t1", settlement_id="lock-1"), SYSTEM, T0 + 1_001)
    assert t.state == TaskState.CLOSED and t.refunded == 400
    assert code_of(book, Refund(task_id="t1", settlement_id="lock-1"), SYSTEM, T0 + 1_002) == ErrorCode.CONFLICT


def test_settle_needs_a_decision() -> None:
    book = delivered()
    assert code_of(book, Settle(task_id="t1", settlement_id="lock-1"), SYSTEM, T0 + 11) == ErrorCode.CONFLICT


def test_cancel_and_expire() -> None:
    book = TaskBook(LIMITS)
    publish(book)
    book.apply(PlaceBid(task_id="t1", bid_id="b1", price=10, asset="ETH"), WORKER, T0)
    assert code_of(book, Cancel(task_id="t1"), WORKER, T0) == ErrorCode.FORBIDDEN
    assert code_of(book, Expire(task_id="t1"), ALICE, T0 + 2_000) == ErrorCode.FORBIDDEN
    assert code_of(book, Expire(task_id="t1"), SYSTEM, T0 + 999) == ErrorCode.CONFLICT
    effects = book.apply(Expire(task_id="t1"), SYSTEM, T0 + 1_000)
    assert Notify("t1", WORKER, "task_expired") in effects
    t = book.get("t1")
    assert t.state == TaskState.EXPIRED and t.bids["b1"].state == BidState.REJECTED
    assert code_of(book, Cancel(task_id="t1"), ALICE, T0) == ErrorCode.CONFLICT
    book2 = awarded()
    assert code_of(book2, Expire(task_id="t1"), SYSTEM, T0 + 5_000) == ErrorCode.CONFLICT  # active award
    assert code_of(book2, Accept(task_id="unknown"), ALICE, T0) == ErrorCode.NOT_FOUND


def test_events_are_frozen() -> None:
    event = Cancel(task_id="t1")
    with pytest.raises(ValueError):
        event.task_id = "t2"  # type: ignore[misc]


# -- random sequences -----------------------------------------------------------------------
ACCOUNTS = [ALICE, BOB, WORKER, WORKER2, ARB, SYSTEM]
TASK_IDS = ["t1", "t2", "t3"]
BY_NAME: dict[str, Machine[Any, Any]] = {m.name: m for m in MACHINES}

# What each event asks of which machine, read from the brief, not from the book's code:
# (machine, table event, the entity's state or None when it does not exist).
StateOf = Callable[[TaskRecord, Any], Any]
PRIMARY: dict[type, tuple[Machine[Any, Any], str, StateOf]] = {
    PlaceBid: (TASK_MACHINE, "place_bid", lambda t, e: t.state),
    WithdrawBid: (BID_MACHINE, "withdraw", lambda t, e: t.bids[e.bid_id].state),
    Award: (TASK_MACHINE, "award", lambda t, e: t.state),
    RevokeAward: (AWARD_MACHINE, "revoke", lambda t, e: t.award and t.award.state),
    SubmitResult: (AWARD_MACHINE, "deliver", lambda t, e: t.award and t.award.state),
    Accept: (RESULT_MACHINE, "accept", lambda t, e: t.result and t.result.state),
    Reject: (RESULT_MACHINE, "reject", lambda t, e: t.result and t.result.state),
    Cancel: (TASK_MACHINE, "cancel", lambda t, e: t.state),
    Expire: (TASK_MACHINE, "expire", lambda t, e: t.state),
    OpenDispute: (RECEIPT_MACHINE, "dispute", lambda t, e: t.receipt and t.receipt.state),
    ResolveDispute: (DISPUTE_MACHINE, "resolve", lambda t, e: t.dispute and t.dispute.state),
    RejectDispute: (DISPUTE_MACHINE, "reject", lambda t, e: t.dispute and t.dispute.state),
    AddEvidence: (DISPUTE_MACHINE, "add_evidence", lambda t, e: t.dispute and t.dispute.state),
    Settle: (RECEIPT_MACHINE, "settle", lambda t, e: t.receipt and t.receipt.state),
    Refund: (RECEIPT_MACHINE, "refund", lambda t, e: t.receipt and t.receipt.state),
}
# Codes the data guards (after permission and table) may answer with.
GUARD_CODES: dict[type, set[ErrorCode]] = {
    Publish: {ErrorCode.INVALID_ARGUMENT, ErrorCode.RATE_LIMITED},
    PlaceBid: {
        ErrorCode.INVALID_ARGUMENT,
        ErrorCode.FORBIDDEN,
        ErrorCode.CONFLICT,
        ErrorCode.EXPIRED,
        ErrorCode.RATE_LIMITED,
    },
    WithdrawBid: set(),
    Award: {ErrorCode.CONFLICT, ErrorCode.EXPIRED},
    RevokeAward: {ErrorCode.CONFLICT},
    SubmitResult: {ErrorCode.INVALID_ARGUMENT, ErrorCode.CONFLICT},
    Accept: {ErrorCode.CONFLICT},
    Reject: {ErrorCode.CONFLICT, ErrorCode.INVALID_ARGUMENT},
    Cancel: set(),
    Expire: {ErrorCode.CONFLICT},
    OpenDispute: {ErrorCode.CONFLICT, ErrorCode.RATE_LIMITED},
    ResolveDispute: {ErrorCode.INVALID_ARGUMENT},
    RejectDispute: set(),
    AddEvidence: {ErrorCode.INVALID_ARGUMENT, ErrorCode.CONFLICT, ErrorCode.RATE_LIMITED},
    Settle: {ErrorCode.INVALID_ARGUMENT, ErrorCode.CONFLICT},
    Refund: {ErrorCode.INVALID_ARGUMENT, ErrorCode.CONFLICT},
}


def expected_roles(t: TaskRecord, actor: str, event: Any) -> set[str]:
    if actor == SYSTEM:
        return {"system"}
    roles = {r for r, who in (("creator", t.creator), ("arbiter", t.arbiter)) if who == actor} or {"participant"}
    if t.award is not None and t.award.bidder == actor:
        roles.add("awarded_bidder")
    if isinstance(event, WithdrawBid) and t.bids[event.bid_id].bidder == actor:
        roles.add("bidder")
    return roles


def expected_gate(book: TaskBook, event: Any, actor: str) -> ErrorCode | str | None:
    """NOT_FOUND / FORBIDDEN / CONFLICT from ids, roles and tables; None when guards decide; "merge"."""
    if isinstance(event, Publish):
        if actor == SYSTEM:
            return ErrorCode.FORBIDDEN
        return ErrorCode.CONFLICT if event.task_id in book.tasks else None
    t = book.tasks.get(event.task_id)
    if t is None or (isinstance(event, WithdrawBid | Award) and event.bid_id not in t.bids):
        return ErrorCode.NOT_FOUND
    machine, table_event, state_of = PRIMARY[type(event)]
    roles = expected_roles(t, actor, event)
    allowed = {a for r in machine.transitions if r.event == table_event for a in r.actors}
    if not roles & allowed:
        return ErrorCode.FORBIDDEN
    if isinstance(event, OpenDispute) and t.dispute is not None and t.dispute.opened_by == actor:
        return "merge"
    state = state_of(t, event)
    row = next((r for r in machine.transitions if r.source == state and r.event == table_event), None)
    if row is None:
        return ErrorCode.CONFLICT
    if not roles & row.actors:
        return ErrorCode.FORBIDDEN
    if isinstance(event, AddEvidence) and t.dispute is not None:
        known = t.dispute.evidence.get(event.evidence_id)
        if known is not None and (known.submitted_by, known.content_hash) == (actor, event.content_hash):
            return "merge"
    return None


class MarketModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.book = TaskBook(
            RiskLimits(
                max_task_budget=100,
                max_open_tasks_per_account=2,
                max_bids_per_minute=3,
                max_disputes_per_hour=2,
                dispute_window_s=30,
            )
        )
        self.now = T0
        self.seen = 0
        self.ok = 0

    def run(self, event: TaskEvent, actor: str) -> list[Effect] | None:
        gate = expected_gate(self.book, event, actor)
        before = len(self.book.history)
        try:  # a dry run answers what apply will, changing nothing
            dry: list[Effect] | ErrorCode = self.book.dry_run(event, actor, self.now)
        except ClawnodeError as exc:
            dry = exc.code
        assert len(self.book.history) == before
        try:
            effects = self.book.apply(event, actor, self.now)
        except ClawnodeError as exc:
            assert len(self.book.history) == before, "a refusal must change nothing"
            assert dry == exc.code, (type(event).__name__, dry, exc.code)
            if gate is None:
                assert exc.code in GUARD_CODES[type(event)], (type(event).__name__, exc.code, exc.message)
            else:
                assert exc.code == gate, (type(event).__name__, actor, exc.code, gate, exc.message)
            assert "/" not in exc.message  # no paths (nor anything path-like) in user-facing messages
            assert exc.reason is not None and clean_reason(exc.reason) == exc.reason, exc.message
            reason = f"{type(event).__name__}: {exc.code} {exc.reason}"
            BOOK_REFUSALS[reason] += 1
            hypothesis_event(f"refused {reason}")
            return None
        assert gate in (None, "merge"), (type(event).__name__, actor, gate)
        assert dry == effects, (type(event).__name__, dry, effects)
        if gate == "merge":
            assert len(effects) == 1 and isinstance(effects[0], DisputeOpened | EvidenceAdded) and effects[0].merged
        self.ok += 1
        return effects

    def pick(self, data: st.DataObject, preferred: str | None) -> str:
        """Mostly the right actor (so runs get deep), sometimes anyone (so refusals are exercised)."""
        choices = ACCOUNTS if preferred is None else [*[preferred] * 6, *ACCOUNTS]
        return data.draw(st.sampled_from(choices))

    def task(self, data: st.DataObject) -> tuple[str, TaskRecord | None]:
        """Mostly a task that exists (the newest ones first), sometimes an unknown id."""
        known = sorted(self.book.tasks, reverse=True)
        tid = data.draw(st.sampled_from([*known, *known, *known, "t-unknown"]))
        return tid, self.book.tasks.get(tid)

    def bid_id(self, data: st.DataObject, t: TaskRecord | None, fresh: bool) -> str:
        known = sorted(t.bids, reverse=True) if t is not None else []
        new = f"b{len(known) + 1}"
        return data.draw(st.sampled_from([new, new, *known, "b-unknown"] if fresh else [*known, *known, "b-unknown"]))

    @initialize()
    def first_task(self) -> None:
        self.run(self.publish_event("t1", 100, 600), ALICE)

    def publish_event(self, tid: str, budget: int, life: int) -> Publish:
        return Publish(
            task_id=tid,
            budget=budget,
            deadline=self.now + life,
            allowed_assets=frozenset({"ETH"}),
            arbiter=ARB,
            review_timeout_s=60,
        )

    @rule(data=st.data())
    def drive(self, data: st.DataObject) -> None:
        """The cooperative next step for a task, so runs reach awards, disputes and settlements."""
        tid, t = self.task(data)
        if t is None:
            return
        receipt, choice = t.receipt, data.draw(st.integers(0, 3))
        event: TaskEvent
        actor = t.creator
        if t.state == TaskState.OPEN:
            submitted = [b for b in t.bids.values() if b.state == BidState.SUBMITTED]
            if submitted and choice:
                event = Award(task_id=tid, bid_id=submitted[choice % len(submitted)].bid_id, lock_ref=f"lock-{tid}")
            else:
                actor = [WORKER, WORKER2][choice % 2]
                event = PlaceBid(task_id=tid, bid_id=f"b{len(t.bids) + 1}", price=10 * (choice + 1), asset="ETH")
        elif t.award is None or receipt is None or t.state != TaskState.AWARDED:
            return
        elif t.result is None and t.award.state == AwardState.ACTIVE and choice == 0 and self.now >= t.deadline:
            event = RevokeAward(task_id=tid)
        elif t.result is None and t.award.state == AwardState.ACTIVE:
            event, actor = SubmitResult(task_id=tid, content_hash="sha256:00", size=1), t.award.bidder
        elif t.result is not None and t.result.state == ResultState.SUBMITTED and receipt.state == ReceiptState.PENDING:
            event = Accept(task_id=tid) if choice % 2 else Reject(task_id=tid, reason="bad")
        elif t.dispute is not None and t.dispute.state == DisputeState.OPEN and data.draw(st.booleans()):
            piece = f"e{len(t.dispute.evidence) + choice % 2}"
            event = AddEvidence(task_id=tid, evidence_id=piece, content_hash="sha256:01")
            actor = [t.creator, t.award.bidder][choice % 2]
        elif t.dispute is not None and t.dispute.state == DisputeState.OPEN:
            price = t.award.price
            to_bidder = price * choice // 3
            event = ResolveDispute(task_id=tid, to_bidder=to_bidder, to_creator=price - to_bidder)
            event, actor = (RejectDispute(task_id=tid) if choice == 3 else event), ARB
        elif receipt.to_bidder is None:
            return
        elif receipt.state == ReceiptState.PENDING and choice == 0:
            event, actor = OpenDispute(task_id=tid), t.award.bidder
        else:
            kind = Settle if receipt.to_bidder else Refund
            event, actor = kind(task_id=tid, settlement_id=f"lock-{tid}"), SYSTEM
        self.run(event, actor)

    @rule(data=st.data())
    def drive_more(self, data: st.DataObject) -> None:
        """Cooperative steps weigh more than any single hostile rule."""
        for _ in range(data.draw(st.integers(1, 4))):
            self.drive(data)

    @rule(dt=st.sampled_from([0, 1, 5, 30, 61, 200, 400, 700]))
    def advance(self, dt: int) -> None:
        self.now += dt

    @rule(data=st.data(), budget=st.sampled_from([100, 50, 101]), life=st.sampled_from([600, 300, 0]))
    def publish(self, data: st.DataObject, budget: int, life: int) -> None:
        fresh = f"task{len(self.book.tasks)}"
        tid = data.draw(st.sampled_from([fresh, fresh, *TASK_IDS]))
        actor = data.draw(st.sampled_from([ALICE, BOB, *ACCOUNTS]))
        self.run(self.publish_event(tid, budget, life), actor)

    @rule(data=st.data(), price=st.sampled_from([10, 50, 200]), asset=st.sampled_from(["ETH", "ETH", "BTC"]))
    def place_bid(self, data: st.DataObject, price: int, asset: str) -> None:
        tid, t = self.task(data)
        bid_id = self.bid_id(data, t, fresh=True)
        self.run(
            PlaceBid(task_id=tid, bid_id=bid_id, price=price, asset=asset),
            self.pick(data, data.draw(st.sampled_from([WORKER, WORKER2]))),
        )

    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        tid, t = self.task(data)
        bid_id = self.bid_id(data, t, fresh=False)
        owner = t.bids[bid_id].bidder if t is not None and bid_id in t.bids else None
        self.run(WithdrawBid(task_id=tid, bid_id=bid_id), self.pick(data, owner))

    @rule(data=st.data(), locked=st.sampled_from([True, True, True, False]))
    def award(self, data: st.DataObject, locked: bool) -> None:
        tid, t = self.task(data)
        bid_id = self.bid_id(data, t, fresh=False)
        event = Award(task_id=tid, bid_id=bid_id, lock_ref=f"lock-{tid}" if locked else None)
        if self.run(event, self.pick(data, t.creator if t else None)) is not None:
            assert t is not None and t.award is not None and t.receipt is not None
            assert t.receipt.settlement_id == f"lock-{tid}" and t.award.price == t.bids[bid_id].price

    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        tid, t = self.task(data)
        self.run(RevokeAward(task_id=tid), self.pick(data, t.creator if t else None))

    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        tid, t = self.task(data)
        bidder = t.award.bidder if t and t.award else None
        self.run(SubmitResult(task_id=tid, content_hash="sha256:00", size=1), self.pick(data, bidder))

    @rule(data=st.data(), accept=st.booleans())
    def review(self, data: st.DataObject, accept: bool) -> None:
        tid, t = self.task(data)
        event: TaskEvent = Accept(task_id=tid) if accept else Reject(task_id=tid, reason="bad")
        self.run(event, self.pick(data, t.creator if t else None))

    @rule(data=st.data(), cancel=st.booleans())
    def cancel_or_expire(self, data: st.DataObject, cancel: bool) -> None:
        tid, t = self.task(data)
        event: TaskEvent = Cancel(task_id=tid) if cancel else Expire(task_id=tid)
        self.run(event, self.pick(data, (t.creator if t else None) if cancel else SYSTEM))

    @rule(data=st.data())
    def dispute(self, data: st.DataObject) -> None:
        tid, t = self.task(data)
        party = data.draw(st.sampled_from([t.creator, t.award.bidder])) if t and t.award else None
        effects = self.run(OpenDispute(task_id=tid), self.pick(data, party))
        if effects:
            assert isinstance(effects[0], DisputeOpened)
            assert t is not None and t.dispute is not None and effects[0].dispute_id == t.dispute.dispute_id

    @rule(data=st.data(), piece=st.sampled_from(["e1", "e1", "e2", ""]), content=st.sampled_from(["h1", "h1", "h2"]))
    def add_evidence(self, data: st.DataObject, piece: str, content: str) -> None:
        tid, t = self.task(data)
        party = data.draw(st.sampled_from([t.creator, t.award.bidder])) if t and t.award else None
        effects = self.run(AddEvidence(task_id=tid, evidence_id=piece, content_hash=content), self.pick(data, party))
        if effects:
            assert t is not None and t.dispute is not None and piece in t.dispute.evidence
            assert t.dispute.state == DisputeState.OPEN

    @rule(data=st.data(), share=st.sampled_from([0, 1, 2, 3, 4]), off=st.sampled_from([0, 0, 0, 1]))
    def decide(self, data: st.DataObject, share: int, off: int) -> None:
        tid, t = self.task(data)
        event: TaskEvent
        if share == 4:
            event = RejectDispute(task_id=tid)
        else:
            price = t.award.price if t and t.award else 10
            to_bidder = price * share // 3
            event = ResolveDispute(task_id=tid, to_bidder=to_bidder, to_creator=price - to_bidder + off)
        self.run(event, self.pick(data, ARB))

    @rule(data=st.data(), settle=st.booleans(), sid=st.sampled_from(["right", "right", "wrong", ""]))
    def finalize(self, data: st.DataObject, settle: bool, sid: str) -> None:
        tid, _ = self.task(data)
        settlement_id = f"lock-{tid}" if sid == "right" else sid
        event: TaskEvent = (
            Settle(task_id=tid, settlement_id=settlement_id)
            if settle
            else Refund(task_id=tid, settlement_id=settlement_id)
        )
        self.run(event, self.pick(data, SYSTEM))

    @invariant()
    def history_follows_the_tables(self) -> None:
        for name, _entity, prev, event, new in self.book.history[self.seen :]:
            machine = BY_NAME[name]
            row = machine.lookup(prev, event)
            assert row is not None and row.target == new, (name, prev, event, new)
            assert not machine.is_terminal(prev)
        self.seen = len(self.book.history)

    @invariant()
    def money_and_awards(self) -> None:
        for t in self.book.tasks.values():
            accepted = [b for b in t.bids.values() if b.state == BidState.ACCEPTED]
            assert len(accepted) == (0 if t.award is None else 1)
            assert (t.award is None) == (t.state in (TaskState.OPEN, TaskState.CANCELLED, TaskState.EXPIRED))
            assert t.released + t.refunded <= t.locked
            assert t.locked <= t.budget
            r = t.receipt
            assert (r is None) == (t.award is None)
            if r is not None:
                assert t.award is not None and r.amount == t.award.price
                if r.to_bidder is not None and r.to_creator is not None:
                    assert r.to_bidder + r.to_creator == r.amount
                final = r.state in (ReceiptState.SETTLED, ReceiptState.REFUNDED)
                assert final == (t.state == TaskState.CLOSED)
                assert (t.released + t.refunded == t.locked) if final else (t.released == t.refunded == 0)
                if r.state == ReceiptState.DISPUTED or t.dispute is not None:
                    assert t.dispute is not None
            if t.result is not None:
                assert t.award is not None
            if t.state == TaskState.OPEN:
                assert all(b.state in (BidState.SUBMITTED, BidState.WITHDRAWN) for b in t.bids.values())

    @invariant()
    def risk_limits(self) -> None:
        limits = self.book.limits
        for account in ACCOUNTS:
            assert self.book.open_tasks_of(account) <= limits.max_open_tasks_per_account
        assert all(t.budget <= limits.max_task_budget for t in self.book.tasks.values())


# Refusals the model saw, by event, code and stable reason, over every run of the model.
BOOK_REFUSALS: Counter[str] = Counter()


def test_the_book_model_refuses_random_events_by_reason() -> None:
    """Random event sequences against the book; the refusals it saw are printed by reason, and every
    kind of guard (bid, award, result, review, dispute, evidence, settle/refund) refused at least once."""
    BOOK_REFUSALS.clear()
    run_state_machine_as_test(MarketModel, settings=settings(max_examples=120, stateful_step_count=60, deadline=None))
    print(f"\nbook refusals: {sum(BOOK_REFUSALS.values())} in {len(BOOK_REFUSALS)} reasons")
    for reason, count in BOOK_REFUSALS.most_common():
        print(f"  {count:6d}  {reason}")
    kinds = {reason.split(":")[0] for reason in BOOK_REFUSALS}
    guarded = {"PlaceBid", "Award", "SubmitResult", "Accept", "Reject", "OpenDispute", "AddEvidence", "Settle"}
    assert guarded <= kinds, guarded - kinds
