"""The ledger's synchronous core: one SQLite connection, every write one transaction.

Used from one thread at a time (``Ledger`` runs it on a worker thread through a trio limiter of
one; benchmarks and scripts may call it directly). Every operation a peer or a user can trigger
carries an idempotency key, stored in the same transaction as its effect, so a retry returns the
first answer instead of doing it twice. Every change that matters to money appends to the audit
chain in that same transaction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runtime.errors import ErrorCode
from runtime.ledger import audit, errors, receipts
from runtime.ledger.canonical import canonical_bytes, sha256_hex
from runtime.ledger.channels import ChannelRecords
from runtime.ledger.errors import LedgerError
from runtime.ledger.models import (
    Dispute,
    EscrowMismatches,
    EscrowRef,
    Evidence,
    Lease,
    LeaseOpen,
    QueueStats,
    ReceiptRecord,
    ReconcileRow,
    Settlement,
    SettlementKind,
    Task,
    TaskRole,
    TaskState,
    Totals,
    UsageRecorded,
)
from runtime.ledger.receipts import ReceiptBody, SignedReceipt
from runtime.ledger.schema import migrate
from runtime.ledger.vocabulary import LeaseState, check_lease_move, check_task_move

Clock = Callable[[], int]


WAL_AUTOCHECKPOINT_PAGES = 256
JOURNAL_SIZE_LIMIT_BYTES = 1 << 20
# ``open_dispute``'s refusal of a lease it takes no dispute on (not active or ended, or disputed already).
LEASE_NOT_DISPUTABLE = "lease_not_disputable"


def _wall_clock() -> int:
    return int(time.time())


def _day(at: int) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")


# -- money invariants, checked in the transaction that writes, before the row (TigerBeetle style) --
#
# Each raises ``errors.invariant`` (E_INTERNAL, reason ``invariant_*``); the transaction rolls back, so
# the row that would break it is never stored. The checks that judge a peer's input (a stale or
# over-budget receipt, a usage writer) come first with their own codes; these are the backstop.


def _check_amounts(**amounts: int) -> None:
    """Every amount and unit count the ledger stores is a non-negative integer."""
    for name, value in amounts.items():
        if type(value) is not int or value < 0:
            raise errors.invariant("negative_amount", f"{name} must be a non-negative integer")


def _check_receipt_progress(lease: Lease, body: ReceiptBody, last: tuple[int, int, int] | None) -> None:
    """A receipt is cumulative: units x price, within the budget, and never behind the newest one stored
    (``last`` is its seq, units, amount)."""
    _check_amounts(seq=body.seq, units=body.units, amount=body.amount)
    if body.amount != body.units * lease.price_per_unit or body.amount > lease.budget:
        raise errors.invariant("receipt_amount", "a receipt's amount is units x price and within the budget")
    if last is not None and (body.seq <= last[0] or body.units < last[1] or body.amount < last[2]):
        raise errors.invariant("receipt_decreased", "a lease's cumulative receipts never go back")


def _check_resolution(lease: Lease, to_payee: int, to_payer: int) -> None:
    """A dispute's split gives out exactly what was locked: the payer (consumer) locked the budget, the
    payee (provider) accepted a lock holding at least it."""
    _check_amounts(to_payee=to_payee, to_payer=to_payer)
    total = to_payee + to_payer
    if total < lease.budget or (lease.role == "consumer" and total != lease.budget):
        raise errors.invariant("resolution_total", "a resolution's two parts add up to what was locked")


def _check_released(lease: Lease, released_total: int, refunded: int | None) -> None:
    """What the escrow paid out (released to the payee, refunded to the payer) never exceeds what the
    payer locked: the consumer locked exactly the lease's budget."""
    _check_amounts(released_total=released_total, refunded=refunded or 0)
    if lease.role == "consumer" and released_total + (refunded or 0) > lease.budget:
        raise errors.invariant("released_over_locked", "more released and refunded than was locked")


