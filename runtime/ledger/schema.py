"""The ledger's schema as an ordered list of migrations; ``PRAGMA user_version`` is the version.

A migration runs in the same transaction as the version bump, so a crash leaves the database at
the old version or the new one, never between. Never edit a released migration: append one.
Amounts are TEXT holding a decimal integer, because SQLite's INTEGER stops at 2**63-1 wei (about
9.2 ETH); sums are done in Python.
"""

from __future__ import annotations

import sqlite3

from runtime.errors import ErrorCode
from runtime.ledger.errors import LedgerError

MIGRATIONS: tuple[str, ...] = (
    # 1: the initial schema
    """
    CREATE TABLE leases (
        lease_id TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('provider', 'consumer')),
        provider TEXT NOT NULL,
        consumer TEXT NOT NULL,
        price_per_unit TEXT NOT NULL,
        budget TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('open', 'ended', 'disputed', 'closed')),
        escrow_contract TEXT,
        escrow_payer TEXT,
        escrow_id TEXT,
        metered_units INTEGER NOT NULL DEFAULT 0,
        settled_amount TEXT NOT NULL DEFAULT '0',
        refunded_amount TEXT NOT NULL DEFAULT '0',
        created_at INTEGER NOT NULL,
        ended_at INTEGER
    );
    CREATE TABLE usage (
        usage_id INTEGER PRIMARY KEY,
        lease_id TEXT NOT NULL REFERENCES leases(lease_id),
        units INTEGER NOT NULL CHECK (units > 0),
        cumulative_units INTEGER NOT NULL,
        recorded_at INTEGER NOT NULL
    );
    CREATE TABLE receipts (
        lease_id TEXT NOT NULL REFERENCES leases(lease_id),
        seq INTEGER NOT NULL,
        receipt_hash TEXT NOT NULL UNIQUE,
        units INTEGER NOT NULL,
        amount TEXT NOT NULL,
        body TEXT NOT NULL,
        provider_sig TEXT NOT NULL,
        consumer_sig TEXT,
        voucher TEXT,
        settled INTEGER NOT NULL DEFAULT 0,
        recorded_at INTEGER NOT NULL,
        PRIMARY KEY (lease_id, seq),
        -- the schema itself refuses to count a receipt without both signatures as settled
        CHECK (settled = 0 OR consumer_sig IS NOT NULL)
    );
    CREATE TABLE settlements (
        settlement_id TEXT PRIMARY KEY,
        lease_id TEXT REFERENCES leases(lease_id),
        kind TEXT NOT NULL CHECK (kind IN ('claim', 'release', 'refund', 'withdraw')),
        amount TEXT NOT NULL,
        params TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'landed', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        last_error TEXT,
        tx_hash TEXT,
        created_at INTEGER NOT NULL,
        finished_at INTEGER
    );
    CREATE INDEX settlements_due ON settlements (state, next_attempt_at);
    CREATE TABLE money (
        entry_id TEXT PRIMARY KEY,
        lease_id TEXT NOT NULL REFERENCES leases(lease_id),
        peer TEXT NOT NULL,
        direction TEXT NOT NULL CHECK (direction IN ('income', 'spend')),
        amount TEXT NOT NULL,
        day TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE INDEX money_day ON money (day);
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('creator', 'worker')),
        counterparty TEXT,
        state TEXT NOT NULL,
        budget TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE disputes (
        dispute_id TEXT PRIMARY KEY,
        lease_id TEXT NOT NULL REFERENCES leases(lease_id),
        opened_by TEXT NOT NULL,
        reason TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('dispute_open', 'dispute_resolved', 'dispute_rejected')),
        to_payee TEXT,
        to_payer TEXT,
        created_at INTEGER NOT NULL,
        resolved_at INTEGER
    );
    CREATE TABLE idempotency (
        key TEXT PRIMARY KEY,
        operation TEXT NOT NULL,
        request_sha256 TEXT NOT NULL,
        response TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        data TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    -- append-only: rows can be added, never changed or removed (verify() catches edits made
    -- behind SQLite's back)
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    """,
    # 2: the signed terms of the leases this node serves, so a restarted provider keeps serving them
    # (the grant names only the access token's sha256, never the token)
    """
    CREATE TABLE lease_grants (
        lease_id TEXT PRIMARY KEY REFERENCES leases(lease_id),
        grant_json TEXT NOT NULL,
        updated_at INTEGER NOT NULL
    );
    """,
    # 3: evidence the parties sent into a task's dispute, kept by both parties and by the arbiter
    # that decides on it (a piece is a note and an attachment of at most 64 KiB, with the sender's
    # signed envelope naming the attachment's sha256)
    """
    CREATE TABLE dispute_evidence (
        task_id TEXT NOT NULL,
        evidence_id TEXT NOT NULL,
        submitted_by TEXT NOT NULL,
        note TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        attachment BLOB NOT NULL,
        envelope TEXT NOT NULL,
        submitted_at INTEGER NOT NULL,
        PRIMARY KEY (task_id, evidence_id)
    );
    """,
    # 4: the write-ahead meter: a provider writes one row per call before any of it leaves (the units the
    # call reserved) and settles it into usage, in one transaction, when the call ends; a row left by a
    # crash is settled at the next start (``LedgerStore.settle_pending_calls``)
    """
    CREATE TABLE pending_calls (
        lease_id TEXT NOT NULL REFERENCES leases(lease_id),
        call_id TEXT NOT NULL,
        reserved_units INTEGER NOT NULL CHECK (reserved_units >= 0),
        created_at INTEGER NOT NULL,
        PRIMARY KEY (lease_id, call_id)
    );
    """,
    # 5: the chain reconciliation (issue 15). A lock is recorded before it is sent (escrow_locks: what the
    # payer meant to lock, then what became of it), and a settlement the chain does not know can be
    # "flagged": it is no longer retried and waits for the operator. SQLite cannot widen a CHECK, so the
    # settlements table is rebuilt with its rows kept as they are.
    """
    CREATE TABLE escrow_locks (
        payer TEXT NOT NULL,
        escrow_id TEXT NOT NULL,
        contract TEXT NOT NULL,
        amount TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('intent', 'sent', 'unknown', 'landed', 'failed', 'refunding', 'flagged')),
        tx_hash TEXT,
        flag_reason TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (payer, escrow_id)
    );
    CREATE INDEX escrow_locks_updated ON escrow_locks (updated_at);
    CREATE TABLE settlements_v5 (
        settlement_id TEXT PRIMARY KEY,
        lease_id TEXT REFERENCES leases(lease_id),
        kind TEXT NOT NULL CHECK (kind IN ('claim', 'release', 'refund', 'withdraw')),
        amount TEXT NOT NULL,
        params TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'landed', 'failed', 'flagged')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL,
        last_error TEXT,
        tx_hash TEXT,
        created_at INTEGER NOT NULL,
        finished_at INTEGER
    );
    INSERT INTO settlements_v5 SELECT settlement_id, lease_id, kind, amount, params, state, attempts, next_attempt_at,
        last_error, tx_hash, created_at, finished_at FROM settlements;
    DROP TABLE settlements;
    ALTER TABLE settlements_v5 RENAME TO settlements;
    CREATE INDEX settlements_due ON settlements (state, next_attempt_at);
    CREATE INDEX settlements_finished ON settlements (finished_at);
    """,
    # 6: the operator's acknowledgement of flagged escrows (``clawnode ledger ack-mismatches``): the rows stay
    # flagged, the escrow no longer counts as a mismatch (gauge, alert, status)
    """
    CREATE TABLE escrow_mismatch_acks (
        escrow_id TEXT PRIMARY KEY,
        acked_at INTEGER NOT NULL
    );
    """,
    # 7: one vocabulary with the task machine (runtime/ledger/vocabulary.py): our side of a task is
    # 'creator' or 'bidder' (was 'worker'), and the state is one of the machine's. The table is rebuilt
    # (SQLite cannot change a CHECK), its rows kept with 'worker' rewritten to 'bidder'; the audit chain
    # keeps the words it was written with.
    """
    CREATE TABLE tasks_v7 (
        task_id TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('creator', 'bidder')),
        counterparty TEXT,
        state TEXT NOT NULL
            CHECK (state IN ('task_open', 'task_awarded', 'task_closed', 'task_cancelled', 'task_expired')),
        budget TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    INSERT INTO tasks_v7 SELECT task_id, CASE role WHEN 'worker' THEN 'bidder' ELSE role END, counterparty, state,
        budget, created_at, updated_at FROM tasks;
    DROP TABLE tasks;
    ALTER TABLE tasks_v7 RENAME TO tasks;
    """,
    # 8: one vocabulary with the lease machine (runtime/ledger/vocabulary.py): a lease row's state is one
    # of the machine's, the subset a ledger row takes: 'open' -> 'lease_active', 'ended' -> 'lease_ended',
    # 'disputed' -> 'lease_ended' (the machine's freeze: a disputed escrow ends the lease; the dispute is
    # its own row in disputes), 'closed' -> 'lease_settled'. The table is rebuilt (SQLite cannot change a
    # CHECK) with its rows and the references to it kept (``migrate`` runs with foreign keys off and checks
    # them before the commit); the audit chain keeps the words it was written with.
    """
    CREATE TABLE leases_v8 (
        lease_id TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('provider', 'consumer')),
        provider TEXT NOT NULL,
        consumer TEXT NOT NULL,
        price_per_unit TEXT NOT NULL,
        budget TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('lease_active', 'lease_ended', 'lease_settled')),
        escrow_contract TEXT,
        escrow_payer TEXT,
        escrow_id TEXT,
        metered_units INTEGER NOT NULL DEFAULT 0,
        settled_amount TEXT NOT NULL DEFAULT '0',
        refunded_amount TEXT NOT NULL DEFAULT '0',
        created_at INTEGER NOT NULL,
        ended_at INTEGER
    );
    INSERT INTO leases_v8 SELECT lease_id, role, provider, consumer, price_per_unit, budget,
        CASE state WHEN 'open' THEN 'lease_active' WHEN 'ended' THEN 'lease_ended' WHEN 'disputed' THEN 'lease_ended'
            WHEN 'closed' THEN 'lease_settled' END,
        escrow_contract, escrow_payer, escrow_id, metered_units, settled_amount, refunded_amount, created_at, ended_at
        FROM leases;
    DROP TABLE leases;
    ALTER TABLE leases_v8 RENAME TO leases;
    """,
    # 9: payment channels (issue 20): one escrow per consumer-provider pair that many leases draw on
    # (runtime/ledger/channels.py). channel_leases says where each lease starts on its channel's
    # cumulative voucher line; it is written before the lease row (no reference to leases), so a crash
    # between the two leaves an orphan row that matches no lease, never a channel lease taken for a plain one.
    """
    CREATE TABLE channels (
        channel_id TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('provider', 'consumer')),
        peer TEXT NOT NULL,
        contract TEXT NOT NULL,
        payer TEXT NOT NULL,
        payee TEXT NOT NULL,
        salt TEXT,
        amount TEXT NOT NULL,
        deadline INTEGER NOT NULL,
        dispute_window INTEGER NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('channel_opening', 'channel_open', 'channel_closing', 'channel_closed', 'channel_failed')),
        refunded TEXT NOT NULL DEFAULT '0',
        last_used_at INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        closed_at INTEGER
    );
    CREATE INDEX channels_peer ON channels (role, peer, state);
    CREATE TABLE channel_leases (
        lease_id TEXT PRIMARY KEY,
        channel_id TEXT NOT NULL REFERENCES channels(channel_id),
        base TEXT NOT NULL
    );
    CREATE INDEX channel_leases_channel ON channel_leases (channel_id);
    """,
    # 10: verified inference (issue 21): this node's checks of each provider, so a provider caught
    # before a restart stays caught (runtime/ledger/verifications.py; bounded there).
    """
    CREATE TABLE verifications (
        provider TEXT PRIMARY KEY,
        passed INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        unverifiable INTEGER NOT NULL DEFAULT 0,
        last_reason TEXT NOT NULL DEFAULT '',
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX verifications_updated ON verifications (updated_at);
    """,
    # 11: a consumer's verification dispute cases, kept until the arbiter answers, so a consumer that
    # restarts between the escrow's freeze and the arbiter's answer sends its case again
    # (runtime/ledger/dispute_cases.py; bounded there).
    """
    CREATE TABLE dispute_cases (
        lease_id TEXT PRIMARY KEY,
        provider TEXT NOT NULL,
        arbiter_peer TEXT NOT NULL,
        case_json TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    """,
    # 12: an arbiter's re-runs of lease dispute cases, so a restart does not grant each lease (and each
    # peer) its re-runs again (runtime/ledger/reruns.py; bounded there); disputes found by their lease
    # (Ledger.disputes_of) without scanning the table.
    """
    CREATE TABLE dispute_reruns (
        lease_id TEXT PRIMARY KEY,
        reruns INTEGER NOT NULL,
        seq INTEGER NOT NULL
    );
    CREATE INDEX dispute_reruns_seq ON dispute_reruns (seq);
    CREATE TABLE dispute_rerun_peers (
        peer TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE INDEX dispute_rerun_peers_peer ON dispute_rerun_peers (peer);
    CREATE INDEX disputes_lease ON disputes (lease_id);
    """,
)

LATEST_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to ``LATEST_VERSION``; returns the version found before."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > LATEST_VERSION:
        raise LedgerError(
            ErrorCode.CONFLICT,
            "schema_too_new",
            f"the ledger has schema version {found}; this clawnode knows up to {LATEST_VERSION}",
        )
    # A migration may rebuild a table others reference (SQLite cannot change a CHECK): foreign keys are off
    # while it runs (the pragma is a no-op inside a transaction) and checked before its commit.
    foreign_keys = int(conn.execute("PRAGMA foreign_keys").fetchone()[0])
    conn.execute("PRAGMA foreign_keys = OFF")
    try:
        for version in range(found + 1, LATEST_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(MIGRATIONS[version - 1]):
                    conn.execute(statement)
                if conn.execute("PRAGMA foreign_key_check").fetchone() is not None:
                    raise LedgerError(
                        ErrorCode.INTERNAL, "migration_broke_references", f"migration {version} broke a reference"
                    )
                conn.execute(f"PRAGMA user_version = {version}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    finally:
        conn.execute(f"PRAGMA foreign_keys = {foreign_keys}")
    return found


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit our transaction)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements
