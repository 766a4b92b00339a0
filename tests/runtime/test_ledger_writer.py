"""The ledger's one writer: a call's write-ahead row goes before the settlements queued ahead of it,
never before a write that can change a lease, and never more than ``MAX_JUMPS`` times in a row (a
steady stream of new calls kept queued settlements waiting for ever); a call cancelled while queued
never runs."""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from runtime.errors import ErrorCode
from runtime.ledger import Lease, LeaseOpen, Ledger, LedgerError, LedgerStore
from runtime.ledger.ledger import MAX_JUMPS, Lane, _next_job
from tests.runtime.support import peer_id, peer_key

PROVIDER, CONSUMER = peer_key("provider"), peer_key("consumer")


@given(st.lists(st.sampled_from(list(Lane)), max_size=12))
def test_the_writer_overtakes_only_settlements_and_keeps_each_lanes_order(lanes: list[Lane]) -> None:
    queue = list(enumerate(lanes))
    ran: list[int] = []
    while queue:
        ran.append(queue.pop(_next_job([lane for _, lane in queue]))[0])
    assert sorted(ran) == list(range(len(lanes)))
    position = {job: at for at, job in enumerate(ran)}
    for a in range(len(lanes)):
        for b in range(a + 1, len(lanes)):  # a was queued before b
            overtaken = position[b] < position[a]
            if overtaken:  # only a write-ahead row overtakes, and only a settlement-like write
                assert lanes[b] is Lane.FIRST and lanes[a] is Lane.YIELDS
                assert Lane.BARRIER not in lanes[a:b]
            elif lanes[a] is Lane.YIELDS and lanes[b] is Lane.FIRST and Lane.BARRIER not in lanes[a:b]:
                pytest.fail(f"the write-ahead row {b} waited for the settlement {a} queued before it")


@given(
    st.lists(st.sampled_from(list(Lane)), min_size=1, max_size=12),
    st.lists(st.integers(min_value=1, max_value=3), min_size=200, max_size=200),
)
def test_a_queue_that_never_empties_of_write_ahead_rows_still_runs_what_was_queued_before(
    queued: list[Lane], arrivals: list[int]
) -> None:
    # Before each run 1-3 new calls queue their write-ahead rows: more arrive than run, the queue never
    # empties of them. Each call queued at the start still runs, within MAX_JUMPS + 1 runs of the one before.
    queue: list[tuple[int, Lane]] = list(enumerate(queued))
    jumps, ran, steps = 0, {}, 0
    for step, arriving in enumerate(arrivals):
        queue += [(-1, Lane.FIRST)] * arriving
        index = _next_job([lane for _, lane in queue], jumps)
        jumps = jumps + 1 if index else 0
        job, _ = queue.pop(index)
        if job >= 0:
            ran[job] = step
        steps = step
        if len(ran) == len(queued):
            break
    assert sorted(ran) == list(range(len(queued))), f"still waiting after {steps + 1} runs"
    for job, step in ran.items():
        assert step < (job + 1) * (MAX_JUMPS + 1)
    assert _next_job([Lane.YIELDS, Lane.FIRST], MAX_JUMPS - 1) == 1  # below the bound: the row goes first
    assert _next_job([Lane.YIELDS, Lane.FIRST], MAX_JUMPS) == 0


class _Recording(LedgerStore):
    """A real store that notes the order its writes ran in."""

    ran: list[str]

    def reserve_call(self, lease_id: str, call_id: str, *, reserved_units: int) -> None:
        self.ran.append(f"reserve {call_id}")
        super().reserve_call(lease_id, call_id, reserved_units=reserved_units)

    def settle_call(self, lease_id: str, call_id: str, *, units: int) -> int:
        self.ran.append(f"settle {call_id}")
        return super().settle_call(lease_id, call_id, units=units)

    def end_lease(self, lease_id: str, *, idempotency_key: str) -> Lease:
        self.ran.append("end")
        return super().end_lease(lease_id, idempotency_key=idempotency_key)


async def _ledger(tmp_path: Path) -> tuple[Ledger, _Recording]:
    store = await trio.to_thread.run_sync(_Recording.open, tmp_path / "ledger.db")
    assert isinstance(store, _Recording)
    store.ran = []
    ledger = Ledger(store)
    lease = LeaseOpen(
        lease_id="lease-1",
        role="provider",
        provider=peer_id(PROVIDER),
        consumer=peer_id(CONSUMER),
        price_per_unit=3,
        budget=10**6,
    )
    await ledger.open_lease(lease, idempotency_key="open")
    for call in ("c1", "c2"):
        await ledger.reserve_call("lease-1", call, reserved_units=10)
    store.ran.clear()
    return ledger, store


async def _hold_writer(ledger: Ledger, nursery: trio.Nursery) -> threading.Event:
    """Occupy the writer (a running call) until the returned event is set."""
    release, running = threading.Event(), threading.Event()

    def busy() -> None:
        running.set()
        release.wait(10)

    nursery.start_soon(ledger._run, busy)
    await trio.to_thread.run_sync(running.wait, 10)
    return release


