"""The ledger: durable SQLite, one transaction per change, idempotency keys, a tamper-evident audit chain."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import ErrorCode
from runtime.ledger import EscrowRef, LeaseOpen, Ledger, LedgerError, LedgerStore
from runtime.ledger.schema import LATEST_VERSION, MIGRATIONS, _statements
from runtime.ledger.vocabulary import BIDDER, LeaseState, TaskState
from tests.runtime.support import peer_id, peer_key, receipt_key_of

PROVIDER, CONSUMER = peer_key("provider"), peer_key("consumer")


def _lease(lease_id: str = "lease-1", *, budget: int = 10**6) -> LeaseOpen:
    return LeaseOpen(
        lease_id=lease_id,
        role="provider",
        provider=peer_id(PROVIDER),
        consumer=peer_id(CONSUMER),
        price_per_unit=3,
        budget=budget,
    )


async def test_file_is_wal_durable_and_migrated_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = await Ledger.open(path)
    await ledger.open_lease(_lease(), idempotency_key="k1")
    await ledger.aclose()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    conn.close()
    reopened = await Ledger.open(path)  # migrating again must not touch existing data
    assert (await reopened.get_lease("lease-1")).budget == 10**6
    await reopened.aclose()


def test_a_newer_schema_is_refused_not_downgraded(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    LedgerStore.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerError) as caught:
        LedgerStore.open(path)
    assert caught.value.reason == "schema_too_new"
    assert str(tmp_path) not in caught.value.message


async def test_idempotency_key_makes_a_retry_harmless(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.db")
    await ledger.open_lease(_lease(), idempotency_key="open-1")
    again = await ledger.open_lease(_lease(), idempotency_key="open-1")
    assert again.lease_id == "lease-1"
    first = await ledger.record_usage("lease-1", writer=peer_id(PROVIDER), units=7, idempotency_key="u-1")
    retry = await ledger.record_usage("lease-1", writer=peer_id(PROVIDER), units=7, idempotency_key="u-1")
    assert first == retry
    assert (await ledger.get_lease("lease-1")).metered_units == 7  # counted once
    # The same key for a different request is a conflict, not a silent success.
    with pytest.raises(LedgerError) as caught:
        await ledger.record_usage("lease-1", writer=peer_id(PROVIDER), units=8, idempotency_key="u-1")
    assert (caught.value.code, caught.value.reason) == (ErrorCode.CONFLICT, "idempotency_key_reused")
    # Without the key, opening the same lease twice is refused.
    with pytest.raises(LedgerError) as caught:
        await ledger.open_lease(_lease(), idempotency_key="open-2")
    assert caught.value.reason == "lease_exists"
    assert [e.kind for e in await ledger.audit_entries()] == ["lease.opened"]


async def test_a_failed_change_leaves_nothing_behind(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.db")
    await ledger.open_lease(_lease(budget=30), idempotency_key="open")
    await ledger.record_usage("lease-1", writer=peer_id(PROVIDER), units=10, idempotency_key="u1")
    before = await ledger.audit_entries()
    with pytest.raises(LedgerError):
        await ledger.record_usage("lease-1", writer=peer_id(PROVIDER), units=1, idempotency_key="u2")
    # Nothing of the refused change: no usage row, no idempotency record, no audit entry.
    assert (await ledger.get_lease("lease-1")).metered_units == 10
    assert await ledger.audit_entries() == before
    conn = ledger.store._conn
    assert conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 1
    assert conn.execute("SELECT COUNT(*) FROM idempotency WHERE key = 'u2'").fetchone()[0] == 0


async def test_concurrent_callers_are_serialised_without_losing_writes(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.db")
    await ledger.open_lease(_lease(), idempotency_key="open")

    async def meter(i: int) -> None:
        await ledger.record_usage("lease-1", writer=peer_id(PROVIDER), units=1, idempotency_key=f"u{i}")

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(meter, i)
    assert (await ledger.get_lease("lease-1")).metered_units == 50
    report = await ledger.verify_audit()
    assert report.ok


async def test_audit_chain_verifies_and_detects_tampering(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = await Ledger.open(path)
    for i in range(5):
        await ledger.open_lease(_lease(f"lease-{i}"), idempotency_key=f"open-{i}")
    report = await ledger.verify_audit()
    assert report.ok and report.entries == 5
    await ledger.aclose()

    conn = sqlite3.connect(path)
    # Edits through SQL are refused outright.
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit SET data = '{}' WHERE seq = 3")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit WHERE seq = 5")
    # Someone with the file drops the guard and edits an entry: verify names it.
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET data = replace(data, '1000000', '9000000') WHERE seq = 3")
    conn.commit()
    store = LedgerStore.open(path)
    report = store.verify_audit()
    assert not report.ok and report.first_bad_seq == 3
    conn.execute("UPDATE audit SET data = replace(data, '9000000', '1000000') WHERE seq = 3")
    conn.commit()
    assert store.verify_audit().ok
    # Removing an entry in the middle breaks the chain there.
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute("DELETE FROM audit WHERE seq = 2")
    conn.commit()
    report = store.verify_audit()
    assert not report.ok and report.first_bad_seq == 2
    conn.close()
    store.close()


async def test_anchored_head_catches_a_truncated_tail(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = await Ledger.open(path)
    for i in range(3):
        await ledger.open_lease(_lease(f"lease-{i}"), idempotency_key=f"open-{i}")
    head = (await ledger.verify_audit()).head_hash
    await ledger.aclose()
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute("DELETE FROM audit WHERE seq = 3")
    conn.commit()
    conn.close()
    store = LedgerStore.open(path)
    assert store.verify_audit().ok  # a clean prefix is still a valid chain...
    report = store.verify_audit(expected_head=head)
    assert not report.ok  # ...but not the one that was anchored
    store.close()


async def test_task_transitions_follow_the_table(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.db")
    task = await ledger.create_task("t1", role=BIDDER, counterparty=None, budget=50, idempotency_key="t1")
    assert (task.role, task.state) == ("bidder", "task_open")
    await ledger.set_task_state("t1", TaskState.AWARDED, idempotency_key="t1-award")
    await ledger.set_task_state("t1", TaskState.AWARDED, idempotency_key="t1-award")  # a retry
    for refused in (TaskState.CANCELLED, TaskState.OPEN, TaskState.AWARDED):  # not moves of the table
        with pytest.raises(LedgerError) as caught:
            await ledger.set_task_state("t1", refused, idempotency_key=f"t1-{refused}")
        assert (caught.value.code, caught.value.reason) == (ErrorCode.CONFLICT, "bad_transition")
    assert (await ledger.set_task_state("t1", TaskState.CLOSED, idempotency_key="t1-close")).state == "task_closed"
    with pytest.raises(LedgerError):  # a terminal state moves nowhere
        await ledger.set_task_state("t1", TaskState.EXPIRED, idempotency_key="t1-expire")
    await ledger.aclose()


async def test_a_v6_ledger_with_tasks_migrates_to_the_machine_words(tmp_path: Path) -> None:
    """A ledger written before schema v7 stored our side of a task as 'worker': it reads back as the task
    machine's 'bidder', its state and audit chain intact, and the schema then refuses the old word."""
    path = tmp_path / "ledger.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:6]:
        for statement in _statements(script):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 6")
    conn.executemany(
        "INSERT INTO tasks (task_id, role, counterparty, state, budget, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, 1, 2)",
        [("t-worker", "worker", "peer-a", "task_awarded", "70"), ("t-creator", "creator", None, "task_open", "90")],
    )
    conn.close()
    ledger = await Ledger.open(path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    worker = await ledger.set_task_state("t-worker", TaskState.CLOSED, idempotency_key="close")
    assert (worker.role, worker.counterparty, worker.state, worker.budget) == ("bidder", "peer-a", "task_closed", 70)
    creator = await ledger.set_task_state("t-creator", TaskState.EXPIRED, idempotency_key="expire")
    assert (creator.role, creator.state, creator.budget) == ("creator", "task_expired", 90)
    assert (await ledger.verify_audit()).ok
    await ledger.aclose()
    with pytest.raises(sqlite3.IntegrityError):
        sqlite3.connect(path).execute(
            "INSERT INTO tasks (task_id, role, counterparty, state, budget, created_at, updated_at)"
            " VALUES ('t3', 'worker', NULL, 'task_open', '1', 1, 1)"
        )


async def test_disputes_are_recorded_once_and_only_by_parties(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.db")
    await ledger.open_lease(_lease(), idempotency_key="open")
    with pytest.raises(LedgerError) as caught:
        await ledger.open_dispute("lease-1", opened_by=peer_id(peer_key("x")), reason="?", idempotency_key="d0")
    assert caught.value.code == ErrorCode.FORBIDDEN
    dispute = await ledger.open_dispute(
        "lease-1", opened_by=peer_id(CONSUMER), reason="bad output", idempotency_key="d1"
    )
    assert (
        await ledger.open_dispute("lease-1", opened_by=peer_id(CONSUMER), reason="bad output", idempotency_key="d1")
    ) == dispute
    assert (await ledger.get_lease("lease-1")).state == "lease_ended"
    resolved = await ledger.resolve_dispute(dispute.dispute_id, to_payee=10, to_payer=10**6 - 10, idempotency_key="r1")
    assert (resolved.state, resolved.to_payee, resolved.to_payer) == ("dispute_resolved", 10, 10**6 - 10)
    assert len(await ledger.list_disputes()) == 1


async def test_a_lease_s_dispute_is_found_however_many_newer_disputes_there_are(tmp_path: Path) -> None:
    """The arbiter role finds a lease's open dispute by the lease (``disputes_of``): it read the newest
    1,000 disputes, and a lease disputed before those was taken for one without a dispute."""
    ledger = await Ledger.open(tmp_path / "ledger.db")
    for n in range(4):
        await ledger.open_lease(_lease(f"lease-{n}"), idempotency_key=f"open{n}")
        await ledger.open_dispute(f"lease-{n}", opened_by=peer_id(CONSUMER), reason="r", idempotency_key=f"d{n}")
    found = await ledger.disputes_of("lease-0")
    assert [(d.lease_id, d.state) for d in found] == [("lease-0", "dispute_open")]
    assert await ledger.disputes_of("lease-none") == []
    await ledger.aclose()


async def test_a_disputed_lease_is_ended_and_cannot_be_disputed_again(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.db")
    await ledger.open_lease(_lease(), idempotency_key="open")
    await ledger.open_dispute("lease-1", opened_by=peer_id(CONSUMER), reason="bad output", idempotency_key="d1")
    for write in (
        lambda: ledger.open_dispute("lease-1", opened_by=peer_id(PROVIDER), reason="no", idempotency_key="d2"),
        lambda: ledger.end_lease("lease-1", idempotency_key="end"),
        lambda: ledger.record_usage("lease-1", writer=peer_id(PROVIDER), units=1, idempotency_key="u1"),
    ):
        with pytest.raises(LedgerError) as caught:
            await write()
        assert caught.value.code == ErrorCode.CONFLICT
    assert (await ledger.get_lease("lease-1")).state == "lease_ended"
    await ledger.aclose()


def test_a_lease_move_not_in_the_machine_table_is_refused_at_write_time(store: LedgerStore) -> None:
    """The pair assertion: whatever asks, the store writes a lease state only along the lease machine's moves
    (runtime/ledger/vocabulary.py), and only states a ledger row takes."""
    store.open_lease(_lease(), idempotency_key="open")
    store.end_lease("lease-1", idempotency_key="end")
    for to in (LeaseState.ACTIVE, LeaseState.PAUSED, LeaseState.QUOTED):
        with pytest.raises(LedgerError) as caught, store._tx() as conn:
            store._move_lease(conn, store.get_lease("lease-1"), to)
        assert (caught.value.code, caught.value.reason) == (ErrorCode.INTERNAL, "invariant_lease_transition")
        assert store.get_lease("lease-1").state == "lease_ended"


async def test_a_v7_ledger_with_leases_migrates_to_the_machine_words(tmp_path: Path) -> None:
    """A ledger written before schema v8 stored open/ended/disputed/closed: each lease reads back in the lease
    machine's words, the rows that reference it intact and still checked, an open one still metered."""
    path = tmp_path / "ledger.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:7]:
        for statement in _statements(script):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 7")
    provider, consumer = peer_id(PROVIDER), peer_id(CONSUMER)
    for lease_id, state in (("l-open", "open"), ("l-ended", "ended"), ("l-disp", "disputed"), ("l-closed", "closed")):
        conn.execute(
            "INSERT INTO leases (lease_id, role, provider, consumer, price_per_unit, budget, state, metered_units,"
            " created_at) VALUES (?, 'provider', ?, ?, '3', '1000', ?, 2, 1)",
            (lease_id, provider, consumer, state),
        )
        conn.execute(
            "INSERT INTO usage (lease_id, units, cumulative_units, recorded_at) VALUES (?, 2, 2, 1)", (lease_id,)
        )
    conn.execute(
        "INSERT INTO disputes (dispute_id, lease_id, opened_by, reason, state, created_at)"
        " VALUES ('l-disp/dispute', 'l-disp', ?, 'bad', 'dispute_open', 1)",
        (consumer,),
    )
    conn.close()
    ledger = await Ledger.open(path)
    states = {lease.lease_id: lease.state for lease in await ledger.list_leases()}
    assert states == {
        "l-open": "lease_active",
        "l-ended": "lease_ended",
        "l-disp": "lease_ended",
        "l-closed": "lease_settled",
    }
    assert [lease.lease_id for lease, _ in ledger.store.open_leases()] == ["l-open"]
    recorded = await ledger.record_usage("l-open", writer=provider, units=3, idempotency_key="u")
    assert recorded.cumulative_units == 5
    resolved = await ledger.resolve_dispute("l-disp/dispute", to_payee=6, to_payer=994, idempotency_key="r")
    assert resolved.state == "dispute_resolved" and (await ledger.get_lease("l-disp")).state == "lease_settled"
    await ledger.aclose()
    check = sqlite3.connect(path)
    assert check.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 5
    assert check.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    check.execute("PRAGMA foreign_keys = ON")
    assert check.execute("PRAGMA foreign_key_check").fetchall() == []
    with pytest.raises(sqlite3.IntegrityError):  # the references still point at the rebuilt table
        check.execute("INSERT INTO usage (lease_id, units, cumulative_units, recorded_at) VALUES ('nope', 1, 1, 1)")
    with pytest.raises(sqlite3.IntegrityError):  # the old words are refused
        check.execute("UPDATE leases SET state = 'open' WHERE lease_id = 'l-open'")


# -- money invariants, refused at write time with nothing stored --

ESCROW = EscrowRef(contract="0x" + "11" * 20, payer="0x" + "22" * 20, escrow_id="0x" + "33" * 32)
BUDGET = 900


def _escrowed(lease_id: str, role: str = "consumer") -> LeaseOpen:
    return LeaseOpen(
        lease_id=lease_id,
        role=role,  # type: ignore[arg-type]
        provider=peer_id(PROVIDER),
        consumer=peer_id(CONSUMER),
        price_per_unit=3,
        budget=BUDGET,
        escrow=ESCROW,
    )


def _footprint(store: LedgerStore) -> tuple[Any, ...]:
    """Everything a refused write could have left behind."""
    conn = store._conn
    return tuple(
        conn.execute(query).fetchall()
        for query in (
            "SELECT * FROM leases ORDER BY lease_id",
            "SELECT * FROM receipts ORDER BY lease_id, seq",
            "SELECT * FROM money ORDER BY entry_id",
            "SELECT settlement_id, state FROM settlements ORDER BY settlement_id",
            "SELECT dispute_id, state, to_payee, to_payer FROM disputes ORDER BY dispute_id",
            "SELECT COUNT(*) FROM audit",
            "SELECT COUNT(*) FROM idempotency",
        )
    )


def _refused(store: LedgerStore, reason: str, write: Any) -> None:
    before = _footprint(store)
    with pytest.raises(LedgerError) as caught:
        write()
    assert (caught.value.code, caught.value.reason) == (ErrorCode.INTERNAL, f"invariant_{reason}")
    assert _footprint(store) == before, "a refused write must store nothing"


@pytest.fixture
def store(tmp_path: Path) -> Any:
    opened = LedgerStore.open(tmp_path / "ledger.db")
    yield opened
    opened.close()


_LEASE_IDS = iter(range(10**9))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    to_payee=st.integers(-5, BUDGET + 5),
    off=st.integers(-3, 3),  # how far the two parts miss the lock
    role=st.sampled_from(["consumer", "provider"]),
)
def test_a_resolution_gives_out_exactly_what_was_locked(store: LedgerStore, to_payee: int, off: int, role: str) -> None:
    to_payer = BUDGET - to_payee + off
    lease_id = f"lease-r{next(_LEASE_IDS)}"
    store.open_lease(_escrowed(lease_id, role), idempotency_key=f"open/{lease_id}")
    dispute = store.open_dispute(lease_id, opened_by=peer_id(CONSUMER), reason="", idempotency_key=f"d/{lease_id}")
    total = to_payee + to_payer
    fits = total == BUDGET if role == "consumer" else total >= BUDGET

    def resolve() -> Any:
        return store.resolve_dispute(
            dispute.dispute_id, to_payee=to_payee, to_payer=to_payer, idempotency_key=f"r/{lease_id}"
        )

    if to_payee < 0 or to_payer < 0:
        _refused(store, "negative_amount", resolve)
    elif not fits:
        _refused(store, "resolution_total", resolve)
    else:
        assert resolve().state == "dispute_resolved"


def test_a_negative_amount_is_never_stored(store: LedgerStore) -> None:
    bad = _escrowed("lease-n").model_copy(update={"budget": -1})  # past pydantic's own check
    _refused(store, "negative_amount", lambda: store.open_lease(bad, idempotency_key="open/n"))
    store.open_lease(_escrowed("lease-n"), idempotency_key="open/n2")
    store.enqueue_refund("lease-n")
    _refused(
        store,
        "negative_amount",
        lambda: store.mark_landed("lease-n/refund", tx_hash=None, released_total=-1, refunded=0),
    )


def test_receipts_never_go_back(store: LedgerStore) -> None:
    store.open_lease(_lease("lease-c", budget=BUDGET), idempotency_key="open/c")
    store.record_usage("lease-c", writer=peer_id(PROVIDER), units=10, idempotency_key="u1")
    first = store.issue_receipt("lease-c", receipt_key_of(PROVIDER))
    assert (first.body.units, first.body.amount) == (10, 30)
    # Metering that went backwards (a bug, a hand-edited file): the next receipt would undo the first.
    store._conn.execute("UPDATE leases SET metered_units = 4 WHERE lease_id = 'lease-c'")
    _refused(store, "receipt_decreased", lambda: store.issue_receipt("lease-c", receipt_key_of(PROVIDER)))


def test_released_and_refunded_never_exceed_the_lock(store: LedgerStore) -> None:
    store.open_lease(_escrowed("lease-x"), idempotency_key="open/x")
    store.enqueue_refund("lease-x")
    _refused(
        store,
        "released_over_locked",
        lambda: store.mark_landed("lease-x/refund", tx_hash=None, released_total=BUDGET - 10, refunded=20),
    )
    landed = store.mark_landed("lease-x/refund", tx_hash=None, released_total=BUDGET - 10, refunded=10)
    assert landed.state == "landed"


def test_money_rows_agree_with_the_settled_amount(store: LedgerStore) -> None:
    store.open_lease(_escrowed("lease-m"), idempotency_key="open/m")
    assert store.book_released("lease-m", 300) == 300
    # The settled amount no longer matches the spend rows: booking on top of it would hide the gap.
    store._conn.execute("UPDATE leases SET settled_amount = '0' WHERE lease_id = 'lease-m'")
    _refused(store, "money_rows_mismatch", lambda: store.book_released("lease-m", 600))
