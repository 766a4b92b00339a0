"""The task market's vocabulary: roles, states, the six machine tables, events, effects and records.

:mod:`protocols.machines.task` (the pure :class:`~protocols.machines.task.TaskBook`) applies them;
its docstring states the rules. Everything here is data: nothing in this module decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from protocols.machines.table import Machine, Transition
from runtime.ledger.vocabulary import BIDDER, CREATOR, TASK_MOVES, TaskState  # shared with the ledger

__all__ = [
    "ARBITER",
    "AS",
    "AWARDED_BIDDER",
    "AWARD_MACHINE",
    "BIDDER",
    "BID_MACHINE",
    "BS",
    "CREATOR",
    "CS",
    "DISPUTE_MACHINE",
    "DS",
    "MACHINES",
    "PARTICIPANT",
    "RECEIPT_MACHINE",
    "RESULT_MACHINE",
    "RS",
    "SYSTEM",
    "TASK_FINISHED_KEEP",
    "TASK_FINISHED_KEEP_S",
    "TASK_HISTORY",
    "TASK_MACHINE",
    "TASK_ROLES",
    "TASK_TOMBSTONES_MAX",
    "TS",
    "Accept",
    "AddEvidence",
    "Award",
    "AwardRecord",
    "AwardState",
    "BidRecord",
    "BidState",
    "Cancel",
    "DisputeOpened",
    "DisputeRecord",
    "DisputeState",
    "Effect",
    "Ev",
    "EvidenceAdded",
    "EvidenceRecord",
    "Expire",
    "Notify",
    "NotifyTopic",
    "OpenDispute",
    "PlaceBid",
    "Publish",
    "ReceiptRecord",
    "ReceiptState",
    "Refund",
    "RefundCreator",
    "Reject",
    "RejectDispute",
    "ReleaseToBidder",
    "ResolveDispute",
    "ResultRecord",
    "ResultState",
    "RevokeAward",
    "RiskLimits",
    "Settle",
    "SubmitResult",
    "TaskEvent",
    "TaskRecord",
    "TaskState",
    "WithdrawBid",
    "roles_of",
]

SYSTEM = "system"
PARTICIPANT = "participant"
AWARDED_BIDDER = "awarded_bidder"
ARBITER = "arbiter"
TASK_ROLES = frozenset({CREATOR, PARTICIPANT, BIDDER, AWARDED_BIDDER, ARBITER, SYSTEM})
# The book's transition log keeps its newest entries only.
TASK_HISTORY = 4096
# Finished tasks (closed, cancelled, expired; their close-out done) stay in the book at most this long
# and at most this many (``TaskBook.forget_finished``); our own are in the ledger.
TASK_FINISHED_KEEP = 256
TASK_FINISHED_KEEP_S = 600.0
# A forgotten task's id stays taken until its deadline (a replayed announcement cannot bring it back
# while it could still be published); at most this many such ids, the oldest dropped first.
TASK_TOMBSTONES_MAX = 65536


class BidState(StrEnum):
    SUBMITTED = "bid_submitted"
    WITHDRAWN = "bid_withdrawn"
    ACCEPTED = "bid_accepted"
    REJECTED = "bid_rejected"


class AwardState(StrEnum):
    ACTIVE = "award_active"
    REVOKED = "award_revoked"


class ResultState(StrEnum):
    SUBMITTED = "result_submitted"
    ACCEPTED = "result_accepted"
    REJECTED = "result_rejected"


class ReceiptState(StrEnum):
    PENDING = "receipt_pending"
    SETTLED = "receipt_settled"
    REFUNDED = "receipt_refunded"
    DISPUTED = "receipt_disputed"


class DisputeState(StrEnum):
    OPEN = "dispute_open"
    RESOLVED = "dispute_resolved"
    REJECTED = "dispute_rejected"


class Ev(StrEnum):
    """Table events, shared vocabulary across the six machines."""

    PLACE_BID = "place_bid"
    AWARD = "award"
    CLOSE = "close"
    CANCEL = "cancel"
    EXPIRE = "expire"
    WITHDRAW = "withdraw"
    ACCEPT = "accept"
    REJECT = "reject"
    DELIVER = "deliver"
    REVOKE = "revoke"
    SETTLE = "settle"
    REFUND = "refund"
    DISPUTE = "dispute"
    RESOLVE = "resolve"
    ADD_EVIDENCE = "add_evidence"


St = TypeVar("St", bound=str)


def _t(source: St, event: Ev, target: St, *actors: str) -> Transition[St, Ev]:
    return Transition(source, event, target, frozenset(actors))


TS, BS, AS, RS, CS, DS = TaskState, BidState, AwardState, ResultState, ReceiptState, DisputeState

TASK_MACHINE: Machine[TaskState, Ev] = Machine(
    "task",
    [
        _t(TS.OPEN, Ev.PLACE_BID, TS.OPEN, PARTICIPANT),
        _t(TS.OPEN, Ev.AWARD, TS.AWARDED, CREATOR),
        _t(TS.OPEN, Ev.CANCEL, TS.CANCELLED, CREATOR),
        _t(TS.OPEN, Ev.EXPIRE, TS.EXPIRED, SYSTEM),
        _t(TS.AWARDED, Ev.CLOSE, TS.CLOSED, SYSTEM),
    ],
    initial=TS.OPEN,
    terminal=[TS.CLOSED, TS.CANCELLED, TS.EXPIRED],
)
# One source of truth with the ledger: the table makes exactly the state moves the ledger accepts
# (runtime/ledger/vocabulary.py), adding who may make each and by which event.
if {(t.source, t.target) for t in TASK_MACHINE.transitions if t.source != t.target} != {
    (source, target) for source, targets in TASK_MOVES.items() for target in targets
}:
    raise ValueError("task: TASK_MACHINE's moves differ from the ledger's TASK_MOVES")
BID_MACHINE: Machine[BidState, Ev] = Machine(
    "bid",
    [
        _t(BS.SUBMITTED, Ev.WITHDRAW, BS.WITHDRAWN, BIDDER),
        _t(BS.SUBMITTED, Ev.ACCEPT, BS.ACCEPTED, CREATOR),
        _t(BS.SUBMITTED, Ev.REJECT, BS.REJECTED, CREATOR, SYSTEM),
    ],
    initial=BS.SUBMITTED,
    terminal=[BS.WITHDRAWN, BS.ACCEPTED, BS.REJECTED],
)
AWARD_MACHINE: Machine[AwardState, Ev] = Machine(
    "award",
    [
        _t(AS.ACTIVE, Ev.DELIVER, AS.ACTIVE, AWARDED_BIDDER),
        _t(AS.ACTIVE, Ev.REVOKE, AS.REVOKED, CREATOR),
    ],
    initial=AS.ACTIVE,
    terminal=[AS.REVOKED],
)
RESULT_MACHINE: Machine[ResultState, Ev] = Machine(
    "result",
    [
        _t(RS.SUBMITTED, Ev.ACCEPT, RS.ACCEPTED, CREATOR),
        _t(RS.SUBMITTED, Ev.REJECT, RS.REJECTED, CREATOR),
    ],
    initial=RS.SUBMITTED,
    terminal=[RS.ACCEPTED, RS.REJECTED],
)
RECEIPT_MACHINE: Machine[ReceiptState, Ev] = Machine(
    "receipt",
    [
        _t(CS.PENDING, Ev.SETTLE, CS.SETTLED, SYSTEM),
        _t(CS.PENDING, Ev.REFUND, CS.REFUNDED, SYSTEM),
        _t(CS.PENDING, Ev.DISPUTE, CS.DISPUTED, CREATOR, AWARDED_BIDDER),
        _t(CS.DISPUTED, Ev.SETTLE, CS.SETTLED, SYSTEM),
        _t(CS.DISPUTED, Ev.REFUND, CS.REFUNDED, SYSTEM),
    ],
    initial=CS.PENDING,
    terminal=[CS.SETTLED, CS.REFUNDED],
)
DISPUTE_MACHINE: Machine[DisputeState, Ev] = Machine(
    "dispute",
    [
        _t(DS.OPEN, Ev.RESOLVE, DS.RESOLVED, ARBITER),
        _t(DS.OPEN, Ev.REJECT, DS.REJECTED, ARBITER),
        _t(DS.OPEN, Ev.ADD_EVIDENCE, DS.OPEN, CREATOR, AWARDED_BIDDER),
    ],
    initial=DS.OPEN,
    terminal=[DS.RESOLVED, DS.REJECTED],
)
MACHINES: tuple[Machine[Any, Ev], ...] = (
    TASK_MACHINE,
    BID_MACHINE,
    AWARD_MACHINE,
    RESULT_MACHINE,
    RECEIPT_MACHINE,
    DISPUTE_MACHINE,
)


# -- limits -------------------------------------------------------------------------------
class RiskLimits(BaseModel):
    """Market-wide guard rails; refusals are E_INVALID_ARGUMENT (budget) or E_RATE_LIMITED."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_task_budget: int = Field(default=10**20, ge=1, description="wei")
    max_open_tasks_per_account: int = Field(default=16, ge=1)
    max_bids_per_minute: int = Field(default=30, ge=1)
    max_bids_per_bidder: int = Field(default=4, ge=1, description="bids of one account on one task, withdrawn too")
    max_bids_per_task: int = Field(default=256, ge=1, description="bids one task holds, withdrawn ones too")
    max_disputes_per_hour: int = Field(default=3, ge=1)
    dispute_window_s: int = Field(default=86_400, ge=0, description="how long a rejection waits before the refund")
    max_evidence_per_party: int = Field(default=8, ge=1, description="pieces of evidence each party may add")


