"""Verified inference's outcomes per provider, as this node's checks found them (issue 21).

One row per provider (checks passed, failed, unverifiable, the last failure's stable reason), written
after each check and read back at start, so a provider caught before a restart stays caught. Bounded:
the :data:`MAX_PROVIDERS` most recently checked providers are kept. The decisions (a failure's
consequences, the standing the router ranks by) are ``protocols/machines/verify.py``; this is storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.ledger.store import LedgerStore

MAX_PROVIDERS = 4096


@dataclass(frozen=True)
class VerificationRow:
    provider: str
    passed: int
    failed: int
    unverifiable: int
    last_reason: str


def save(store: LedgerStore, row: VerificationRow) -> None:
    """Write a provider's counts (blocking); the oldest rows beyond the bound go."""
    with store._tx() as conn:
        conn.execute(
            "INSERT INTO verifications (provider, passed, failed, unverifiable, last_reason, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (provider) DO UPDATE SET passed = excluded.passed,"
            " failed = excluded.failed, unverifiable = excluded.unverifiable,"
            " last_reason = excluded.last_reason, updated_at = excluded.updated_at",
            (row.provider, row.passed, row.failed, row.unverifiable, row.last_reason[:64], store._clock()),
        )
        conn.execute(
            "DELETE FROM verifications WHERE provider NOT IN"
            " (SELECT provider FROM verifications ORDER BY updated_at DESC, rowid DESC LIMIT ?)",
            (MAX_PROVIDERS,),
        )


def load(store: LedgerStore) -> list[VerificationRow]:
    """Every kept row, least recently checked first (blocking)."""
    with store._read() as conn:
        rows = conn.execute(
            "SELECT provider, passed, failed, unverifiable, last_reason FROM verifications"
            " ORDER BY updated_at, rowid LIMIT ?",
            (MAX_PROVIDERS,),
        ).fetchall()
    return [VerificationRow(*row) for row in rows]
