"""Fair admission: a heavy borrower's burst cannot starve a light one, and a full queue refuses with
a retry-after hint."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.admission import FairAdmission, borrowing, current_borrower


async def test_waiters_are_admitted_round_robin_between_borrowers() -> None:
    admission = FairAdmission("m", slots=1, max_queue=16)
    order: list[str] = []
    holder = await admission.acquire("heavy")

    async def request(borrower: str) -> None:
        ticket = await admission.acquire(borrower)
        order.append(borrower)
        await trio.sleep(0.001)
        admission.release(ticket)

    async with trio.open_nursery() as nursery:
        for _ in range(6):  # the heavy consumer queues its burst first
            nursery.start_soon(request, "heavy")
            await trio.testing.wait_all_tasks_blocked()
        for name in ("light-a", "light-b"):
            nursery.start_soon(request, name)
            await trio.testing.wait_all_tasks_blocked()
        admission.release(holder)
    # The light borrowers are served among the first three, not after the heavy burst.
    assert set(order[:3]) == {"heavy", "light-a", "light-b"}, order
    assert order.count("heavy") == 6


async def test_a_full_queue_refuses_the_heaviest_not_the_newcomer() -> None:
    admission = FairAdmission("m", slots=1, max_queue=3)
    holder = await admission.acquire("heavy")
    outcomes: dict[str, list[str]] = {"heavy": [], "light": []}

    async def request(borrower: str) -> None:
        try:
            ticket = await admission.acquire(borrower)
        except ClawnodeError as error:
            assert error.code == ErrorCode.RATE_LIMITED and error.reason == "busy"
            assert error.retry_after_s is not None and error.retry_after_s > 0
            outcomes[borrower].append("busy")
            return
        outcomes[borrower].append("served")
        admission.release(ticket)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(request, "heavy")
            await trio.testing.wait_all_tasks_blocked()
        assert admission.waiting == 3
        nursery.start_soon(request, "light")  # the queue is full: the heavy's newest place is taken
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes["heavy"] == ["busy"]
        with pytest.raises(ClawnodeError):  # and the heavy one is refused again while the queue is full
            await admission.acquire("heavy")
        admission.release(holder)
    assert outcomes == {"heavy": ["busy", "served", "served"], "light": ["served"]}


async def test_a_cancelled_waiter_leaves_and_the_borrower_is_taken_from_the_context() -> None:
    admission = FairAdmission("m", slots=1, max_queue=2)
    holder = await admission.acquire()
    with borrowing("lease-1"):
        assert current_borrower() == "lease-1"
        with trio.move_on_after(0.01):
            await admission.acquire()
    assert current_borrower() == "" and admission.waiting == 0
    admission.release(holder)
    assert admission.active == 0 and admission.hold_ewma_s is not None


async def test_requests_arriving_together_never_exceed_the_slots() -> None:
    admission = FairAdmission("m", slots=2, max_queue=64)
    running, most = 0, 0

    async def request(borrower: str) -> None:
        nonlocal running, most
        ticket = await admission.acquire(borrower)
        running += 1
        most = max(most, running)
        await trio.sleep(0.001)
        running -= 1
        admission.release(ticket)

    async with trio.open_nursery() as nursery:
        for index in range(20):  # all start in the same scheduling round
            nursery.start_soon(request, f"b{index % 3}")
    assert most == 2 and admission.active == 0 and admission.waiting == 0