# -- events (inputs) -----------------------------------------------------------------------
class _Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    task_id: str


class Publish(_Event):
    budget: int
    deadline: int
    allowed_assets: frozenset[str]
    arbiter: str
    review_timeout_s: int


class PlaceBid(_Event):
    bid_id: str
    price: int
    asset: str


class WithdrawBid(_Event):
    bid_id: str


class Award(_Event):
    bid_id: str
    lock_ref: str | None


class RevokeAward(_Event):
    pass


class SubmitResult(_Event):
    content_hash: str
    size: int


class Accept(_Event):
    pass


class Reject(_Event):
    reason: str


class Cancel(_Event):
    pass


class Expire(_Event):
    pass


class OpenDispute(_Event):
    pass


class ResolveDispute(_Event):
    to_bidder: int
    to_creator: int


class RejectDispute(_Event):
    pass


class AddEvidence(_Event):
    evidence_id: str
    content_hash: str


class Settle(_Event):
    settlement_id: str


class Refund(_Event):
    settlement_id: str


TaskEvent = (
    Publish
    | PlaceBid
    | WithdrawBid
    | Award
    | RevokeAward
    | SubmitResult
    | Accept
    | Reject
    | Cancel
    | Expire
    | OpenDispute
    | ResolveDispute
    | RejectDispute
    | AddEvidence
    | Settle
    | Refund
)

