"""The consumer's allowance for calls it left without the provider's last frame
(``protocols.machines.left_calls``), driven by random sequences of finished calls, left calls, waits
and receipts: a left call's allowance is used by the bill that covers it and only by that bill, and
an honest provider's receipts always fit."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocols.machines import left_calls as lc
from protocols.machines.left_calls import LEFT_CALL_BILLED_S, RECEIPT_LAG_S, LeftCalls
from runtime.errors import ClawnodeError
from tests.protocols.refusals import report

PRICE = 3


def _body(words: int) -> dict[str, str]:
    return {"prompt": "w " * words}


# One step of a lease: ("finish", units) | ("leave", received, words, billed) | ("wait", s) | ("receipt", delay)
finish = st.tuples(st.just("finish"), st.integers(0, 40))
leave = st.tuples(st.just("leave"), st.integers(0, 20), st.integers(0, 60), st.sampled_from([0.0, 0.3, 1.0]))
wait = st.tuples(st.just("wait"), st.sampled_from([0.5, 3.0, 12.0, 30.0, 70.0, 400.0, 1000.0]))
receipt = st.tuples(st.just("receipt"), st.sampled_from([0.0, 2.0, 9.0]))
STEPS = st.lists(st.one_of(finish, leave, wait, receipt), max_size=40)


@dataclass
class Honest:
    """An honest provider, as the consumer may see it: a left call is billed its chunks and part of
    its allowance (``billed``) up to 30 s after the consumer left it (a cancel held back by a network cut
    meters later, up to ``LEFT_CALL_BILLED_S``: not drawn here); a receipt is issued up to 10 s
    before it reaches the consumer (``PUSH_TIMEOUT_S``) and covers what was metered by then."""

    now: float = 1000.0
    seen: int = 0
    left: LeftCalls = field(default_factory=LeftCalls)
    metered: list[tuple[float, int]] = field(default_factory=list)  # (when, units)
    issued_at: float = 0.0
    last_units: int = 0

    def step(self, event: tuple[object, ...], seen_verdicts: Counter[str]) -> None:
        kind = event[0]
        if kind == "finish":
            units = int(event[1])  # type: ignore[call-overload]
            self.metered.append((self.now, units))
            self.seen += units
            self.left = lc.counted(self.left, self.now, units)
        elif kind == "leave":
            received, words, share = int(event[1]), int(event[2]), float(event[3])  # type: ignore[call-overload,arg-type]
            body = _body(words)
            # Billed within what arrived and its allowance, metered up to 30 s later.
            bill = received + int(share * lc.left_call_allowance(body))
            self.metered.append((self.now + 30.0 * share, bill))
            self.seen += received
            self.left = lc.left(self.left, self.now, received, body)
        elif kind == "wait":
            self.now += float(event[1])  # type: ignore[arg-type]
        else:
            self.issued_at = max(self.issued_at, self.now - float(event[1]))  # type: ignore[arg-type]
            units = sum(units for when, units in self.metered if when <= self.issued_at)
            verdict = lc.receipt_verdict(self.left, units, units * PRICE, self.seen, PRICE)
            seen_verdicts["admitted" if verdict is None else verdict.reason] += 1
            assert verdict is None, (units, self.seen, self.left)
            self.left = lc.countersigned(self.left, self.now, units, self.seen)
            self.last_units = units


def test_an_honest_providers_receipts_always_fit() -> None:
    """Whatever the order of calls, waits and receipts, a receipt that covers what an honest provider
    metered (a left call billed within its allowance, metered late, receipts issued before end frames
    the consumer has counted) is countersigned, before and after its left calls are billed past."""
    seen: Counter[str] = Counter()
    closed = Counter[str]()

    @settings(max_examples=1000, deadline=None, database=None)
    @given(steps=STEPS)
    # A call left, billed past by a receipt issued before a call that finished meanwhile: the lag.
    @example(steps=[("leave", 5, 20, 0.3), ("wait", 70.0), ("finish", 10), ("receipt", 2.0)])
    # A call left, billed past while a later left call is still open (its chunks may not be metered).
    @example(steps=[("leave", 5, 20, 0.3), ("wait", 70.0), ("leave", 9, 0, 1.0), ("receipt", 0.0)])
    def run(steps: list[tuple[object, ...]]) -> None:
        lease = Honest()
        for event in steps:
            lease.step(event, seen)
        if lease.left.credit:
            closed["credited"] += 1
        # Everything is metered 30 s after it happened at the latest: a late receipt covers it all.
        lease.now += LEFT_CALL_BILLED_S + RECEIPT_LAG_S
        lease.step(("receipt", 0.0), seen)
        assert lease.left.open == ()
        assert lease.last_units <= lease.seen + lease.left.credit

    run()
    report("honest receipts", seen, {"admitted"})
    assert closed["credited"] > 0


def test_an_allowance_left_unused_cannot_be_claimed_later() -> None:
    """A provider that billed its left calls their chunks alone, and had that countersigned once they
    were billed past, cannot put their unused allowances on a later receipt: the consumer then allows
    only for the calls left since. Before, the allowances of every call ever left were summed."""
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(
        early=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 60)), min_size=1, max_size=6),
        later=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 60)), max_size=3),
        finished=st.integers(0, 50),
        over=st.integers(1, 400),
    )
    def run(early: list[tuple[int, int]], later: list[tuple[int, int]], finished: int, over: int) -> None:
        now, count, left = 1000.0, 0, LeftCalls()
        for received, words in early:
            count += received
            left = lc.left(left, now, received, _body(words))
        unused = sum(lc.left_call_allowance(_body(words)) for _, words in early)
        assert left.tolerance == unused  # while their bill may come, each call's allowance stands
        now += LEFT_CALL_BILLED_S + RECEIPT_LAG_S
        count += finished
        left = lc.counted(left, now, finished)  # a call finished just now: it may not be in the receipt
        # The receipt that bills past them claims their chunks alone (and the finished call).
        assert lc.receipt_verdict(left, count, count * PRICE, count, PRICE) is None
        left = lc.countersigned(left, now, count, count)
        assert left.open == ()
        # What it claimed beyond what is surely in it (the recent call's units, on the provider's side
        # of the doubt) is all those calls keep; the rest of their allowances is gone.
        assert left.credit == min(finished, unused)
        for received, words in later:
            count += received
            left = lc.left(left, now, received, _body(words))
        allowed = left.credit + sum(lc.left_call_allowance(_body(words)) for _, words in later)
        assert left.tolerance == allowed
        claim = count + allowed + over  # the cheat: the unused allowances on one receipt
        verdict = lc.receipt_verdict(left, claim, claim * PRICE, count, PRICE)
        assert verdict is not None and verdict.reason == "receipt_over_count"
        seen[verdict.reason] += 1
        # Once the recent call is past the lag, its doubt is gone too.
        now += RECEIPT_LAG_S + 1
        left = lc.countersigned(left, now, count, count)
        assert left.recent == ()

    run()
    report("banked allowances", seen, {"receipt_over_count"})


def test_the_consumer_never_countersigns_more_than_its_count_and_the_allowances_not_billed_past() -> None:
    """A provider that claims the most the consumer accepts at every receipt gets, over any sequence,
    no more than the consumer's count plus, per left call, its allowance (what it claimed for the
    calls billed past, then the allowances of those not yet billed past): never a sum that outgrows
    the calls it covers."""
    seen: Counter[str] = Counter()

    @settings(max_examples=400, deadline=None, database=None)
    @given(steps=STEPS)
    def run(steps: list[tuple[object, ...]]) -> None:
        now, count, left, signed = 1000.0, 0, LeftCalls(), 0
        allowances: list[tuple[float, int]] = []  # (left at, allowance) of every left call
        for event in steps:
            kind = event[0]
            if kind == "finish":
                count += int(event[1])  # type: ignore[call-overload]
                left = lc.counted(left, now, int(event[1]))  # type: ignore[call-overload]
            elif kind == "leave":
                body = _body(int(event[2]))  # type: ignore[call-overload]
                count += int(event[1])  # type: ignore[call-overload]
                left = lc.left(left, now, int(event[1]), body)  # type: ignore[call-overload]
                allowances.append((now, lc.left_call_allowance(body)))
            elif kind == "wait":
                now += float(event[1])  # type: ignore[arg-type]
            else:
                claim = max(signed, count + left.tolerance)  # the most it may claim
                refused = lc.receipt_verdict(left, claim + 1, (claim + 1) * PRICE, count, PRICE)
                assert refused is not None and refused.reason == "receipt_over_count"
                seen[refused.reason] += 1
                assert lc.receipt_verdict(left, claim, claim * PRICE, count, PRICE) is None
                seen["admitted"] += 1
                signed = claim
                left = lc.countersigned(left, now, claim, count)
            # What is allowed beyond the count never exceeds the left calls' own allowances, and the
            # calls still open keep theirs whole.
            recent = sum(a for at, a in allowances if at > now - LEFT_CALL_BILLED_S)
            assert sum(call.allowance for call in left.open) >= recent
            assert left.credit <= sum(a for at, a in allowances if at <= now - LEFT_CALL_BILLED_S)
            assert signed <= count + left.tolerance <= count + sum(a for _, a in allowances)

    run()
    report("greedy receipts", seen, {"admitted", "receipt_over_count"})


def test_left_calls_refuse_negative_figures() -> None:
    with pytest.raises(ClawnodeError):
        lc.counted(LeftCalls(), 0.0, -1)
    with pytest.raises(ClawnodeError):
        lc.left(LeftCalls(), 0.0, -1, {})
    with pytest.raises(ClawnodeError):
        lc.countersigned(LeftCalls(), 0.0, -1, 0)
    verdict = lc.receipt_verdict(LeftCalls(), -1, 0, 0, PRICE)
    assert verdict is not None and verdict.reason == "receipt_negative"