async def test_a_write_ahead_row_goes_before_queued_settlements_not_before_a_lease_change(tmp_path: Path) -> None:
    ledger, store = await _ledger(tmp_path)
    refused: list[str] = []

    async def reserve(call: str) -> None:
        try:
            await ledger.reserve_call("lease-1", call, reserved_units=10)
        except LedgerError as error:
            assert error.code == ErrorCode.CONFLICT
            refused.append(call)

    async with trio.open_nursery() as nursery:  # with no lease change queued: c3's row goes first
        release = await _hold_writer(ledger, nursery)
        nursery.start_soon(partial(ledger.settle_call, "lease-1", "c1", units=4))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(reserve, "c3")
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert store.ran == ["reserve c3", "settle c1"]
    await ledger.settle_call("lease-1", "c3", units=1)
    await ledger.reserve_call("lease-1", "c1", reserved_units=10)
    store.ran.clear()
    async with trio.open_nursery() as nursery:
        release = await _hold_writer(ledger, nursery)
        nursery.start_soon(partial(ledger.settle_call, "lease-1", "c1", units=4))  # queued first
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(partial(ledger.end_lease, "lease-1", idempotency_key="end"))  # changes the lease
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(partial(ledger.settle_call, "lease-1", "c2", units=5))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(reserve, "c3")  # a next call starts
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    # The new call's row went before c2's settlement, queued ahead of it, but not before the lease's
    # end: so it is refused, as it was when every write ran in the order it was made.
    assert store.ran == ["settle c1", "end", "reserve c3", "settle c2"]
    assert refused == ["c3"]
    assert (await ledger.get_lease("lease-1")).metered_units == 4 + 1 + 4  # c2 settled after the end: 0
    assert await ledger.pending_calls("lease-1") == []
    assert (await ledger.verify_audit()).ok
    await ledger.aclose()


async def test_a_settlement_queued_behind_a_stream_of_new_calls_runs_after_max_jumps_of_them(
    tmp_path: Path,
) -> None:
    ledger, store = await _ledger(tmp_path)
    calls = [f"n{n}" for n in range(MAX_JUMPS + 3)]
    async with trio.open_nursery() as nursery:
        release = await _hold_writer(ledger, nursery)
        nursery.start_soon(partial(ledger.settle_call, "lease-1", "c1", units=4))  # queued first
        await trio.testing.wait_all_tasks_blocked()
        for call in calls:  # new calls keep coming while the writer is busy
            nursery.start_soon(partial(ledger.reserve_call, "lease-1", call, reserved_units=10))
            await trio.testing.wait_all_tasks_blocked()
        release.set()
    reserved = [f"reserve {call}" for call in calls]
    assert store.ran == [*reserved[:MAX_JUMPS], "settle c1", *reserved[MAX_JUMPS:]]
    assert (await ledger.get_lease("lease-1")).metered_units == 4
    await ledger.aclose()


async def test_a_call_cancelled_while_queued_never_runs_and_one_running_completes(tmp_path: Path) -> None:
    ledger, store = await _ledger(tmp_path)
    outcomes: dict[str, Any] = {}

    async def settle(call: str, scope_out: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_out.append(scope)
            outcomes[call] = await ledger.settle_call("lease-1", call, units=2)
            return
        outcomes[call] = "cancelled"

    async with trio.open_nursery() as nursery:
        release = await _hold_writer(ledger, nursery)
        scopes: list[trio.CancelScope] = []
        nursery.start_soon(settle, "c1", scopes)
        await trio.testing.wait_all_tasks_blocked()
        scopes[0].cancel()  # still queued: dropped
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert outcomes == {"c1": "cancelled"}
    assert store.ran == []
    assert [row[1] for row in await ledger.pending_calls("lease-1")] == ["c1", "c2"]
    await ledger.aclose()


async def test_a_writer_thread_that_cannot_start_fails_that_call_and_the_next_call_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, store = await _ledger(tmp_path)
    start = trio.lowlevel.start_thread_soon

    def no_thread(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("can't start new thread")  # as threading says when the process is out of threads

    with trio.fail_after(5):  # the writer that ran the setup's writes has gone idle: the next call starts one
        while ledger._writer._draining:
            await trio.sleep(0.01)
    monkeypatch.setattr(trio.lowlevel, "start_thread_soon", no_thread)
    with pytest.raises(RuntimeError):
        await ledger.settle_call("lease-1", "c1", units=2)
    monkeypatch.setattr(trio.lowlevel, "start_thread_soon", start)
    with trio.fail_after(5):  # the ledger is not left waiting for a writer that never started
        assert await ledger.settle_call("lease-1", "c2", units=3) == 3
    assert store.ran == ["settle c2"]
    assert [row[1] for row in await ledger.pending_calls("lease-1")] == ["c1"]
    await ledger.aclose()