# -- effects (outputs for the I/O adapter) ---------------------------------------------------
NotifyTopic = Literal[
    "bid_placed",
    "bid_withdrawn",
    "bid_accepted",
    "bid_rejected",
    "award_revoked",
    "result_submitted",
    "result_accepted",
    "result_rejected",
    "dispute_opened",
    "dispute_decided",
    "evidence_added",
    "task_cancelled",
    "task_expired",
    "task_closed",
]


@dataclass(frozen=True)
class Notify:
    """Tell ``account`` that something happened to ``task_id``."""

    task_id: str
    account: str
    topic: NotifyTopic


@dataclass(frozen=True)
class ReleaseToBidder:
    """Pay ``amount`` out of the escrow lock ``settlement_id`` to the bidder; confirm with ``Settle``."""

    task_id: str
    bidder: str
    amount: int
    settlement_id: str


@dataclass(frozen=True)
class RefundCreator:
    """Return ``amount`` of the lock to the creator, not before ``not_before``; confirm with ``Refund``."""

    task_id: str
    creator: str
    amount: int
    settlement_id: str
    not_before: float


@dataclass(frozen=True)
class DisputeOpened:
    """The dispute id for the caller; ``merged`` when it already existed."""

    task_id: str
    dispute_id: str
    opened_by: str
    merged: bool


@dataclass(frozen=True)
class EvidenceAdded:
    """A piece of evidence joined the dispute; ``merged`` when the same piece was already there."""

    task_id: str
    evidence_id: str
    submitted_by: str
    merged: bool


Effect = Notify | ReleaseToBidder | RefundCreator | DisputeOpened | EvidenceAdded


# -- records (the book's state; read them, do not mutate them) ------------------------------
@dataclass
class BidRecord:
    bid_id: str
    bidder: str
    price: int
    asset: str
    placed_at: float
    state: BidState = BidState.SUBMITTED


@dataclass
class AwardRecord:
    bid_id: str
    bidder: str
    price: int
    lock_ref: str
    awarded_at: float
    state: AwardState = AwardState.ACTIVE


@dataclass
class ResultRecord:
    content_hash: str
    size: int
    submitted_at: float
    reject_reason: str | None = None
    state: ResultState = ResultState.SUBMITTED


@dataclass
class ReceiptRecord:
    settlement_id: str
    amount: int
    to_bidder: int | None = None  # None until something decided the split
    to_creator: int | None = None
    not_before: float = 0
    state: ReceiptState = ReceiptState.PENDING


@dataclass(frozen=True)
class EvidenceRecord:
    evidence_id: str
    submitted_by: str
    content_hash: str
    submitted_at: float


@dataclass
class DisputeRecord:
    dispute_id: str
    opened_by: str
    opened_at: float
    state: DisputeState = DisputeState.OPEN
    evidence: dict[str, EvidenceRecord] = field(default_factory=dict)


@dataclass
class TaskRecord:
    task_id: str
    creator: str
    budget: int
    deadline: int
    allowed_assets: frozenset[str]
    arbiter: str
    review_timeout_s: int
    created_at: float
    state: TaskState = TaskState.OPEN
    bids: dict[str, BidRecord] = field(default_factory=dict)
    award: AwardRecord | None = None
    result: ResultRecord | None = None
    receipt: ReceiptRecord | None = None
    dispute: DisputeRecord | None = None
    released: int = 0  # confirmed by Settle
    refunded: int = 0  # confirmed by Settle/Refund

    @property
    def locked(self) -> int:
        return self.award.price if self.award is not None else 0


def roles_of(task: TaskRecord, actor: str, bid: BidRecord | None = None) -> frozenset[str]:
    """The table roles ``actor`` holds on ``task`` (and on ``bid`` when one is in question)."""
    if actor == SYSTEM:
        return frozenset({SYSTEM})
    roles: set[str] = set()
    if actor == task.creator:
        roles.add(CREATOR)
    if actor == task.arbiter:
        roles.add(ARBITER)
    if not roles:
        roles.add(PARTICIPANT)
    if task.award is not None and actor == task.award.bidder:
        roles.add(AWARDED_BIDDER)
    if bid is not None and actor == bid.bidder:
        roles.add(BIDDER)
    return frozenset(roles)
