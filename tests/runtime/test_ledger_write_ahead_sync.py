"""The write-ahead row (``reserve_call``) is committed without an fsync, and only it: every other
commit of the ledger stays fsynced (``synchronous = FULL``), also after a write-ahead row the store
refused. A process crash keeping the row is shown by tests/test_settlement_crash.py (SIGKILL)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.errors import ErrorCode
from runtime.ledger import LeaseOpen, LedgerError, LedgerStore
from tests.runtime.support import peer_id, peer_key

FULL, NORMAL = 2, 1


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LedgerStore]:
    opened = LedgerStore.open(tmp_path / "ledger.db")
    opened.open_lease(
        LeaseOpen(
            lease_id="lease-1",
            role="provider",
            provider=peer_id(peer_key("provider")),
            consumer=peer_id(peer_key("consumer")),
            price_per_unit=3,
            budget=10**6,
        ),
        idempotency_key="open-1",
    )
    yield opened
    opened.close()


def _sync_levels(store: LedgerStore) -> list[int]:
    """The connection's ``synchronous`` level at each statement it runs (a recording connection)."""
    levels: list[int] = []
    conn = store._conn

    def trace(statement: str) -> None:
        if statement in ("COMMIT", "BEGIN IMMEDIATE"):
            levels.append(conn.execute("PRAGMA synchronous").fetchone()[0])

    conn.set_trace_callback(trace)
    return levels


def test_only_the_write_ahead_row_commits_without_an_fsync(store: LedgerStore) -> None:
    levels = _sync_levels(store)
    store.reserve_call("lease-1", "call-1", reserved_units=10)
    assert levels == [NORMAL, NORMAL], "the write-ahead row waited for the disk"
    levels.clear()
    store.settle_call("lease-1", "call-1", units=7)  # money: fsynced as before
    assert levels == [FULL, FULL]
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == FULL
    assert store.pending_calls() == []


def test_a_refused_write_ahead_row_leaves_the_ledger_fsynced(store: LedgerStore) -> None:
    store.reserve_call("lease-1", "call-1", reserved_units=10)
    with pytest.raises(LedgerError) as refused:
        store.reserve_call("lease-1", "call-1", reserved_units=10)  # the same call twice
    assert refused.value.code == ErrorCode.CONFLICT
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == FULL
    store._conn.execute("BEGIN IMMEDIATE")  # another writer holds the file: BEGIN itself fails
    try:
        other = sqlite3.connect(store._conn.execute("PRAGMA database_list").fetchone()[2], timeout=0)
        try:
            with pytest.raises(sqlite3.OperationalError):
                LedgerStore(other, lambda: 0).reserve_call("lease-1", "call-2", reserved_units=10)
            assert other.execute("PRAGMA synchronous").fetchone()[0] != NORMAL
        finally:
            other.close()
    finally:
        store._conn.execute("ROLLBACK")
