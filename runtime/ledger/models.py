"""Pydantic models at the ledger's boundary: what callers pass in and what queries return."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.ledger.receipts import LEASE_ID_PATTERN, MAX_AMOUNT, PEER_ID_PATTERN, SignedReceipt
from runtime.ledger.vocabulary import LeaseState, TaskRole, TaskState

LeaseRole = Literal["provider", "consumer"]
SettlementKind = Literal["claim", "release", "refund", "withdraw"]
SettlementState = Literal["pending", "landed", "failed", "flagged"]
Amount = int

_ADDRESS = r"^0x[0-9a-fA-F]{40}$"


class _In(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EscrowRef(_In):
    """Where a lease's money is locked: contract, payer wallet and the payer-chosen 32-byte id."""

    contract: str = Field(pattern=_ADDRESS)
    payer: str = Field(pattern=_ADDRESS)
    escrow_id: str = Field(pattern=r"^0x[0-9a-f]{64}$")


class LeaseOpen(_In):
    lease_id: str = Field(pattern=LEASE_ID_PATTERN)
    role: LeaseRole = Field(description="our side of the lease")
    provider: str = Field(pattern=PEER_ID_PATTERN)
    consumer: str = Field(pattern=PEER_ID_PATTERN)
    price_per_unit: int = Field(ge=0, le=MAX_AMOUNT, description="wei per metered unit (token)")
    budget: int = Field(ge=0, le=MAX_AMOUNT, description="the most this lease can cost, in wei (the escrowed amount)")
    escrow: EscrowRef | None = None
    grant: str | None = Field(
        None, max_length=16384, description="the provider's signed terms (JSON), kept for restarts"
    )


class Lease(BaseModel):
    lease_id: str
    role: LeaseRole
    provider: str
    consumer: str
    price_per_unit: int
    budget: int
    state: LeaseState
    escrow: EscrowRef | None
    metered_units: int
    settled_amount: int
    refunded_amount: int
    created_at: int
    ended_at: int | None

    @property
    def counterparty(self) -> str:
        return self.consumer if self.role == "provider" else self.provider


class UsageRecorded(BaseModel):
    lease_id: str
    units: int
    cumulative_units: int
    cumulative_amount: int


class ReceiptRecord(BaseModel):
    lease_id: str
    seq: int
    receipt_hash: str
    units: int
    amount: int
    countersigned: bool
    settled: bool
    recorded_at: int
    receipt: SignedReceipt


class Settlement(BaseModel):
    settlement_id: str
    lease_id: str | None
    kind: SettlementKind
    amount: int = Field(description="cumulative target for claim/release; 0 otherwise")
    params: dict[str, Any]
    state: SettlementState
    attempts: int
    next_attempt_at: int
    last_error: str | None
    tx_hash: str | None
    created_at: int
    finished_at: int | None


LockState = Literal["intent", "sent", "unknown", "landed", "failed", "refunding", "flagged"]


class ReconcileRow(BaseModel):
    """One escrow-related ledger row with the lease facts the reconciliation rule reads (plain data).

    ``source`` "lock": a row of ``escrow_locks`` (``key`` is the escrow id); "settlement": a claim,
    release or refund (``key`` is the settlement id).
    """

    source: Literal["lock", "settlement"]
    key: str
    kind: Literal["lock", "claim", "release", "refund"]
    state: str
    payer: str
    escrow_id: str
    contract: str | None = None
    lease_id: str | None
    lease_open: bool = False
    last_error: str | None = None
    lock_landed: bool | None = None
    booked: int = 0


class EscrowMismatches(BaseModel):
    """What the reconciliation flagged: rows the chain does not know, waiting for the operator."""

    count: int = Field(description="distinct escrows with a flagged lock or settlement")
    escrow_ids: list[str] = Field(description="the first few of them, truncated (0x1234abcd…)")


class QueueStats(BaseModel):
    length: int
    oldest_age_s: int | None = Field(description="age of the oldest pending settlement; None when empty")


class Totals(BaseModel):
    key: str = Field(description="the day (YYYY-MM-DD, UTC) or the peer id")
    income: int
    spend: int
    net: int


class Dispute(BaseModel):
    dispute_id: str
    lease_id: str
    opened_by: str
    reason: str
    state: Literal["dispute_open", "dispute_resolved", "dispute_rejected"]
    to_payee: int | None
    to_payer: int | None
    created_at: int
    resolved_at: int | None


class Evidence(BaseModel):
    """A piece of evidence in a task's dispute (the attachment's bytes are kept beside it)."""

    task_id: str
    evidence_id: str
    submitted_by: str
    note: str
    content_hash: str
    size: int
    submitted_at: int


# the task vocabulary is shared with the task machine (runtime/ledger/vocabulary.py)


class Task(BaseModel):
    task_id: str
    role: TaskRole
    counterparty: str | None
    state: TaskState
    budget: int
    created_at: int
    updated_at: int