class LedgerStore(ChannelRecords):
    """Open with ``LedgerStore.open(path)``; the file is created and migrated as needed."""

    def __init__(self, conn: sqlite3.Connection, clock: Clock) -> None:
        self._conn = conn
        self._clock = clock
        self._lock = threading.RLock()
        self.commits = 0  # write transactions committed since open
        self._unsynced = False  # synchronous is NORMAL (a write-ahead row's commit, ``_tx``)

    @classmethod
    def open(cls, path: Path, *, clock: Clock | None = None) -> LedgerStore:
        # Autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT below.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: in WAL mode every COMMIT is fsynced, so a committed receipt survives power loss.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            # Small disks: checkpoint the WAL every 256 pages (1 MiB at 4 KiB pages; SQLite's default is
            # 1000, about 4 MiB) and truncate it back to at most 1 MiB after a checkpoint.
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        return cls(conn, clock or _wall_clock)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- plumbing --

    @contextmanager
    def _tx(self, *, fsync: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. ``fsync=False`` commits it without waiting for the disk (``synchronous =
        NORMAL`` for this commit only): it survives the process's crash (its WAL frames are written to the
        OS at the commit), and a power cut can lose it only with nothing fsynced after it, since every
        fsynced commit syncs the WAL's earlier frames before its own (``reserve_call`` says why that is
        enough there)."""
        with self._lock:
            if not fsync:
                self._conn.execute("PRAGMA synchronous = NORMAL")
                self._unsynced = True
            elif self._unsynced:  # a restore that could not run (below): before this commit, never after
                self._conn.execute("PRAGMA synchronous = FULL")
                self._unsynced = False
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    # A COMMIT that failed (disk full) leaves the transaction open: end it, or every later
                    # BEGIN fails too and the ledger never heals when space returns.
                    if self._conn.in_transaction:
                        try:
                            self._conn.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass
                    raise
            finally:
                # Every other commit stays fsynced. Not inside a transaction a failed ROLLBACK left open
                # (SQLite refuses it there, and that error would hide the write's own).
                if not fsync and not self._conn.in_transaction:
                    self._conn.execute("PRAGMA synchronous = FULL")
                    self._unsynced = False
            self.commits += 1

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for reads spanning several statements."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def _idempotent(
        self, conn: sqlite3.Connection, key: str, operation: str, request: dict[str, Any], action: Callable[[], Any]
    ) -> Any:
        """Run ``action`` once per key; a retry with the same request gets the stored answer."""
        if not key or len(key) > 200:
            raise errors.invalid("bad_idempotency_key", "an idempotency key of 1 to 200 characters is required")
        request_hash = sha256_hex(canonical_bytes({"operation": operation, "request": request}))
        row = conn.execute(
            "SELECT operation, request_sha256, response FROM idempotency WHERE key = ?", (key,)
        ).fetchone()
        if row is not None:
            if row[0] != operation or row[1] != request_hash:
                raise errors.conflict(
                    "idempotency_key_reused", "this idempotency key was already used for a different request"
                )
            return json.loads(row[2])
        response = action()
        conn.execute(
            "INSERT INTO idempotency (key, operation, request_sha256, response, created_at) VALUES (?, ?, ?, ?, ?)",
            (key, operation, request_hash, json.dumps(response), self._clock()),
        )
        return response

    def _audit(self, conn: sqlite3.Connection, kind: str, subject: str, data: dict[str, Any]) -> None:
        audit.append(conn, self._clock(), kind, subject, data)

    # -- leases --

    def open_lease(self, lease: LeaseOpen, *, idempotency_key: str) -> Lease:
        with self._tx() as conn:

            def action() -> str:
                if conn.execute("SELECT 1 FROM leases WHERE lease_id = ?", (lease.lease_id,)).fetchone():
                    raise errors.conflict("lease_exists", "a lease with this id already exists")
                _check_amounts(price_per_unit=lease.price_per_unit, budget=lease.budget)
                escrow = lease.escrow
                conn.execute(
                    "INSERT INTO leases (lease_id, role, provider, consumer, price_per_unit, budget, state,"
                    " escrow_contract, escrow_payer, escrow_id, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'lease_active', ?, ?, ?, ?)",
                    (
                        lease.lease_id,
                        lease.role,
                        lease.provider,
                        lease.consumer,
                        str(lease.price_per_unit),
                        str(lease.budget),
                        escrow.contract if escrow else None,
                        escrow.payer if escrow else None,
                        escrow.escrow_id if escrow else None,
                        self._clock(),
                    ),
                )
                if lease.grant is not None:
                    conn.execute(
                        "INSERT INTO lease_grants (lease_id, grant_json, updated_at) VALUES (?, ?, ?)",
                        (lease.lease_id, lease.grant, self._clock()),
                    )
                self._audit(conn, "lease.opened", lease.lease_id, lease.model_dump(mode="json", exclude={"grant"}))
                return lease.lease_id

            self._idempotent(conn, idempotency_key, "open_lease", lease.model_dump(mode="json"), action)
            return self._lease(conn, lease.lease_id)

    def end_lease(self, lease_id: str, *, idempotency_key: str) -> Lease:
        with self._tx() as conn:

            def action() -> str:
                lease = self._lease(conn, lease_id)
                if lease.state != LeaseState.ACTIVE:
                    raise errors.conflict("lease_not_open", "only an open lease can end")
                self._move_lease(conn, lease, LeaseState.ENDED, ended_at=self._clock())
                self._audit(conn, "lease.ended", lease_id, {"metered_units": lease.metered_units})
                return lease_id

            self._idempotent(conn, idempotency_key, "end_lease", {"lease_id": lease_id}, action)
            return self._lease(conn, lease_id)

    def _move_lease(
        self, conn: sqlite3.Connection, lease: Lease, to: LeaseState, *, ended_at: int | None = None
    ) -> None:
        """Store a lease's new state, each step asserted against the lease machine's moves (one table, in
        ``runtime/ledger/vocabulary.py``); an active lease reaches settled through ended, as the machine
        goes. ``ended_at`` is kept when the lease already has one."""
        steps = [LeaseState.ENDED, to] if lease.state == LeaseState.ACTIVE and to == LeaseState.SETTLED else [to]
        current = lease.state
        for step in steps:
            check_lease_move(current, step)
            current = step
        conn.execute(
            "UPDATE leases SET state = ?, ended_at = COALESCE(ended_at, ?) WHERE lease_id = ?",
            (to.value, ended_at, lease.lease_id),
        )

    def update_grant(self, lease_id: str, grant: str) -> None:
        """Replace a served lease's stored terms (a renewal moved its expiry)."""
        with self._tx() as conn:
            updated = conn.execute(
                "UPDATE lease_grants SET grant_json = ?, updated_at = ? WHERE lease_id = ?",
                (grant, self._clock(), lease_id),
            )
            if updated.rowcount != 1:
                raise errors.not_found("grant_not_found", "no stored grant for this lease")
            self._audit(conn, "lease.renewed", lease_id, {})

    def open_leases(self) -> list[tuple[Lease, str | None]]:
        """Every lease still open, with its stored grant when this node provides it."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_LEASE_COLUMNS}, (SELECT grant_json FROM lease_grants g WHERE g.lease_id = leases.lease_id)"
                " FROM leases WHERE state = 'lease_active' ORDER BY created_at, lease_id"
            ).fetchall()
        return [(_lease_from_row(row[:-1]), row[-1]) for row in rows]

    def unclaimed_leases(self) -> list[str]:
        """Ended escrowed leases this node provides whose newest countersigned receipt (with its voucher)
        has no claim queued: what a crash or a full disk at a lease's end left unasked."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT l.lease_id FROM leases l JOIN receipts r ON r.lease_id = l.lease_id"
                " WHERE l.role = 'provider' AND l.state = 'lease_ended' AND l.escrow_id IS NOT NULL"
                " AND r.consumer_sig IS NOT NULL AND r.voucher IS NOT NULL"
                " AND r.seq = (SELECT MAX(seq) FROM receipts x WHERE x.lease_id = l.lease_id"
                " AND x.consumer_sig IS NOT NULL AND x.voucher IS NOT NULL)"
                " AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.settlement_id = l.lease_id || '/claim/' || r.seq)"
                " AND NOT EXISTS (SELECT 1 FROM channel_leases c WHERE c.lease_id = l.lease_id)"
                " ORDER BY l.created_at, l.lease_id"
            ).fetchall()
        return [row[0] for row in rows]

    def receipt_progress(self, lease_id: str) -> tuple[int, int, int, int]:
        """(newest seq, its units, newest countersigned seq, its units) of a lease's receipts."""
        with self._lock:
            newest = self._conn.execute(
                "SELECT seq, units FROM receipts WHERE lease_id = ? ORDER BY seq DESC LIMIT 1", (lease_id,)
            ).fetchone()
            signed = self._conn.execute(
                "SELECT seq, units FROM receipts WHERE lease_id = ? AND consumer_sig IS NOT NULL"
                " ORDER BY seq DESC LIMIT 1",
                (lease_id,),
            ).fetchone()
        return (*(newest or (0, 0)), *(signed or (0, 0)))

    def get_lease(self, lease_id: str) -> Lease:
        with self._lock:
            return self._lease(self._conn, lease_id)

    def list_leases(self, *, limit: int = 100, offset: int = 0) -> list[Lease]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_LEASE_COLUMNS} FROM leases ORDER BY created_at DESC, lease_id LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        return [_lease_from_row(row) for row in rows]

    def _lease(self, conn: sqlite3.Connection, lease_id: str) -> Lease:
        row = conn.execute(f"SELECT {_LEASE_COLUMNS} FROM leases WHERE lease_id = ?", (lease_id,)).fetchone()
        if row is None:
            raise errors.not_found("lease_not_found", "no such lease")
        return _lease_from_row(row)

    # -- metering (provider only) --

    def record_usage(self, lease_id: str, *, writer: str, units: int, idempotency_key: str) -> UsageRecorded:
        """Authoritative usage: only the provider, on its own ledger, for an open lease."""
        if units <= 0:
            raise errors.invalid("bad_units", "metered units must be positive")
        with self._tx() as conn:

            def action() -> dict[str, Any]:
                lease = self._lease(conn, lease_id)
                if lease.role != "provider" or writer != lease.provider:
                    raise errors.forbidden("usage_not_provider", "only the lease's provider can record usage")
                if lease.state != LeaseState.ACTIVE:
                    raise errors.conflict("lease_not_open", "usage can only be recorded on an open lease")
                return self._add_usage(conn, lease, units).model_dump()

            request = {"lease_id": lease_id, "writer": writer, "units": units}
            return UsageRecorded.model_validate(
                self._idempotent(conn, idempotency_key, "record_usage", request, action)
            )

    def _add_usage(self, conn: sqlite3.Connection, lease: Lease, units: int) -> UsageRecorded:
        """One usage row and the lease's new total, within the budget (the caller holds the transaction)."""
        cumulative = lease.metered_units + units
        if cumulative * lease.price_per_unit > lease.budget:
            raise LedgerError(ErrorCode.INSUFFICIENT_FUNDS, "over_budget", "this usage would exceed the lease's budget")
        _check_amounts(units=units, cumulative_units=cumulative)
        conn.execute(
            "INSERT INTO usage (lease_id, units, cumulative_units, recorded_at) VALUES (?, ?, ?, ?)",
            (lease.lease_id, units, cumulative, self._clock()),
        )
        conn.execute("UPDATE leases SET metered_units = ? WHERE lease_id = ?", (cumulative, lease.lease_id))
        return UsageRecorded(
            lease_id=lease.lease_id,
            units=units,
            cumulative_units=cumulative,
            cumulative_amount=cumulative * lease.price_per_unit,
        )

    # -- the write-ahead meter (provider only): no call is served without a durable row --

    def reserve_call(self, lease_id: str, call_id: str, *, reserved_units: int) -> None:
        """Before any of a call leaves: a durable row naming the call and the units it reserved.

        The provider serves the call only once this committed, so the ledger knows of every call
        served (a disk that refuses it refuses the call, before any chunk). ``settle_call`` turns it
        into usage when the call ends; ``settle_pending_calls`` settles what a crash left.
        """
        _check_amounts(reserved_units=reserved_units)
        # Not fsynced: the call's first chunk waits for this row, and an fsync on a busy disk took 1.5 to
        # 25 ms, most of the time the network added to a first token. The row is written to the OS at its commit, so a
        # crash of the process keeps it (and ``settle_pending_calls`` settles it at 0); only a power cut
        # can lose it, and then the call bills 0 as well, which is what that settlement gives it: nothing
        # fsynced later (its settlement, a receipt counting it) can survive without it, as every fsynced
        # commit syncs the WAL's earlier frames first. A disk that refuses the write still refuses the
        # call at the commit.
        with self._tx(fsync=False) as conn:
            lease = self._lease(conn, lease_id)
            if lease.role != "provider":
                raise errors.forbidden("usage_not_provider", "only the lease's provider meters calls")
            if lease.state != LeaseState.ACTIVE:
                raise errors.conflict("lease_not_open", "calls can only be served on an open lease")
            if conn.execute(
                "SELECT 1 FROM pending_calls WHERE lease_id = ? AND call_id = ?", (lease_id, call_id)
            ).fetchone():
                raise errors.conflict("call_exists", "this call is already pending")
            conn.execute(
                "INSERT INTO pending_calls (lease_id, call_id, reserved_units, created_at) VALUES (?, ?, ?, ?)",
                (lease_id, call_id, reserved_units, self._clock()),
            )

    def settle_call(self, lease_id: str, call_id: str, *, units: int) -> int:
        """A call ended: its pending row goes and ``units`` (at most what it reserved) become usage, in one
        transaction. Returns the units metered: 0 when the lease is no longer open (nothing more can be
        receipted on it). A call that is not pending (settled already) is ``E_NOT_FOUND``."""
        _check_amounts(units=units)
        with self._tx() as conn:
            row = conn.execute(
                "SELECT reserved_units FROM pending_calls WHERE lease_id = ? AND call_id = ?", (lease_id, call_id)
            ).fetchone()
            if row is None:
                raise errors.not_found("call_not_pending", "no such pending call")
            if units > row[0]:
                raise errors.invariant("settled_over_reserved", "a call is settled for at most what it reserved")
            conn.execute("DELETE FROM pending_calls WHERE lease_id = ? AND call_id = ?", (lease_id, call_id))
            lease = self._lease(conn, lease_id)
            if units == 0 or lease.state != LeaseState.ACTIVE:
                return 0
            self._add_usage(conn, lease, units)
            return units

    def settle_pending_calls(self) -> list[tuple[str, str, int]]:
        """At start, before any call is served: settle every call a crash left pending, at 0 units.

        Why 0: a provider writes a call's end frame (or its last chunk) before it settles the call, so a
        row still pending after a crash belongs to a call cut anywhere between its first chunk and its
        settlement, and the provider cannot tell where, nor how many of the chunks it wrote reached the
        consumer (a frame written to a socket dies with the connection). The consumer counted anything
        from 0 to the reservation for it; the only figure it can never have counted less than is 0. So
        these calls bill nothing: a crash can cost the provider the calls it had in flight, never make the
        consumer pay for units it could not count (or leave receipts it would refuse to countersign).
        Returns (lease id, call id, units reserved) of each row settled; an audit entry records each.
        """
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT lease_id, call_id, reserved_units FROM pending_calls ORDER BY created_at, lease_id, call_id"
            ).fetchall()
            conn.execute("DELETE FROM pending_calls")
            for lease_id, call_id, reserved in rows:
                self._audit(
                    conn, "call.settled_at_restart", lease_id, {"call_id": call_id, "reserved": reserved, "units": 0}
                )
        return [(row[0], row[1], row[2]) for row in rows]

    def pending_calls(self, lease_id: str | None = None) -> list[tuple[str, str, int]]:
        """(lease id, call id, units reserved) of the calls not settled yet."""
        query = "SELECT lease_id, call_id, reserved_units FROM pending_calls"
        args: tuple[Any, ...] = ()
        if lease_id is not None:
            query += " WHERE lease_id = ?"
            args = (lease_id,)
        with self._lock:
            rows = self._conn.execute(query + " ORDER BY created_at, call_id", args).fetchall()
        return [(row[0], row[1], row[2]) for row in rows]

    # -- receipts --

    def issue_receipt(self, lease_id: str, key: receipts.ReceiptKey) -> SignedReceipt:
        """As the provider: sign a receipt for everything metered so far.

        Idempotent by content: with nothing metered since the last receipt, that receipt is returned.
        """
        with self._tx() as conn:
            lease = self._lease(conn, lease_id)
            if lease.role != "provider":
                raise errors.forbidden("not_provider", "only the lease's provider issues receipts")
            last = conn.execute(
                "SELECT seq, units, body, provider_sig, consumer_sig, voucher FROM receipts"
                " WHERE lease_id = ? ORDER BY seq DESC LIMIT 1",
                (lease_id,),
            ).fetchone()
            if last is not None and last[1] == lease.metered_units:
                return _receipt_from_columns(last[2], last[3], last[4], last[5])
            body = ReceiptBody(
                lease_id=lease_id,
                seq=(last[0] + 1) if last else 1,
                provider=lease.provider,
                consumer=lease.consumer,
                units=lease.metered_units,
                amount=lease.metered_units * lease.price_per_unit,
                issued_at=self._clock(),
            )
            signed = receipts.sign_as_provider(body, key)
            self._insert_receipt(conn, lease, signed)
            self._audit(conn, "receipt.issued", lease_id, _receipt_audit(signed))
            return signed

    def countersign_receipt(
        self,
        receipt: SignedReceipt,
        key: receipts.ReceiptKey,
        peer_keys: receipts.PeerKeys,
        *,
        voucher: str | None = None,
    ) -> SignedReceipt:
        """As the consumer: verify the provider's receipt against our lease, countersign and store it."""
        receipts.verify_provider(receipt, peer_keys)
        body = receipt.body
        with self._tx() as conn:
            lease = self._lease(conn, body.lease_id)
            if lease.role != "consumer":
                raise errors.forbidden("not_consumer", "only the lease's consumer countersigns its receipts")
            self._check_parties(lease, body)
            self._check_sequence(conn, lease, body)
            signed = receipts.countersign(receipt, key, peer_keys, voucher)
            self._insert_receipt(conn, lease, signed)
            self._audit(conn, "receipt.countersigned", body.lease_id, _receipt_audit(signed))
            return signed

    def record_countersigned(self, receipt: SignedReceipt, peer_keys: receipts.PeerKeys) -> ReceiptRecord:
        """As the provider: store the consumer's countersignature on a receipt we issued."""
        receipts.verify_countersigned(receipt, peer_keys)
        body = receipt.body
        with self._tx() as conn:
            lease = self._lease(conn, body.lease_id)
            if lease.role != "provider":
                raise errors.forbidden("not_provider", "only the provider records countersigned receipts")
            self._check_parties(lease, body)
            row = conn.execute("SELECT consumer_sig FROM receipts WHERE receipt_hash = ?", (body.digest(),)).fetchone()
            if row is None:
                raise errors.not_found("receipt_unknown", "this node did not issue that receipt")
            if row[0] is not None:
                raise errors.replayed("this receipt was already countersigned")
            conn.execute(
                "UPDATE receipts SET consumer_sig = ?, voucher = ? WHERE receipt_hash = ?",
                (receipt.consumer_sig, receipt.voucher, body.digest()),
            )
            self._audit(conn, "receipt.countersigned", body.lease_id, _receipt_audit(receipt))
            return self._receipt(conn, body.lease_id, body.seq)

    def _check_parties(self, lease: Lease, body: ReceiptBody) -> None:
        if body.provider != lease.provider or body.consumer != lease.consumer:
            raise errors.forbidden("receipt_wrong_parties", "the receipt names other peers than the lease")
        if body.amount != body.units * lease.price_per_unit:
            raise errors.invalid("receipt_amount_mismatch", "the receipt's amount is not units times the lease price")
        if body.amount > lease.budget:
            raise LedgerError(ErrorCode.INSUFFICIENT_FUNDS, "over_budget", "the receipt exceeds the lease's budget")

    def _check_sequence(self, conn: sqlite3.Connection, lease: Lease, body: ReceiptBody) -> None:
        if conn.execute("SELECT 1 FROM receipts WHERE receipt_hash = ?", (body.digest(),)).fetchone():
            raise errors.replayed("this receipt was already recorded")
        last = conn.execute(
            "SELECT seq, units FROM receipts WHERE lease_id = ? ORDER BY seq DESC LIMIT 1", (lease.lease_id,)
        ).fetchone()
        if last is not None and (body.seq <= last[0] or body.units < last[1]):
            raise errors.conflict("receipt_stale", "the receipt is older than one already recorded")

    def _insert_receipt(self, conn: sqlite3.Connection, lease: Lease, signed: SignedReceipt) -> None:
        body = signed.body
        last = conn.execute(
            "SELECT seq, units, amount FROM receipts WHERE lease_id = ? ORDER BY seq DESC LIMIT 1", (lease.lease_id,)
        ).fetchone()
        _check_receipt_progress(lease, body, None if last is None else (last[0], last[1], int(last[2])))
        conn.execute(
            "INSERT INTO receipts (lease_id, seq, receipt_hash, units, amount, body, provider_sig, consumer_sig,"
            " voucher, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                body.lease_id,
                body.seq,
                body.digest(),
                body.units,
                str(body.amount),
                body.canonical().decode(),
                signed.provider_sig,
                signed.consumer_sig,
                signed.voucher,
                self._clock(),
            ),
        )

    def get_receipt(self, lease_id: str, seq: int) -> ReceiptRecord:
        with self._lock:
            return self._receipt(self._conn, lease_id, seq)

    def list_receipts(self, lease_id: str | None = None, *, limit: int = 100, offset: int = 0) -> list[ReceiptRecord]:
        query = f"SELECT {_RECEIPT_COLUMNS} FROM receipts"
        args: tuple[Any, ...] = ()
        if lease_id is not None:
            query += " WHERE lease_id = ?"
            args = (lease_id,)
        query += " ORDER BY recorded_at DESC, lease_id, seq DESC LIMIT ? OFFSET ?"
        with self._lock:
            rows = self._conn.execute(query, (*args, limit, offset)).fetchall()
        return [_receipt_record(row) for row in rows]

    def _receipt(self, conn: sqlite3.Connection, lease_id: str, seq: int) -> ReceiptRecord:
        row = conn.execute(
            f"SELECT {_RECEIPT_COLUMNS} FROM receipts WHERE lease_id = ? AND seq = ?", (lease_id, seq)
        ).fetchone()
        if row is None:
            raise errors.not_found("receipt_not_found", "no such receipt")
        return _receipt_record(row)

    def countersigned_amount(self, lease_id: str) -> int:
        """What the newest receipt carrying both signatures says is owed (0 without one)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT amount FROM receipts WHERE lease_id = ? AND consumer_sig IS NOT NULL ORDER BY seq DESC LIMIT 1",
                (lease_id,),
            ).fetchone()
        return int(row[0]) if row else 0

    # -- settlements (the queue's persistent half) --

    def enqueue_claim(self, lease_id: str) -> Settlement:
        """As the provider: claim from escrow what the newest countersigned receipt (with voucher) says."""
        with self._tx() as conn:
            lease = self._lease(conn, lease_id)
            if lease.role != "provider" or lease.escrow is None:
                raise errors.forbidden("not_provider", "only the provider of an escrowed lease claims")
            row = conn.execute(
                "SELECT seq, amount, voucher FROM receipts WHERE lease_id = ? AND consumer_sig IS NOT NULL"
                " AND voucher IS NOT NULL ORDER BY seq DESC LIMIT 1",
                (lease_id,),
            ).fetchone()
            if row is None:
                raise errors.forbidden(
                    "receipt_not_countersigned", "no receipt with both signatures and a voucher exists for this lease"
                )
            params = {"payer": lease.escrow.payer, "escrow_id": lease.escrow.escrow_id, "voucher": row[2]}
            return self._enqueue(conn, f"{lease_id}/claim/{row[0]}", lease_id, "claim", int(row[1]), params)

    def enqueue_release(self, lease_id: str, cumulative: int) -> Settlement:
        """As the consumer (payer): raise what the provider has been paid to ``cumulative`` in total."""
        with self._tx() as conn:
            lease = self._lease(conn, lease_id)
            if lease.role != "consumer" or lease.escrow is None:
                raise errors.forbidden("not_consumer", "only the consumer of an escrowed lease releases")
            if not 0 < cumulative <= lease.budget:
                raise errors.invalid("bad_amount", "the release must be positive and within the budget")
            params = {"escrow_id": lease.escrow.escrow_id}
            return self._enqueue(conn, f"{lease_id}/release/{cumulative}", lease_id, "release", cumulative, params)

    def enqueue_refund(self, lease_id: str) -> Settlement:
        with self._tx() as conn:
            lease = self._lease(conn, lease_id)
            if lease.escrow is None:
                raise errors.invalid("no_escrow", "the lease has no escrow")
            params = {"payer": lease.escrow.payer, "escrow_id": lease.escrow.escrow_id}
            return self._enqueue(conn, f"{lease_id}/refund", lease_id, "refund", 0, params)

    def enqueue_withdraw(self, *, idempotency_key: str) -> Settlement:
        with self._tx() as conn:
            return self._enqueue(conn, f"withdraw/{idempotency_key}", None, "withdraw", 0, {})

    def _enqueue(
        self,
        conn: sqlite3.Connection,
        settlement_id: str,
        lease_id: str | None,
        kind: SettlementKind,
        amount: int,
        params: dict[str, Any],
    ) -> Settlement:
        existing = conn.execute(
            "SELECT kind, amount, params FROM settlements WHERE settlement_id = ?", (settlement_id,)
        )
        row = existing.fetchone()
        _check_amounts(amount=amount)
        if row is not None:
            if (row[0], int(row[1]), json.loads(row[2])) != (kind, amount, params):
                raise errors.conflict("settlement_exists", "a different settlement with this id exists")
            return self._settlement(conn, settlement_id)
        now = self._clock()
        conn.execute(
            "INSERT INTO settlements (settlement_id, lease_id, kind, amount, params, state, next_attempt_at,"
            " created_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
            (settlement_id, lease_id, kind, str(amount), json.dumps(params, sort_keys=True), now, now),
        )
        self._audit(conn, "settlement.queued", settlement_id, {"kind": kind, "lease_id": lease_id, "amount": amount})
        return self._settlement(conn, settlement_id)

    def due_settlements(self, now: int, *, limit: int = 50) -> list[Settlement]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_SETTLEMENT_COLUMNS} FROM settlements WHERE state = 'pending' AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, created_at, settlement_id LIMIT ?",
                (now, limit),
            ).fetchall()
        return [_settlement_from_row(row) for row in rows]

    def next_due_at(self) -> int | None:
        with self._lock:
            row = self._conn.execute("SELECT MIN(next_attempt_at) FROM settlements WHERE state = 'pending'").fetchone()
        return None if row[0] is None else int(row[0])

    def mark_submitted(self, settlement_id: str, tx_hash: str) -> None:
        """Remember a signed transaction before it is sent, so a restart can look for it."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE settlements SET tx_hash = ? WHERE settlement_id = ? AND state = 'pending'",
                (tx_hash, settlement_id),
            )

    def mark_retry(self, settlement_id: str, *, error: str, next_attempt_at: int) -> Settlement:
        with self._tx() as conn:
            conn.execute(
                "UPDATE settlements SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?"
                " WHERE settlement_id = ? AND state = 'pending'",
                (error, next_attempt_at, settlement_id),
            )
            return self._settlement(conn, settlement_id)

    def mark_failed(self, settlement_id: str, *, error: str) -> Settlement:
        with self._tx() as conn:
            current = self._settlement(conn, settlement_id)
            if current.state != "pending":
                return current
            conn.execute(
                "UPDATE settlements SET state = 'failed', attempts = attempts + 1, last_error = ?, finished_at = ?"
                " WHERE settlement_id = ?",
                (error, self._clock(), settlement_id),
            )
            self._audit(conn, "settlement.failed", settlement_id, {"error": error})
            return self._settlement(conn, settlement_id)

    def mark_landed(
        self, settlement_id: str, *, tx_hash: str | None, released_total: int | None, refunded: int | None = None
    ) -> Settlement:
        """The settlement's effect is on chain: record it, and the money it moved, exactly once.

        ``released_total`` is what the escrow says the payee has been paid in total; the difference
        to what this ledger already counted becomes income (provider) or spend (consumer).
        """
        with self._tx() as conn:
            current = self._settlement(conn, settlement_id)
            if current.state in ("landed", "flagged"):
                return current  # flagged: the operator decides, a late attempt does not book around the flag
            if current.state == "failed":
                raise errors.conflict("settlement_failed", "the settlement already failed")
            now = self._clock()
            conn.execute(
                "UPDATE settlements SET state = 'landed', attempts = attempts + 1, tx_hash = COALESCE(?, tx_hash),"
                " last_error = NULL, finished_at = ? WHERE settlement_id = ?",
                (tx_hash, now, settlement_id),
            )
            moved = 0
            if current.lease_id is not None:
                lease = self._lease(conn, current.lease_id)
                _check_released(lease, released_total or 0, refunded if current.kind == "refund" else None)
                if released_total is not None:
                    moved = self._book_released(conn, lease, released_total, settlement_id, now)
                if current.kind == "refund":
                    self._move_lease(conn, lease, LeaseState.SETTLED, ended_at=now)
                    conn.execute(
                        "UPDATE leases SET refunded_amount = ? WHERE lease_id = ?", (str(refunded or 0), lease.lease_id)
                    )
            elif "channel_id" in current.params:  # a channel's claim, close or refund (runtime/ledger/channels.py)
                moved = self._book_channel(conn, current, released_total, refunded, now)
            self._audit(
                conn,
                "settlement.landed",
                settlement_id,
                {"kind": current.kind, "tx_hash": tx_hash, "moved": moved, "refunded": refunded},
            )
            return self._settlement(conn, settlement_id)

    def book_released(self, lease_id: str, released_total: int) -> int:
        """As the consumer: the escrow shows ``released_total`` paid to the provider; book what is new as spend.

        Called when the consumer sees the provider's claim land, so its ledger agrees with the chain
        (and the provider's income) without waiting for the refund. Returns the wei booked now.
        """
        with self._tx() as conn:
            lease = self._lease(conn, lease_id)
            if lease.role != "consumer" or lease.escrow is None:
                raise errors.forbidden("not_consumer", "only the consumer of an escrowed lease books released spend")
            moved = self._book_released(conn, lease, released_total, f"{lease_id}/released/{released_total}", None)
            if moved:
                self._audit(conn, "money.released", lease_id, {"released_total": released_total, "moved": moved})
            return moved

    def _book_released(
        self, conn: sqlite3.Connection, lease: Lease, released_total: int, entry_id: str, now: int | None
    ) -> int:
        """Book ``released_total - settled_amount`` as income or spend, once; the write-time invariants hold."""
        if released_total < 0:
            raise errors.invalid("bad_amount", "a released total cannot be negative")
        if lease.role == "consumer" and released_total > lease.budget:
            # The consumer locked exactly the budget: the chain cannot have released more.
            raise LedgerError(ErrorCode.INSUFFICIENT_FUNDS, "over_budget", "released more than the lease's budget")
        if released_total <= lease.settled_amount:
            return 0
        moved = released_total - lease.settled_amount
        booked = sum(
            int(row[0]) for row in conn.execute("SELECT amount FROM money WHERE lease_id = ?", (lease.lease_id,))
        )
        if booked != lease.settled_amount:
            # Income or spend rows and the lease's settled amount disagree: booking more would hide it.
            raise errors.invariant("money_rows_mismatch", "the money booked for a lease is its settled amount")
        at = self._clock() if now is None else now
        conn.execute(
            "INSERT INTO money (entry_id, lease_id, peer, direction, amount, day, at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                entry_id,
                lease.lease_id,
                lease.counterparty,
                "income" if lease.role == "provider" else "spend",
                str(moved),
                _day(at),
                at,
            ),
        )
        conn.execute("UPDATE leases SET settled_amount = ? WHERE lease_id = ?", (str(released_total), lease.lease_id))
        self._mark_receipts_settled(conn, lease.lease_id, released_total)
        return moved

    def _mark_receipts_settled(self, conn: sqlite3.Connection, lease_id: str, released_total: int) -> None:
        rows = conn.execute(
            "SELECT seq, amount FROM receipts WHERE lease_id = ? AND settled = 0 AND consumer_sig IS NOT NULL",
            (lease_id,),
        ).fetchall()
        for seq, amount in rows:
            if int(amount) <= released_total:
                conn.execute("UPDATE receipts SET settled = 1 WHERE lease_id = ? AND seq = ?", (lease_id, seq))

    def get_settlement(self, settlement_id: str) -> Settlement:
        with self._lock:
            return self._settlement(self._conn, settlement_id)

    def list_settlements(self, *, limit: int = 100, offset: int = 0) -> list[Settlement]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_SETTLEMENT_COLUMNS} FROM settlements ORDER BY created_at DESC, settlement_id"
                " LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        return [_settlement_from_row(row) for row in rows]

    def _settlement(self, conn: sqlite3.Connection, settlement_id: str) -> Settlement:
        row = conn.execute(
            f"SELECT {_SETTLEMENT_COLUMNS} FROM settlements WHERE settlement_id = ?", (settlement_id,)
        ).fetchone()
        if row is None:
            raise errors.not_found("settlement_not_found", "no such settlement")
        return _settlement_from_row(row)

    def queue_stats(self, now: int | None = None) -> QueueStats:
        now = self._clock() if now is None else now
        with self._lock:
            count, oldest = self._conn.execute(
                "SELECT COUNT(*), MIN(created_at) FROM settlements WHERE state = 'pending'"
            ).fetchone()
        return QueueStats(length=count, oldest_age_s=None if oldest is None else max(0, now - oldest))

    # -- disputes --

    def open_dispute(self, lease_id: str, *, opened_by: str, reason: str, idempotency_key: str) -> Dispute:
        with self._tx() as conn:

            def action() -> str:
                lease = self._lease(conn, lease_id)
                if opened_by not in (lease.provider, lease.consumer):
                    raise errors.forbidden("not_a_party", "only the lease's parties can dispute it")
                if (
                    lease.state not in (LeaseState.ACTIVE, LeaseState.ENDED)
                    or conn.execute("SELECT 1 FROM disputes WHERE lease_id = ?", (lease_id,)).fetchone()
                ):  # one dispute per lease: a disputed lease is ended and has its dispute row
                    raise errors.conflict(LEASE_NOT_DISPUTABLE, "the lease cannot be disputed in its state")
                dispute_id = f"{lease_id}/dispute"
                conn.execute(
                    "INSERT INTO disputes (dispute_id, lease_id, opened_by, reason, state, created_at)"
                    " VALUES (?, ?, ?, ?, 'dispute_open', ?)",
                    (dispute_id, lease_id, opened_by, reason[:500], self._clock()),
                )
                self._move_lease(conn, lease, LeaseState.ENDED)  # the machine's freeze
                self._audit(conn, "dispute.opened", dispute_id, {"lease_id": lease_id, "opened_by": opened_by})
                return dispute_id

            request = {"lease_id": lease_id, "opened_by": opened_by, "reason": reason}
            dispute_id = self._idempotent(conn, idempotency_key, "open_dispute", request, action)
            return self._dispute(conn, dispute_id)

    def resolve_dispute(self, dispute_id: str, *, to_payee: int, to_payer: int, idempotency_key: str) -> Dispute:
        with self._tx() as conn:

            def action() -> str:
                dispute = self._dispute(conn, dispute_id)
                if dispute.state != "dispute_open":
                    raise errors.conflict("dispute_not_open", "the dispute is not open")
                lease = self._lease(conn, dispute.lease_id)
                _check_resolution(lease, to_payee, to_payer)
                conn.execute(
                    "UPDATE disputes SET state = 'dispute_resolved', to_payee = ?, to_payer = ?, resolved_at = ?"
                    " WHERE dispute_id = ?",
                    (str(to_payee), str(to_payer), self._clock(), dispute_id),
                )
                self._move_lease(conn, lease, LeaseState.SETTLED)
                self._audit(conn, "dispute.resolved", dispute_id, {"to_payee": to_payee, "to_payer": to_payer})
                return dispute_id

            request = {"dispute_id": dispute_id, "to_payee": to_payee, "to_payer": to_payer}
            self._idempotent(conn, idempotency_key, "resolve_dispute", request, action)
            return self._dispute(conn, dispute_id)

    def list_disputes(self, *, limit: int = 100) -> list[Dispute]:
        with self._lock:
            ids = [
                r[0]
                for r in self._conn.execute(
                    "SELECT dispute_id FROM disputes ORDER BY created_at DESC LIMIT ?", (limit,)
                )
            ]
            return [self._dispute(self._conn, dispute_id) for dispute_id in ids]

    def disputes_of(self, lease_id: str) -> list[Dispute]:
        """The disputes of one lease, newest first (a lease has at most one: it ends when disputed)."""
        with self._lock:
            ids = [
                r[0]
                for r in self._conn.execute(
                    "SELECT dispute_id FROM disputes WHERE lease_id = ? ORDER BY created_at DESC LIMIT 8", (lease_id,)
                )
            ]
            return [self._dispute(self._conn, dispute_id) for dispute_id in ids]

    def add_evidence(self, piece: Evidence, *, attachment: bytes, envelope: str) -> bool:
        """Keep a piece of dispute evidence; False when it was already kept (sending it again is harmless)."""
        with self._tx() as conn:
            added = conn.execute(
                "INSERT OR IGNORE INTO dispute_evidence (task_id, evidence_id, submitted_by, note, content_hash,"
                " attachment, envelope, submitted_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    piece.task_id,
                    piece.evidence_id,
                    piece.submitted_by,
                    piece.note,
                    piece.content_hash,
                    attachment,
                    envelope,
                    piece.submitted_at,
                ),
            ).rowcount
            if added:
                self._audit(
                    conn,
                    "dispute.evidence",
                    f"{piece.task_id}/{piece.evidence_id}",
                    {"submitted_by": piece.submitted_by, "content_hash": piece.content_hash, "size": piece.size},
                )
            return bool(added)

    def list_evidence(self, task_id: str) -> list[Evidence]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT task_id, evidence_id, submitted_by, note, content_hash, length(attachment), submitted_at"
                " FROM dispute_evidence WHERE task_id = ? ORDER BY submitted_at, evidence_id",
                (task_id,),
            ).fetchall()
        fields = ("task_id", "evidence_id", "submitted_by", "note", "content_hash", "size", "submitted_at")
        return [Evidence.model_validate(dict(zip(fields, row, strict=True))) for row in rows]

    def evidence_attachment(self, task_id: str, evidence_id: str) -> bytes:
        with self._lock:
            row = self._conn.execute(
                "SELECT attachment FROM dispute_evidence WHERE task_id = ? AND evidence_id = ?", (task_id, evidence_id)
            ).fetchone()
        if row is None:
            raise errors.not_found("evidence_not_found", "no such piece of evidence")
        return bytes(row[0])

    def _dispute(self, conn: sqlite3.Connection, dispute_id: str) -> Dispute:
        row = conn.execute(
            "SELECT dispute_id, lease_id, opened_by, reason, state, to_payee, to_payer, created_at, resolved_at"
            " FROM disputes WHERE dispute_id = ?",
            (dispute_id,),
        ).fetchone()
        if row is None:
            raise errors.not_found("dispute_not_found", "no such dispute")
        return Dispute(
            dispute_id=row[0],
            lease_id=row[1],
            opened_by=row[2],
            reason=row[3],
            state=row[4],
            to_payee=None if row[5] is None else int(row[5]),
            to_payer=None if row[6] is None else int(row[6]),
            created_at=row[7],
            resolved_at=row[8],
        )

    # -- tasks --

    def create_task(
        self, task_id: str, *, role: TaskRole, counterparty: str | None, budget: int, idempotency_key: str
    ) -> Task:
        with self._tx() as conn:

            def action() -> str:
                if conn.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone():
                    raise errors.conflict("task_exists", "a task with this id already exists")
                now = self._clock()
                conn.execute(
                    "INSERT INTO tasks (task_id, role, counterparty, state, budget, created_at, updated_at)"
                    " VALUES (?, ?, ?, 'task_open', ?, ?, ?)",
                    (task_id, role, counterparty, str(budget), now, now),
                )
                self._audit(conn, "task.created", task_id, {"role": role, "budget": budget})
                return task_id

            request = {"task_id": task_id, "role": role, "counterparty": counterparty, "budget": budget}
            self._idempotent(conn, idempotency_key, "create_task", request, action)
            return self._task(conn, task_id)

    def set_task_state(self, task_id: str, state: TaskState, *, idempotency_key: str) -> Task:
        with self._tx() as conn:

            def action() -> str:
                task = self._task(conn, task_id)
                check_task_move(task.state, state)  # the task machine's moves, one table for both
                conn.execute(
                    "UPDATE tasks SET state = ?, updated_at = ? WHERE task_id = ?", (state, self._clock(), task_id)
                )
                self._audit(conn, "task.state", task_id, {"from": task.state, "to": state})
                return task_id

            self._idempotent(conn, idempotency_key, "set_task_state", {"task_id": task_id, "state": state}, action)
            return self._task(conn, task_id)

    def _task(self, conn: sqlite3.Connection, task_id: str) -> Task:
        row = conn.execute(
            "SELECT task_id, role, counterparty, state, budget, created_at, updated_at FROM tasks WHERE task_id = ?",
            (task_id,),
        ).fetchone()
        if row is None:
            raise errors.not_found("task_not_found", "no such task")
        return Task(
            task_id=row[0],
            role=row[1],
            counterparty=row[2],
            state=row[3],
            budget=int(row[4]),
            created_at=row[5],
            updated_at=row[6],
        )

    # -- money --

    def counts(self) -> dict[str, int]:
        """How many leases, receipts and countersigned receipts the ledger holds."""
        with self._read() as conn:
            return {
                "leases": conn.execute("SELECT COUNT(*) FROM leases").fetchone()[0],
                "receipts": conn.execute("SELECT COUNT(*) FROM receipts").fetchone()[0],
                "countersigned": conn.execute(
                    "SELECT COUNT(*) FROM receipts WHERE consumer_sig IS NOT NULL"
                ).fetchone()[0],
            }

    def totals_by_day(self, *, since_day: str | None = None) -> list[Totals]:
        return self._totals("day", since_day)

    def totals_by_peer(self, *, since_day: str | None = None) -> list[Totals]:
        return self._totals("peer", since_day)

    def _totals(self, column: str, since_day: str | None) -> list[Totals]:
        query = f"SELECT {column}, direction, amount FROM money"
        args: tuple[Any, ...] = ()
        if since_day is not None:
            query += " WHERE day >= ?"
            args = (since_day,)
        sums: dict[str, dict[str, int]] = {}
        with self._lock:
            for key, direction, amount in self._conn.execute(query, args):
                sums.setdefault(key, {"income": 0, "spend": 0})[direction] += int(amount)
        return [
            Totals(key=key, income=s["income"], spend=s["spend"], net=s["income"] - s["spend"])
            for key, s in sorted(sums.items())
        ]

    # -- escrow locks (the payer's journal of its locks) and the chain reconciliation --

    def lock_intent(self, *, contract: str, payer: str, escrow_id: str, amount: int) -> None:
        """Before a lock is sent: what the payer means to lock. A retry of a failed lock starts over."""
        _check_amounts(amount=amount)
        with self._tx() as conn:
            now = self._clock()
            row = conn.execute(
                "SELECT state FROM escrow_locks WHERE payer = ? AND escrow_id = ?", (payer, escrow_id)
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO escrow_locks (payer, escrow_id, contract, amount, state, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, 'intent', ?, ?)",
                    (payer, escrow_id, contract, str(amount), now, now),
                )
                self._audit(conn, "lock.intent", escrow_id, {"payer": payer, "amount": amount})
            elif row[0] == "failed":
                self._move_lock(conn, payer, escrow_id, "failed", "intent", now)

    def lock_signed(self, *, payer: str, escrow_id: str, tx_hash: str) -> None:
        with self._tx() as conn:
            current = self._lock_state(conn, payer, escrow_id)
            if current is not None:
                self._move_lock(conn, payer, escrow_id, current, "sent", self._clock(), tx_hash=tx_hash)

    def lock_outcome(self, *, payer: str, escrow_id: str, outcome: str, tx_hash: str | None) -> None:
        with self._tx() as conn:
            current = self._lock_state(conn, payer, escrow_id)
            if current is not None:
                self._move_lock(conn, payer, escrow_id, current, outcome, self._clock(), tx_hash=tx_hash)
                if outcome != "landed":
                    self._audit(conn, f"lock.{outcome}", escrow_id, {"payer": payer, "tx_hash": tx_hash})

    def lock_state(self, payer: str, escrow_id: str) -> str | None:
        with self._lock:
            return self._lock_state(self._conn, payer, escrow_id)

    def _lock_state(self, conn: sqlite3.Connection, payer: str, escrow_id: str) -> str | None:
        row = conn.execute(
            "SELECT state FROM escrow_locks WHERE payer = ? AND escrow_id = ?", (payer, escrow_id)
        ).fetchone()
        return None if row is None else str(row[0])

    def _move_lock(
        self,
        conn: sqlite3.Connection,
        payer: str,
        escrow_id: str,
        current: str,
        to: str,
        now: int,
        *,
        tx_hash: str | None = None,
        reason: str | None = None,
    ) -> None:
        if to != current and to not in _LOCK_MOVES.get(current, ()):
            raise errors.invariant("lock_transition", f"a lock cannot go from {current} to {to}")
        conn.execute(
            "UPDATE escrow_locks SET state = ?, tx_hash = COALESCE(?, tx_hash), flag_reason = COALESCE(?, flag_reason),"
            " updated_at = ? WHERE payer = ? AND escrow_id = ?",
            (to, tx_hash, reason, now, payer, escrow_id),
        )

    def reconcile_rows(self, *, since: int, limit: int = 256, landed: bool = True) -> list[ReconcileRow]:
        """The escrow rows the reconciliation compares with the chain: every pending claim, release and
        refund, those that landed or failed since ``since``, and the locks not final or changed since
        then; newest first, at most ``limit`` of each source. ``landed=False`` leaves out the rows that
        landed (locks and settlements): on a chain that has not gone back they cannot change."""
        out: list[ReconcileRow] = []
        with self._read() as conn:
            locks = conn.execute(
                "SELECT l.payer, l.escrow_id, l.state, x.lease_id, x.state, l.contract FROM escrow_locks l"
                " LEFT JOIN leases x ON x.escrow_payer = l.payer AND x.escrow_id = l.escrow_id"
                " WHERE l.state IN (?, 'intent', 'sent', 'unknown', 'failed') AND l.updated_at >= ?"
                " ORDER BY l.updated_at DESC LIMIT ?",
                ("landed" if landed else "intent", since, limit),
            ).fetchall()
            for payer, escrow_id, state, lease_id, lease_state, contract in locks:
                out.append(
                    ReconcileRow(
                        source="lock",
                        key=escrow_id,
                        kind="lock",
                        state=state,
                        payer=payer,
                        escrow_id=escrow_id,
                        contract=contract,
                        lease_id=lease_id,
                        lease_open=lease_state == LeaseState.ACTIVE,
                    )
                )
            rows = conn.execute(
                "SELECT s.settlement_id, s.kind, s.state, s.params, s.last_error, s.lease_id, x.settled_amount,"
                " x.escrow_payer, x.state, x.escrow_contract"
                " FROM settlements s LEFT JOIN leases x ON x.lease_id = s.lease_id"
                " WHERE s.kind != 'withdraw' AND (s.state = 'pending' OR"
                " (s.state IN (?, 'failed') AND s.finished_at >= ?))"
                " ORDER BY s.created_at DESC LIMIT ?",
                ("landed" if landed else "failed", since, limit),
            ).fetchall()
            for sid, kind, state, params, last_error, lease_id, settled, lease_payer, lease_state, contract in rows:
                p = json.loads(params)
                payer = str(p.get("payer") or lease_payer or "")
                escrow_id = str(p.get("escrow_id", ""))
                if not payer or not escrow_id:
                    continue
                lock = self._lock_state(conn, payer, escrow_id)
                out.append(
                    ReconcileRow(
                        source="settlement",
                        key=sid,
                        kind=kind,
                        state=state,
                        payer=payer,
                        escrow_id=escrow_id,
                        contract=contract,
                        lease_id=lease_id,
                        lease_open=lease_state == LeaseState.ACTIVE,
                        last_error=last_error,
                        lock_landed=None if lock is None else lock in ("landed", "refunding", "flagged"),
                        booked=int(settled or 0),
                    )
                )
        return out

    def flag_settlement(self, settlement_id: str, *, reason: str) -> Settlement:
        """The chain does not know this settlement's escrow (or its effect): stop retrying, keep it for the operator."""
        with self._tx() as conn:
            current = self._settlement(conn, settlement_id)
            if current.state == "flagged":
                return current
            if current.state not in _SETTLEMENT_MOVES or "flagged" not in _SETTLEMENT_MOVES[current.state]:
                raise errors.invariant(
                    "settlement_transition", f"a settlement cannot go from {current.state} to flagged"
                )
            conn.execute(
                "UPDATE settlements SET state = 'flagged', last_error = ?, finished_at = COALESCE(finished_at, ?)"
                " WHERE settlement_id = ?",
                (reason, self._clock(), settlement_id),
            )
            self._audit(conn, "settlement.flagged", settlement_id, {"from": current.state, "reason": reason})
            return self._settlement(conn, settlement_id)

    def resume_settlement(self, settlement_id: str) -> Settlement:
        """A claim, release or refund that gave up (no escrow then) has its escrow on chain now: queue it again."""
        with self._tx() as conn:
            current = self._settlement(conn, settlement_id)
            if current.state == "pending":
                return current
            if current.kind == "withdraw" or "pending" not in _SETTLEMENT_MOVES.get(current.state, ()):
                raise errors.invariant(
                    "settlement_transition", f"a {current.kind} cannot go from {current.state} back to pending"
                )
            now = self._clock()
            conn.execute(
                "UPDATE settlements SET state = 'pending', next_attempt_at = ?, finished_at = NULL"
                " WHERE settlement_id = ?",
                (now, settlement_id),
            )
            self._audit(conn, "settlement.resumed", settlement_id, {"after": current.last_error})
            return self._settlement(conn, settlement_id)

    def refund_landed_lock(self, payer: str, escrow_id: str) -> Settlement | None:
        """A lock this node did not count as landed is on chain: queue (or resume) its lease's refund.

        Returns the refund, or None when no lease holds this escrow (nothing to refund it under).
        """
        with self._lock:
            row = self._conn.execute(
                "SELECT lease_id FROM leases WHERE escrow_payer = ? AND escrow_id = ?", (payer, escrow_id)
            ).fetchone()
        if row is None:
            return None
        # The refund first, then the lock's move: a crash between leaves the lock to be found again.
        refund = self.enqueue_refund(str(row[0]))
        if refund.state == "failed":
            refund = self.resume_settlement(refund.settlement_id)
        with self._tx() as conn:
            current = self._lock_state(conn, payer, escrow_id)
            if current is not None and current != "refunding":
                self._move_lock(conn, payer, escrow_id, current, "refunding", self._clock())
                self._audit(conn, "lock.landed_unbooked", escrow_id, {"lease_id": row[0], "from": current})
        return refund

    def flag_lock(self, payer: str, escrow_id: str, *, reason: str) -> None:
        with self._tx() as conn:
            current = self._lock_state(conn, payer, escrow_id)
            if current is None or current == "flagged":
                return
            self._move_lock(conn, payer, escrow_id, current, "flagged", self._clock(), reason=reason)
            self._audit(conn, "lock.flagged", escrow_id, {"from": current, "reason": reason})

    _FLAGGED_ESCROWS = (
        "SELECT escrow_id, MIN(at) FROM ("
        " SELECT escrow_id, updated_at AS at FROM escrow_locks WHERE state = 'flagged'"
        " UNION ALL SELECT json_extract(params, '$.escrow_id'), finished_at FROM settlements"
        " WHERE state = 'flagged') WHERE escrow_id IS NOT NULL"
        " AND escrow_id NOT IN (SELECT escrow_id FROM escrow_mismatch_acks)"
        " GROUP BY escrow_id ORDER BY MIN(at), escrow_id"
    )

    def escrow_mismatches(self, *, show: int = 5) -> EscrowMismatches:
        """How many escrows have a flagged lock or settlement the operator has not acknowledged, and the
        first ``show`` ids (truncated)."""
        with self._read() as conn:
            rows = conn.execute(self._FLAGGED_ESCROWS).fetchall()
        ids = [str(escrow_id)[:10] + "…" for escrow_id, _ in rows[:show]]
        return EscrowMismatches(count=len(rows), escrow_ids=ids)

    def acknowledge_mismatches(self) -> int:
        """The operator has looked at every flagged escrow: they stop counting as mismatches (their rows
        stay flagged, and the acknowledgement is audited). Returns how many escrows were acknowledged."""
        with self._tx() as conn:
            ids = [str(row[0]) for row in conn.execute(self._FLAGGED_ESCROWS).fetchall()]
            now = self._clock()
            conn.executemany(
                "INSERT INTO escrow_mismatch_acks (escrow_id, acked_at) VALUES (?, ?)", [(i, now) for i in ids]
            )
            if ids:
                self._audit(conn, "mismatch.acknowledged", "escrow", {"escrow_ids": ids})
        return len(ids)

    # -- audit --

    def verify_audit(self, expected_head: str | None = None) -> audit.AuditReport:
        with self._read() as conn:
            return audit.verify(conn, expected_head)

    def audit_entries(self, *, after_seq: int = 0, limit: int = 100) -> list[audit.AuditEntry]:
        with self._lock:
            return audit.entries(self._conn, after_seq, limit)


