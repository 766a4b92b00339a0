"""``Ledger``: the async face of ``LedgerStore`` for the trio daemon.

aiosqlite needs an asyncio loop (it raises under ``trio.run``), so this does what aiosqlite does
inside: the standard ``sqlite3`` module, one connection, driven from a worker thread. Every call
is queued for one writer (``_Writer``): a worker thread that runs the queued calls one after
another, without a trip back to trio between two of them, so one thread at a time owns the
connection and calls run in the order they were made, with one exception: a call's write-ahead
row (``reserve_call``, which the call's first chunk waits for) goes before the settlements and
receipts queued ahead of it, never before a write that can change a lease, and at most
``MAX_JUMPS`` in a row before the oldest queued call runs, so a steady stream of new calls never keeps a
settlement waiting for ever (``_next_job``).
Calls are not abandoned when the caller is cancelled: a transaction that started commits (or
rolls back) before the caller moves on, which is what lets the daemon say "the ledger commits
before a reply leaves the node"; a call cancelled while still queued never runs.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import outcome
import trio

from runtime.ledger import dispute_cases, errors, reruns, verifications
from runtime.ledger.audit import AuditEntry, AuditReport
from runtime.ledger.dispute_cases import CaseRow
from runtime.ledger.models import (
    Dispute,
    EscrowMismatches,
    Evidence,
    Lease,
    LeaseOpen,
    QueueStats,
    ReceiptRecord,
    ReconcileRow,
    Settlement,
    Task,
    TaskRole,
    TaskState,
    Totals,
    UsageRecorded,
)
from runtime.ledger.receipts import PeerKeys, ReceiptKey, SignedReceipt
from runtime.ledger.store import Clock, LedgerStore
from runtime.ledger.verifications import VerificationRow

T = TypeVar("T")
log = logging.getLogger(__name__)
DISK_FULL_LOG_EVERY_S = 60.0

# SQLite's primary result codes for a write the disk refused (extended codes keep these in the low byte).
_SQLITE_IOERR = 10
_SQLITE_FULL = 13


def _disk_full(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_IOERR, _SQLITE_FULL)


class Lane(Enum):
    """How a queued ledger call may be overtaken (``_next_job``)."""

    FIRST = "first"  # a call's write-ahead row: the call's first chunk waits for it
    YIELDS = "yields"  # commutes with a write-ahead row: a FIRST queued after it may go before it
    BARRIER = "barrier"  # anything else (a lease opened or ended, a settlement queued): never overtaken


# A write-ahead row only inserts a pending call row (no budget or count read), so it commutes with these:
# they settle other calls' rows, meter, receipt and book what is released; none reads pending rows or
# changes a lease's state. Everything not named here is a barrier.
_YIELDS = frozenset(
    {"settle_call", "record_usage", "issue_receipt", "countersign_receipt", "record_countersigned", "book_released"}
)


MAX_JUMPS = 8  # write-ahead rows that run in a row ahead of the oldest queued call; then it runs


def _next_job(lanes: Sequence[Lane], jumps: int = 0) -> int:
    """Which queued call (its index, oldest first) the writer runs next: the oldest FIRST that no
    BARRIER is queued ahead of, else the oldest; the oldest in any case once ``jumps`` (the calls that
    ran in a row ahead of the oldest queued one) reached ``MAX_JUMPS``, so a queue that never empties of
    write-ahead rows still runs the settlements and receipts queued ahead of them. So FIRST calls keep
    their order among themselves, the others keep theirs, and only YIELDS calls are ever overtaken (by
    a FIRST), never more than ``MAX_JUMPS`` times in a row."""
    if jumps >= MAX_JUMPS:
        return 0
    for index, lane in enumerate(lanes):
        if lane is Lane.FIRST:
            return index
        if lane is Lane.BARRIER:
            break
    return 0


@dataclass(eq=False)
class _Job:
    fn: Callable[[], Any]
    lane: Lane
    task: trio.lowlevel.Task
    token: trio.lowlevel.TrioToken
    started: bool = field(default=False)


class _Writer:
    """One queue of ledger calls, drained by one worker thread at a time (trio's thread cache: started
    when a call finds the queue idle, gone when it is empty). Each result goes back to its task with
    ``run_sync_soon``, as ``trio.to_thread.run_sync`` does, while the thread goes on to the next call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[_Job] = deque()
        self._draining = False
        self._jumps = 0  # calls run in a row ahead of the oldest queued one (``_next_job``)

    async def run(self, fn: Callable[[], T], lane: Lane) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        job = _Job(fn, lane, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token())
        with self._lock:
            self._queue.append(job)
            start = not self._draining
            self._draining = True
        if start:
            try:
                trio.lowlevel.start_thread_soon(self._drain, _ignore, name="clawnode ledger writer")
            except BaseException:  # no thread (the process is out of them): this call fails, the next tries again
                with self._lock:  # nothing ran in between (no writer, no checkpoint): the queue held this job only
                    self._queue.remove(job)
                    self._draining = False
                raise

        def abort(_: Any) -> trio.lowlevel.Abort:
            with self._lock:  # cancelled while queued: never runs; once started: waited for, as before
                if job.started:
                    return trio.lowlevel.Abort.FAILED
                self._queue.remove(job)
                return trio.lowlevel.Abort.SUCCEEDED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)  # the outcome, unwrapped
        return result

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._draining = False
                    return
                index = _next_job([job.lane for job in self._queue], self._jumps)
                self._jumps = self._jumps + 1 if index else 0
                job = self._queue[index]
                del self._queue[index]
                job.started = True
            result = outcome.capture(job.fn)
            try:
                job.token.run_sync_soon(trio.lowlevel.reschedule, job.task, result)
            except trio.RunFinishedError:  # the run that asked is gone: nobody to tell
                pass


