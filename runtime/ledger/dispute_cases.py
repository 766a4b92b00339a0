"""A consumer's verification dispute cases, kept until the arbiter answers (issue 21).

A consumer that failed a provider's call with signed evidence writes the case it will send the escrow's
arbiter (the signed ``LeaseDisputeCase`` as JSON, the provider, the arbiter's peer id) before it freezes
the escrow, and deletes it once the arbiter answered or the chain shows the escrow resolved. A consumer
that restarts in between reads the kept cases back and sends them again while the escrow is frozen
(``protocols.lease.arbiter.DisputeRole.resume_cases``), so a frozen escrow does not wait for a person
only because the consumer stopped. The case's JSON is validated by the protocol's model where it is read
back; this is storage (and :func:`held_claims`, the provider's side: claims a freeze holds up).
Bounded: the :data:`MAX_CASES` newest cases are kept, and of those only the newest that add up to
:data:`MAX_CASE_BYTES` (the newest is always kept, whatever its size: a case is read within the dispute
protocol's 16 MiB frame). The case just saved counts as the newest, a re-saved one included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.ledger.store import LedgerStore

MAX_CASES = 64  # the most recent cases kept (a package may be a few MiB: tokens, chunks, text)
MAX_CASE_BYTES = 64 * 1024 * 1024  # their JSON in all (read back into memory at once at a start)


@dataclass(frozen=True)
class CaseRow:
    lease_id: str
    provider: str
    arbiter_peer: str
    case_json: str


def save(store: LedgerStore, row: CaseRow) -> None:
    """Keep a case (blocking; the same lease's case is replaced and counts as new); the oldest beyond the
    bound go, never the case just saved (ranked newest whatever the clock says: a re-saved case kept its
    first ``created_at``, and a clock that stepped back ranks it behind older ones)."""
    with store._tx() as conn:
        conn.execute(
            "INSERT INTO dispute_cases (lease_id, provider, arbiter_peer, case_json, created_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (lease_id) DO UPDATE SET provider = excluded.provider,"
            " arbiter_peer = excluded.arbiter_peer, case_json = excluded.case_json, created_at = excluded.created_at",
            (row.lease_id, row.provider, row.arbiter_peer, row.case_json, store._clock()),
        )
        conn.execute(
            "DELETE FROM dispute_cases WHERE lease_id NOT IN (SELECT lease_id FROM dispute_cases"
            " ORDER BY lease_id = ? DESC, created_at DESC, rowid DESC LIMIT ?)",
            (row.lease_id, MAX_CASES),
        )
        conn.execute(
            "DELETE FROM dispute_cases WHERE lease_id IN (SELECT lease_id FROM (SELECT lease_id,"
            " SUM(length(CAST(case_json AS BLOB))) OVER newest AS kept, ROW_NUMBER() OVER newest AS n"
            " FROM dispute_cases WINDOW newest AS (ORDER BY lease_id = ? DESC, created_at DESC, rowid DESC))"
            " WHERE kept > ? AND n > 1)",
            (row.lease_id, MAX_CASE_BYTES),
        )


def drop(store: LedgerStore, lease_id: str) -> None:
    """Forget a case the arbiter answered (blocking)."""
    with store._tx() as conn:
        conn.execute("DELETE FROM dispute_cases WHERE lease_id = ?", (lease_id,))


def load(store: LedgerStore) -> list[CaseRow]:
    """Every kept case, oldest first (blocking)."""
    with store._read() as conn:
        rows = conn.execute(
            "SELECT lease_id, provider, arbiter_peer, case_json FROM dispute_cases ORDER BY created_at, rowid LIMIT ?",
            (MAX_CASES,),
        ).fetchall()
    return [CaseRow(*row) for row in rows]


def held_claims(store: LedgerStore, limit: int) -> list[str]:
    """The leases whose pending claim a frozen escrow holds up (the settler's last try found it disputed),
    the longest held first, at most ``limit`` (blocking): what a provider takes to the arbiter once the
    payer's time to send a case has passed, however many settlements came after."""
    with store._read() as conn:
        rows = conn.execute(
            "SELECT lease_id FROM settlements WHERE state = 'pending' AND kind = 'claim' AND last_error = 'disputed'"
            " AND lease_id IS NOT NULL GROUP BY lease_id ORDER BY MIN(created_at), lease_id LIMIT ?",
            (limit,),
        ).fetchall()
    return [row[0] for row in rows]
