"""The write-ahead meter (issue 15): a provider's call has a durable pending row before it is served,
settled into usage in one transaction; the ledger refuses what would break it; a restart settles
what a crash left, at 0 units, and leaves no pending row."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.errors import ErrorCode
from runtime.ledger import LeaseOpen, LedgerError, LedgerStore
from tests.runtime.support import peer_id, peer_key

PROVIDER, CONSUMER = peer_key("wam-provider"), peer_key("wam-consumer")


def _lease(lease_id: str, *, role: str = "provider", budget: int = 300) -> LeaseOpen:
    return LeaseOpen(
        lease_id=lease_id,
        role=role,  # type: ignore[arg-type]
        provider=peer_id(PROVIDER),
        consumer=peer_id(CONSUMER),
        price_per_unit=3,
        budget=budget,
    )


def _refused(reason: str, code: ErrorCode, fn: object, *args: object, **kwargs: object) -> None:
    with pytest.raises(LedgerError) as caught:
        fn(*args, **kwargs)  # type: ignore[operator]
    assert (caught.value.code, caught.value.reason) == (code, reason)


def test_a_call_is_reserved_then_settled_in_one_step(tmp_path: Path) -> None:
    store = LedgerStore.open(tmp_path / "ledger.db")
    store.open_lease(_lease("l1"), idempotency_key="o1")
    store.reserve_call("l1", "c1", reserved_units=40)
    store.reserve_call("l1", "c2", reserved_units=40)
    assert store.pending_calls("l1") == [("l1", "c1", 40), ("l1", "c2", 40)]
    _refused("call_exists", ErrorCode.CONFLICT, store.reserve_call, "l1", "c1", reserved_units=1)

    assert store.settle_call("l1", "c1", units=25) == 25
    assert store.get_lease("l1").metered_units == 25 and store.pending_calls() == [("l1", "c2", 40)]
    _refused("call_not_pending", ErrorCode.NOT_FOUND, store.settle_call, "l1", "c1", units=25)  # not twice
    assert store.settle_call("l1", "c2", units=0) == 0  # a failed call: its row goes, nothing metered
    assert store.get_lease("l1").metered_units == 25 and store.pending_calls() == []


def test_the_ledger_asserts_the_meter_invariants_at_write_time(tmp_path: Path) -> None:
    store = LedgerStore.open(tmp_path / "ledger.db")
    store.open_lease(_lease("l1", budget=30), idempotency_key="o1")
    store.open_lease(_lease("mine", role="consumer"), idempotency_key="o2")
    _refused("invariant_negative_amount", ErrorCode.INTERNAL, store.reserve_call, "l1", "c0", reserved_units=-1)
    _refused("usage_not_provider", ErrorCode.FORBIDDEN, store.reserve_call, "mine", "c0", reserved_units=1)
    store.reserve_call("l1", "c1", reserved_units=8)
    _refused("invariant_settled_over_reserved", ErrorCode.INTERNAL, store.settle_call, "l1", "c1", units=9)
    _refused("invariant_negative_amount", ErrorCode.INTERNAL, store.settle_call, "l1", "c1", units=-1)
    assert store.pending_calls() == [("l1", "c1", 8)]  # a refused settlement changes nothing
    store.reserve_call("l1", "c2", reserved_units=20)
    store.settle_call("l1", "c1", units=8)
    _refused("over_budget", ErrorCode.INSUFFICIENT_FUNDS, store.settle_call, "l1", "c2", units=3)  # 11 x 3 > 30
    assert store.get_lease("l1").metered_units == 8 and store.pending_calls() == [("l1", "c2", 20)]

    store.end_lease("l1", idempotency_key="e1")
    _refused("lease_not_open", ErrorCode.CONFLICT, store.reserve_call, "l1", "c3", reserved_units=1)
    assert store.settle_call("l1", "c2", units=2) == 0  # ended: the row goes, nothing more is receipted
    assert store.get_lease("l1").metered_units == 8 and store.pending_calls() == []


def test_a_restart_settles_what_a_crash_left_at_zero(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    store = LedgerStore.open(path)
    store.open_lease(_lease("l1"), idempotency_key="o1")
    store.reserve_call("l1", "done", reserved_units=10)
    store.settle_call("l1", "done", units=7)
    store.reserve_call("l1", "cut", reserved_units=50)
    store.close()  # the process dies with "cut" in flight

    store = LedgerStore.open(path)
    assert store.settle_pending_calls() == [("l1", "cut", 50)]
    assert store.pending_calls() == [] and store.settle_pending_calls() == []
    assert store.get_lease("l1").metered_units == 7  # never more than the consumer could have counted
    assert [e.kind for e in store.audit_entries()][-1] == "call.settled_at_restart"
    assert store.verify_audit().ok