_LEASE_COLUMNS = (
    "lease_id, role, provider, consumer, price_per_unit, budget, state, escrow_contract, escrow_payer, escrow_id,"
    " metered_units, settled_amount, refunded_amount, created_at, ended_at"
)
_RECEIPT_COLUMNS = (
    "lease_id, seq, receipt_hash, units, amount, body, provider_sig, consumer_sig, voucher, settled, recorded_at"
)
# The moves a lock row may make (a repeated state is a no-op): sent once signed; landed, failed or
# unknown when the send returns; a failed lock may be tried again; one that landed behind the node's
# back gets its refund queued ("refunding"); one the chain forgot is "flagged" for the operator.
_LOCK_MOVES: dict[str, frozenset[str]] = {
    "intent": frozenset({"sent", "landed", "failed", "unknown", "refunding"}),
    "sent": frozenset({"landed", "failed", "unknown", "refunding"}),
    "unknown": frozenset({"landed", "refunding"}),
    "failed": frozenset({"intent", "refunding"}),
    "landed": frozenset({"flagged"}),
    "refunding": frozenset({"flagged"}),
    "flagged": frozenset(),
}
# The reconciliation's moves of a settlement: any row the chain contradicts is flagged (final); a
# claim, release or refund that gave up is resumed when its escrow turns up on chain.
_SETTLEMENT_MOVES: dict[str, frozenset[str]] = {
    "pending": frozenset({"flagged"}),
    "landed": frozenset({"flagged"}),
    "failed": frozenset({"flagged", "pending"}),
    "flagged": frozenset(),
}

