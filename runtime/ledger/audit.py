"""The audit log: an append-only hash chain of market events.

Entry n stores ``prev_hash`` (entry n-1's hash; 64 zeros for the first) and
``hash = sha256(canonical({seq, at, kind, subject, data, prev_hash}))``. Changing, removing or
reordering any entry breaks every later link, so ``verify`` finds the first bad one; the head
hash is what can be anchored elsewhere (on chain) to pin the whole history, which also catches a
truncated tail.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from pydantic import BaseModel

from runtime.ledger.canonical import canonical_bytes, sha256_hex

GENESIS_HASH = "0" * 64


class AuditReport(BaseModel):
    ok: bool
    entries: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str | None = None


class AuditEntry(BaseModel):
    seq: int
    at: int
    kind: str
    subject: str
    data: dict[str, Any]
    prev_hash: str
    hash: str


def entry_hash(seq: int, at: int, kind: str, subject: str, data: dict[str, Any], prev_hash: str) -> str:
    return sha256_hex(
        canonical_bytes({"seq": seq, "at": at, "kind": kind, "subject": subject, "data": data, "prev_hash": prev_hash})
    )


def append(conn: sqlite3.Connection, at: int, kind: str, subject: str, data: dict[str, Any]) -> str:
    """Append one entry inside the caller's transaction; returns its hash."""
    row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev_hash = (row[0] + 1, row[1]) if row else (1, GENESIS_HASH)
    digest = entry_hash(seq, at, kind, subject, data, prev_hash)
    conn.execute(
        "INSERT INTO audit (seq, at, kind, subject, data, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (seq, at, kind, subject, canonical_bytes(data).decode(), prev_hash, digest),
    )
    return digest


def verify(conn: sqlite3.Connection, expected_head: str | None = None) -> AuditReport:
    """Recompute the chain from the first entry; ``expected_head`` (an anchored hash) also catches truncation."""
    prev_hash = GENESIS_HASH
    expected_seq = 1
    count = 0
    for seq, at, kind, subject, data_text, stored_prev, stored_hash in conn.execute(
        "SELECT seq, at, kind, subject, data, prev_hash, hash FROM audit ORDER BY seq"
    ):
        if seq != expected_seq:
            return _bad(count, prev_hash, expected_seq, "an entry is missing")
        if stored_prev != prev_hash:
            return _bad(count, prev_hash, seq, "the link to the previous entry is broken")
        try:
            data = json.loads(data_text)
        except ValueError:
            return _bad(count, prev_hash, seq, "the entry's data is unreadable")
        if not isinstance(data, dict) or entry_hash(seq, at, kind, subject, data, prev_hash) != stored_hash:
            return _bad(count, prev_hash, seq, "the entry's content does not match its hash")
        prev_hash = stored_hash
        expected_seq += 1
        count += 1
    if expected_head is not None and expected_head != prev_hash:
        return _bad(count, prev_hash, None, "the head does not match the anchored hash")
    return AuditReport(ok=True, entries=count, head_hash=prev_hash)


def _bad(count: int, head: str, seq: int | None, problem: str) -> AuditReport:
    return AuditReport(ok=False, entries=count, head_hash=head, first_bad_seq=seq, problem=problem)


def entries(conn: sqlite3.Connection, after_seq: int = 0, limit: int = 100) -> list[AuditEntry]:
    rows = conn.execute(
        "SELECT seq, at, kind, subject, data, prev_hash, hash FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
        (after_seq, limit),
    ).fetchall()
    return [
        AuditEntry(seq=r[0], at=r[1], kind=r[2], subject=r[3], data=json.loads(r[4]), prev_hash=r[5], hash=r[6])
        for r in rows
    ]