def _ignore(_: Any) -> None:
    pass


class LedgerLockJournal:
    """Writes the escrow client's lock journal straight to the store from the chain's worker thread
    (the store serialises its connection); a write the disk refuses stops the lock (E_UNAVAILABLE)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def _write(self, fn: Callable[..., None], **kwargs: Any) -> None:
        try:
            fn(**kwargs)
        except sqlite3.Error as error:
            self._ledger.write_failures += 1
            self._ledger.failing_writes += 1
            if _disk_full(error):
                raise errors.disk_full() from error
            raise

    def lock_intent(self, *, contract: str, payer: str, escrow_id: str, amount: int) -> None:
        self._write(self._ledger.store.lock_intent, contract=contract, payer=payer, escrow_id=escrow_id, amount=amount)

    def lock_signed(self, *, payer: str, escrow_id: str, tx_hash: str) -> None:
        self._write(self._ledger.store.lock_signed, payer=payer, escrow_id=escrow_id, tx_hash=tx_hash)

    def lock_outcome(self, *, payer: str, escrow_id: str, outcome: str, tx_hash: str | None) -> None:
        self._write(self._ledger.store.lock_outcome, payer=payer, escrow_id=escrow_id, outcome=outcome, tx_hash=tx_hash)


class Ledger:
    def __init__(self, store: LedgerStore, *, peer_keys: PeerKeys | None = None) -> None:
        self.store = store
        # Reads the Ed25519 public key a peer id embeds (the layer above hands it in); a ledger opened
        # without it never verifies a receipt.
        self._peer_keys = peer_keys
        self._writer = _Writer()
        self.write_failures = 0  # storage errors (disk full, I/O, corruption) since start
        self.failing_writes = 0  # ... since the last write that committed: the alert's gauge
        self._disk_full_logged_at = float("-inf")

    @classmethod
    async def open(cls, path: Path, *, clock: Clock | None = None, peer_keys: PeerKeys | None = None) -> Ledger:
        """Open (create, migrate) the ledger file at ``path``; ``peer_keys`` to verify receipts."""
        store = await trio.to_thread.run_sync(functools.partial(LedgerStore.open, path, clock=clock))
        return cls(store, peer_keys=peer_keys)

    @property
    def peer_keys(self) -> PeerKeys:
        if self._peer_keys is None:
            raise RuntimeError("this ledger was opened without peer_keys: it cannot verify receipts")
        return self._peer_keys

    async def aclose(self) -> None:
        await self._run(self.store.close)

    def _lane(self, fn: Callable[..., Any]) -> Lane:
        if getattr(fn, "__self__", None) is not self.store:
            return Lane.BARRIER
        name = getattr(fn, "__name__", "")
        return Lane.FIRST if name == "reserve_call" else Lane.YIELDS if name in _YIELDS else Lane.BARRIER

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        commits = self.store.commits
        try:
            return await self._writer.run(functools.partial(fn, *args, **kwargs), self._lane(fn))
        except sqlite3.Error as error:
            self.write_failures += 1
            self.failing_writes += 1
            if _disk_full(error):
                # Read-only until space returns: the caller is refused E_UNAVAILABLE, nothing exits.
                now = time.monotonic()
                if now - self._disk_full_logged_at >= DISK_FULL_LOG_EVERY_S:
                    self._disk_full_logged_at = now
                    log.warning("the ledger cannot write (the data dir is full or failing); new work is refused")
                raise errors.disk_full() from error
            raise
        finally:
            if self.store.commits != commits:
                self.failing_writes = 0  # a write landed: the disk took it again

    # leases
    async def open_lease(self, lease: LeaseOpen, *, idempotency_key: str) -> Lease:
        return await self._run(self.store.open_lease, lease, idempotency_key=idempotency_key)

    async def end_lease(self, lease_id: str, *, idempotency_key: str) -> Lease:
        return await self._run(self.store.end_lease, lease_id, idempotency_key=idempotency_key)

    async def update_grant(self, lease_id: str, grant: str) -> None:
        await self._run(self.store.update_grant, lease_id, grant)

    async def open_leases(self) -> list[tuple[Lease, str | None]]:
        return await self._run(self.store.open_leases)

    async def unclaimed_leases(self) -> list[str]:
        return await self._run(self.store.unclaimed_leases)

    async def receipt_progress(self, lease_id: str) -> tuple[int, int, int, int]:
        return await self._run(self.store.receipt_progress, lease_id)

    async def get_lease(self, lease_id: str) -> Lease:
        return await self._run(self.store.get_lease, lease_id)

    async def list_leases(self, *, limit: int = 100, offset: int = 0) -> list[Lease]:
        return await self._run(self.store.list_leases, limit=limit, offset=offset)

    # metering and receipts
    async def record_usage(self, lease_id: str, *, writer: str, units: int, idempotency_key: str) -> UsageRecorded:
        return await self._run(
            self.store.record_usage, lease_id, writer=writer, units=units, idempotency_key=idempotency_key
        )

    async def reserve_call(self, lease_id: str, call_id: str, *, reserved_units: int) -> None:
        await self._run(self.store.reserve_call, lease_id, call_id, reserved_units=reserved_units)

    async def settle_call(self, lease_id: str, call_id: str, *, units: int) -> int:
        return await self._run(self.store.settle_call, lease_id, call_id, units=units)

    async def settle_pending_calls(self) -> list[tuple[str, str, int]]:
        return await self._run(self.store.settle_pending_calls)

    async def pending_calls(self, lease_id: str | None = None) -> list[tuple[str, str, int]]:
        return await self._run(self.store.pending_calls, lease_id)

    async def issue_receipt(self, lease_id: str, key: ReceiptKey) -> SignedReceipt:
        return await self._run(self.store.issue_receipt, lease_id, key)

    async def countersign_receipt(
        self, receipt: SignedReceipt, key: ReceiptKey, *, voucher: str | None = None
    ) -> SignedReceipt:
        return await self._run(self.store.countersign_receipt, receipt, key, self.peer_keys, voucher=voucher)

    async def book_released(self, lease_id: str, released_total: int) -> int:
        return await self._run(self.store.book_released, lease_id, released_total)

    async def record_countersigned(self, receipt: SignedReceipt) -> ReceiptRecord:
        return await self._run(self.store.record_countersigned, receipt, self.peer_keys)

    async def get_receipt(self, lease_id: str, seq: int) -> ReceiptRecord:
        return await self._run(self.store.get_receipt, lease_id, seq)

    async def list_receipts(
        self, lease_id: str | None = None, *, limit: int = 100, offset: int = 0
    ) -> list[ReceiptRecord]:
        return await self._run(self.store.list_receipts, lease_id, limit=limit, offset=offset)

    async def countersigned_amount(self, lease_id: str) -> int:
        return await self._run(self.store.countersigned_amount, lease_id)

    # settlements
    async def enqueue_claim(self, lease_id: str) -> Settlement:
        return await self._run(self.store.enqueue_claim, lease_id)

    async def enqueue_release(self, lease_id: str, cumulative: int) -> Settlement:
        return await self._run(self.store.enqueue_release, lease_id, cumulative)

    async def enqueue_refund(self, lease_id: str) -> Settlement:
        return await self._run(self.store.enqueue_refund, lease_id)

    async def enqueue_withdraw(self, *, idempotency_key: str) -> Settlement:
        return await self._run(self.store.enqueue_withdraw, idempotency_key=idempotency_key)

    async def get_settlement(self, settlement_id: str) -> Settlement:
        return await self._run(self.store.get_settlement, settlement_id)

    async def list_settlements(self, *, limit: int = 100, offset: int = 0) -> list[Settlement]:
        return await self._run(self.store.list_settlements, limit=limit, offset=offset)

    async def due_settlements(self, now: int, *, limit: int = 50) -> list[Settlement]:
        return await self._run(self.store.due_settlements, now, limit=limit)

    async def next_due_at(self) -> int | None:
        return await self._run(self.store.next_due_at)

    async def mark_landed(
        self, settlement_id: str, *, tx_hash: str | None, released_total: int | None, refunded: int | None = None
    ) -> Settlement:
        return await self._run(
            self.store.mark_landed, settlement_id, tx_hash=tx_hash, released_total=released_total, refunded=refunded
        )

    async def mark_retry(self, settlement_id: str, *, error: str, next_attempt_at: int) -> Settlement:
        return await self._run(self.store.mark_retry, settlement_id, error=error, next_attempt_at=next_attempt_at)

    async def mark_failed(self, settlement_id: str, *, error: str) -> Settlement:
        return await self._run(self.store.mark_failed, settlement_id, error=error)

    async def queue_stats(self) -> QueueStats:
        return await self._run(self.store.queue_stats)

    # the chain reconciliation
    async def reconcile_rows(self, *, since: int, limit: int = 256, landed: bool = True) -> list[ReconcileRow]:
        return await self._run(self.store.reconcile_rows, since=since, limit=limit, landed=landed)

    async def flag_settlement(self, settlement_id: str, *, reason: str) -> Settlement:
        return await self._run(self.store.flag_settlement, settlement_id, reason=reason)

    async def resume_settlement(self, settlement_id: str) -> Settlement:
        return await self._run(self.store.resume_settlement, settlement_id)

    async def refund_landed_lock(self, payer: str, escrow_id: str) -> Settlement | None:
        return await self._run(self.store.refund_landed_lock, payer, escrow_id)

    async def flag_lock(self, payer: str, escrow_id: str, *, reason: str) -> None:
        await self._run(self.store.flag_lock, payer, escrow_id, reason=reason)

    async def escrow_mismatches(self) -> EscrowMismatches:
        return await self._run(self.store.escrow_mismatches)

    async def acknowledge_mismatches(self) -> int:
        return await self._run(self.store.acknowledge_mismatches)

    def lock_journal(self) -> LedgerLockJournal:
        """The escrow client's ``LockJournal``: records each lock before it is sent (on the chain's thread)."""
        return LedgerLockJournal(self)

    # disputes and tasks
    async def open_dispute(self, lease_id: str, *, opened_by: str, reason: str, idempotency_key: str) -> Dispute:
        return await self._run(
            self.store.open_dispute, lease_id, opened_by=opened_by, reason=reason, idempotency_key=idempotency_key
        )

    async def resolve_dispute(self, dispute_id: str, *, to_payee: int, to_payer: int, idempotency_key: str) -> Dispute:
        return await self._run(
            self.store.resolve_dispute,
            dispute_id,
            to_payee=to_payee,
            to_payer=to_payer,
            idempotency_key=idempotency_key,
        )

    async def list_disputes(self, *, limit: int = 100) -> list[Dispute]:
        return await self._run(self.store.list_disputes, limit=limit)

    async def disputes_of(self, lease_id: str) -> list[Dispute]:
        return await self._run(self.store.disputes_of, lease_id)

    async def add_evidence(self, piece: Evidence, *, attachment: bytes, envelope: str) -> bool:
        return await self._run(self.store.add_evidence, piece, attachment=attachment, envelope=envelope)

    async def list_evidence(self, task_id: str) -> list[Evidence]:
        return await self._run(self.store.list_evidence, task_id)

    async def evidence_attachment(self, task_id: str, evidence_id: str) -> bytes:
        return await self._run(self.store.evidence_attachment, task_id, evidence_id)

    async def create_task(
        self, task_id: str, *, role: TaskRole, counterparty: str | None, budget: int, idempotency_key: str
    ) -> Task:
        return await self._run(
            self.store.create_task,
            task_id,
            role=role,
            counterparty=counterparty,
            budget=budget,
            idempotency_key=idempotency_key,
        )

    async def set_task_state(self, task_id: str, state: TaskState, *, idempotency_key: str) -> Task:
        return await self._run(self.store.set_task_state, task_id, state, idempotency_key=idempotency_key)

    # money and audit
    async def counts(self) -> dict[str, int]:
        return await self._run(self.store.counts)

    async def totals_by_day(self, *, since_day: str | None = None) -> list[Totals]:
        return await self._run(self.store.totals_by_day, since_day=since_day)

    async def totals_by_peer(self, *, since_day: str | None = None) -> list[Totals]:
        return await self._run(self.store.totals_by_peer, since_day=since_day)

    # verified inference's outcomes per provider (runtime/ledger/verifications.py)

    async def save_verification(self, row: VerificationRow) -> None:
        await self._run(verifications.save, self.store, row)

    async def verification_rows(self) -> list[VerificationRow]:
        return await self._run(verifications.load, self.store)

    # a consumer's verification dispute cases until the arbiter answers (runtime/ledger/dispute_cases.py)

    async def save_dispute_case(self, row: CaseRow) -> None:
        await self._run(dispute_cases.save, self.store, row)

    async def drop_dispute_case(self, lease_id: str) -> None:
        await self._run(dispute_cases.drop, self.store, lease_id)

    async def dispute_cases(self) -> list[CaseRow]:
        return await self._run(dispute_cases.load, self.store)

    async def claims_held_by_disputes(self, *, limit: int) -> list[str]:
        return await self._run(dispute_cases.held_claims, self.store, limit)

    # an arbiter's re-runs of lease dispute cases (runtime/ledger/reruns.py)

    async def count_rerun(self, lease_id: str, peer: str, count: int, bounds: reruns.Bounds) -> None:
        await self._run(reruns.count, self.store, lease_id, peer, count, bounds)

    async def dispute_reruns(self, bounds: reruns.Bounds) -> reruns.Reruns:
        return await self._run(reruns.load, self.store, bounds)

    async def verify_audit(self, expected_head: str | None = None) -> AuditReport:
        return await self._run(self.store.verify_audit, expected_head)

    async def audit_entries(self, *, after_seq: int = 0, limit: int = 100) -> list[AuditEntry]:
        return await self._run(self.store.audit_entries, after_seq=after_seq, limit=limit)