_SETTLEMENT_COLUMNS = (
    "settlement_id, lease_id, kind, amount, params, state, attempts, next_attempt_at, last_error, tx_hash,"
    " created_at, finished_at"
)


def _lease_from_row(row: tuple[Any, ...]) -> Lease:
    escrow = EscrowRef(contract=row[7], payer=row[8], escrow_id=row[9]) if row[7] else None
    return Lease(
        lease_id=row[0],
        role=row[1],
        provider=row[2],
        consumer=row[3],
        price_per_unit=int(row[4]),
        budget=int(row[5]),
        state=row[6],
        escrow=escrow,
        metered_units=row[10],
        settled_amount=int(row[11]),
        refunded_amount=int(row[12]),
        created_at=row[13],
        ended_at=row[14],
    )


def _receipt_from_columns(body: str, provider_sig: str, consumer_sig: str | None, voucher: str | None) -> SignedReceipt:
    return SignedReceipt(
        body=ReceiptBody.model_validate_json(body),
        provider_sig=provider_sig,
        consumer_sig=consumer_sig,
        voucher=voucher,
    )


def _receipt_record(row: tuple[Any, ...]) -> ReceiptRecord:
    return ReceiptRecord(
        lease_id=row[0],
        seq=row[1],
        receipt_hash=row[2],
        units=row[3],
        amount=int(row[4]),
        countersigned=row[7] is not None,
        settled=bool(row[9]),
        recorded_at=row[10],
        receipt=_receipt_from_columns(row[5], row[6], row[7], row[8]),
    )


def _receipt_audit(signed: SignedReceipt) -> dict[str, Any]:
    body = signed.body
    return {"seq": body.seq, "units": body.units, "amount": body.amount, "receipt_hash": body.digest()}


def _settlement_from_row(row: tuple[Any, ...]) -> Settlement:
    return Settlement(
        settlement_id=row[0],
        lease_id=row[1],
        kind=row[2],
        amount=int(row[3]),
        params=json.loads(row[4]),
        state=row[5],
        attempts=row[6],
        next_attempt_at=row[7],
        last_error=row[8],
        tx_hash=row[9],
        created_at=row[10],
        finished_at=row[11],
    )
