"""The lease lifecycle and metering rhythm: examples per refusal, then a random-sequence model check."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from protocols.machines.lease import (
    ABORTED_CALL_TOLERANCE_UNITS,
    ASK_AGAIN,
    BUDGET_BUSY_MESSAGE,
    CONSUMER,
    DEFAULT_COMPLETION_CAP,
    END_ABANDONED,
    END_FRAME_INFLATED,
    END_FROZEN,
    EXPIRE,
    ISSUE_RECEIPT,
    LEASE_ID_NOT_BOUND,
    LEASE_MACHINE,
    PAUSE,
    PAUSED_MESSAGE,
    PROVIDER,
    SYSTEM,
    UNLIMITED_UNITS,
    LeaseEvent,
    LeasePolicy,
    LeaseSession,
    LeaseState,
    LockFacts,
    aborted_call_units,
    call_units_needed,
    check_countersignature,
    check_end_frame,
    check_lock,
    check_receipt_claim,
    chunk_tokens,
    lease_id_for,
    lease_outlives,
    plan_call,
    prompt_units_estimate,
    receipt_tolerance,
)
from protocols.machines.left_calls import left_call_allowance
from runtime.errors import ClawnodeError, ErrorCode
from runtime.escrow import voucher_digest, voucher_signer

T0 = 1_000


def make(
    *,
    max_requests: int = 100,
    budget_cap: int = 1_000,
    rate_per_minute: int = 10,
    expires_at: int = T0 + 3_600,
    price: int = 2,
    every_units: int = 50,
    every_s: int = 30,
    timeout_s: int = 20,
    abandon_s: int = 120,
    grant: bool = True,
) -> LeaseSession:
    policy = LeasePolicy(
        max_requests=max_requests, budget_cap=budget_cap, rate_per_minute=rate_per_minute, expires_at=expires_at
    )
    s = LeaseSession(
        policy,
        price,
        receipt_every_units=every_units,
        receipt_every_s=every_s,
        countersign_timeout_s=timeout_s,
        abandon_after_s=abandon_s,
    )
    if grant:
        s.grant(T0)
    return s


def code_of(fn: Callable[[], object]) -> ErrorCode:
    with pytest.raises(ClawnodeError) as exc:
        fn()
    return exc.value.code


def test_happy_rhythm() -> None:
    s = make(every_units=10)
    s.authorize(T0 + 1, units_estimate=5)
    assert s.meter(5, T0 + 1) is False
    s.authorize(T0 + 2)
    assert s.meter(5, T0 + 2) is True  # 10 units since the last receipt
    assert s.tick(T0 + 2) == [ISSUE_RECEIPT]
    s.receipt_issued(1, 10, T0 + 2)
    assert s.tick(T0 + 3) == []
    s.countersigned(1, T0 + 4)
    assert s.units_countersigned == 10 and not s.outstanding
    s.close()
    s.settle()
    assert s.state == LeaseState.SETTLED
    assert [h[1] for h in s.history] == ["grant", "close", "settle"]


def test_time_based_receipt() -> None:
    s = make(every_units=1_000, every_s=30)
    s.authorize(T0 + 1)
    assert s.meter(1, T0 + 1) is False
    assert s.tick(T0 + 29) == []
    assert s.tick(T0 + 30) == [ISSUE_RECEIPT]
    assert s.meter(0, T0 + 30) is True
    s2 = make(every_s=30)
    assert s2.tick(T0 + 100) == []  # nothing unreceipted, nothing to do


def test_authorize_refusals() -> None:
    s = make(max_requests=2)
    s.authorize(T0)
    s.authorize(T0)
    assert code_of(lambda: s.authorize(T0)) == ErrorCode.RATE_LIMITED
    s = make(rate_per_minute=2)
    s.authorize(T0)
    s.authorize(T0 + 10)
    assert code_of(lambda: s.authorize(T0 + 59)) == ErrorCode.RATE_LIMITED
    s.authorize(T0 + 60)  # the first one left the window
    assert s.requests_served == 3
    s = make(budget_cap=100, price=2)
    assert code_of(lambda: s.authorize(T0, units_estimate=51)) == ErrorCode.INSUFFICIENT_FUNDS
    s.authorize(T0, units_estimate=50)
    assert code_of(lambda: s.authorize(T0, units_estimate=-1)) == ErrorCode.INVALID_ARGUMENT
    q = make(grant=False)
    assert code_of(lambda: q.authorize(T0)) == ErrorCode.CONFLICT


def test_authorize_expired_ends_the_lease() -> None:
    s = make(expires_at=T0 + 10)
    assert code_of(lambda: s.authorize(T0 + 10)) == ErrorCode.EXPIRED
    assert s.state == LeaseState.ENDED
    assert code_of(lambda: s.authorize(T0 + 11)) == ErrorCode.CONFLICT
    q = make(grant=False, expires_at=T0)
    assert code_of(lambda: q.grant(T0)) == ErrorCode.EXPIRED
    assert q.state == LeaseState.ENDED


def test_pause_resume_and_paused_message() -> None:
    s = make(timeout_s=20)
    s.authorize(T0)
    s.meter(3, T0)
    s.receipt_issued(1, 3, T0)
    assert s.tick(T0 + 19) == []
    assert s.tick(T0 + 20) == [PAUSE]
    assert s.state == LeaseState.PAUSED
    with pytest.raises(ClawnodeError) as exc:
        s.authorize(T0 + 21)
    assert exc.value.code == ErrorCode.CONFLICT and exc.value.message == PAUSED_MESSAGE
    s.countersigned(1, T0 + 22)
    assert s.state == LeaseState.ACTIVE
    s.authorize(T0 + 23)


def test_a_pause_asks_for_the_countersignature_again_and_refuses_with_reasons() -> None:
    s = make(timeout_s=20, every_s=30, abandon_s=1_000, budget_cap=20)
    s.authorize(T0)
    s.meter(3, T0)
    s.receipt_issued(1, 3, T0)
    assert s.tick(T0 + 20) == [PAUSE]
    assert s.tick(T0 + 29) == []
    assert s.tick(T0 + 30) == [ASK_AGAIN]  # every receipt_every_s since the receipt was last pushed
    assert s.tick(T0 + 59) == []
    assert s.tick(T0 + 60) == [ASK_AGAIN]
    with pytest.raises(ClawnodeError) as paused:
        s.authorize(T0 + 61)
    assert (paused.value.code, paused.value.reason) == (ErrorCode.CONFLICT, "paused")
    assert lease_outlives(paused.value.code, paused.value.reason)  # a router keeps it
    s.countersigned(1, T0 + 62)
    assert s.state == LeaseState.ACTIVE and s.tick(T0 + 200) == []
    with pytest.raises(ClawnodeError) as broke:
        s.reserve(T0 + 63, {"prompt": "x", "max_tokens": 9})
    assert (broke.value.code, broke.value.reason) == (ErrorCode.INSUFFICIENT_FUNDS, "over_budget")
    s.revoke(CONSUMER)
    with pytest.raises(ClawnodeError) as ended:
        s.authorize(T0 + 64)
    assert (ended.value.code, ended.value.reason) == (ErrorCode.CONFLICT, "ended")
    assert not lease_outlives(ended.value.code, ended.value.reason)
    assert not lease_outlives(ErrorCode.EXPIRED, "expired") and not lease_outlives(ErrorCode.CONFLICT, None)
    assert lease_outlives(ErrorCode.UNAVAILABLE, "disk_full") and lease_outlives(ErrorCode.TIMEOUT, None)


def test_countersign_only_clears_and_resumes_when_nothing_is_left() -> None:
    s = make(timeout_s=20)
    s.meter(4, T0)
    s.receipt_issued(1, 2, T0)
    s.receipt_issued(2, 4, T0 + 1)
    assert s.tick(T0 + 20) == [PAUSE]
    s.countersigned(1, T0 + 21)
    assert s.state == LeaseState.PAUSED and list(s.outstanding) == [2]
    assert code_of(lambda: s.countersigned(1, T0 + 22)) == ErrorCode.CONFLICT  # older / already done
    assert code_of(lambda: s.countersigned(9, T0 + 22)) == ErrorCode.CONFLICT  # unknown
    s.countersigned(2, T0 + 22)
    assert s.state == LeaseState.ACTIVE


def test_cumulative_countersign_clears_older() -> None:
    s = make()
    s.meter(4, T0)
    s.receipt_issued(1, 2, T0)
    s.receipt_issued(2, 4, T0)
    s.countersigned(2, T0 + 1)
    assert not s.outstanding and s.countersigned_seq == 2
    assert code_of(lambda: s.countersigned(1, T0 + 2)) == ErrorCode.CONFLICT


def test_receipt_issued_checks() -> None:
    s = make()
    s.meter(5, T0)
    s.receipt_issued(1, 3, T0)
    assert code_of(lambda: s.receipt_issued(1, 4, T0)) == ErrorCode.CONFLICT
    assert code_of(lambda: s.receipt_issued(2, 2, T0)) == ErrorCode.INVALID_ARGUMENT
    assert code_of(lambda: s.receipt_issued(2, 6, T0)) == ErrorCode.INVALID_ARGUMENT
    q = make(grant=False)
    assert code_of(lambda: q.receipt_issued(1, 0, T0)) == ErrorCode.CONFLICT
    assert code_of(lambda: q.meter(1, T0)) == ErrorCode.CONFLICT


def test_meter_is_a_hard_cap() -> None:
    s = make(budget_cap=10, price=2)
    s.meter(5, T0)
    assert code_of(lambda: s.meter(1, T0)) == ErrorCode.INSUFFICIENT_FUNDS
    assert s.units_metered == 5
    assert code_of(lambda: s.meter(-1, T0)) == ErrorCode.INVALID_ARGUMENT


def test_abandon_and_contact() -> None:
    s = make(timeout_s=20, abandon_s=100)
    s.meter(1, T0)
    s.receipt_issued(1, 1, T0)
    assert s.tick(T0 + 20) == [PAUSE]
    s.consumer_seen(T0 + 50)  # alive but not signing: stays paused (asked again), abandonment postponed
    assert s.tick(T0 + 100) == [ASK_AGAIN]
    assert s.tick(T0 + 150) == [END_ABANDONED]
    assert s.state == LeaseState.ENDED
    assert s.tick(T0 + 10_000) == []


def test_no_abandon_without_outstanding_receipt() -> None:
    s = make(abandon_s=10)
    assert s.tick(T0 + 1_000) == []
    assert s.state == LeaseState.ACTIVE


def test_tick_expiry() -> None:
    s = make(expires_at=T0 + 50)
    assert s.tick(T0 + 50) == [EXPIRE]
    assert s.state == LeaseState.ENDED
    s.settle()
    assert s.tick(T0 + 60) == []


def test_lifecycle_permissions() -> None:
    s = make()
    assert code_of(lambda: s.revoke(SYSTEM)) == ErrorCode.FORBIDDEN
    assert code_of(lambda: s.renew(T0 + 9_999, PROVIDER)) == ErrorCode.FORBIDDEN
    assert code_of(lambda: s.renew(T0 + 3_600, CONSUMER)) == ErrorCode.INVALID_ARGUMENT
    assert code_of(lambda: s.settle()) == ErrorCode.CONFLICT
    s.renew(T0 + 7_200, CONSUMER)
    assert s.policy.expires_at == T0 + 7_200 and s.state == LeaseState.ACTIVE
    s.revoke(CONSUMER)
    assert code_of(lambda: s.renew(T0 + 9_999, CONSUMER)) == ErrorCode.CONFLICT
    assert code_of(lambda: s.close()) == ErrorCode.CONFLICT
    s.settle()
    assert code_of(lambda: s.revoke(PROVIDER)) == ErrorCode.CONFLICT
    q = make(grant=False)
    q.revoke(PROVIDER)
    assert code_of(lambda: q.grant(T0)) == ErrorCode.CONFLICT


def test_check_receipt_claim() -> None:
    check_receipt_claim(10, 20, seen_units=10, price_per_unit=2)
    check_receipt_claim(11, 22, seen_units=10, price_per_unit=2, tolerance_units=1)
    with pytest.raises(ClawnodeError) as exc:
        check_receipt_claim(11, 22, seen_units=10, price_per_unit=2)
    assert exc.value.code == ErrorCode.CONFLICT
    assert exc.value.message == "the receipt claims more units than were delivered"
    assert code_of(lambda: check_receipt_claim(10, 21, 10, 2)) == ErrorCode.CONFLICT
    assert code_of(lambda: check_receipt_claim(-1, 0, 10, 2)) == ErrorCode.INVALID_ARGUMENT


def test_policy_is_frozen() -> None:
    p = LeasePolicy(max_requests=1, budget_cap=1, rate_per_minute=1, expires_at=1)
    with pytest.raises(ValueError):
        p.max_requests = 2  # type: ignore[misc]


# -- random sequences -----------------------------------------------------------------------
ROLES = [PROVIDER, CONSUMER, SYSTEM, "stranger"]
LIVE = (LeaseState.QUOTED, LeaseState.ACTIVE, LeaseState.PAUSED)


def table_code(state: LeaseState, event: LeaseEvent, actor: str) -> ErrorCode | None:
    """What the table alone says about this attempt, read from the rows directly."""
    rows = LEASE_MACHINE.transitions
    if not any(r.event == event and actor in r.actors for r in rows):
        return ErrorCode.FORBIDDEN
    row = next((r for r in rows if r.source == state and r.event == event), None)
    if row is None:
        return ErrorCode.CONFLICT
    return None if actor in row.actors else ErrorCode.FORBIDDEN


class LeaseModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.s = make(
            grant=False,
            max_requests=15,
            budget_cap=60,
            rate_per_minute=4,
            expires_at=T0 + 400,
            price=3,
            every_units=5,
            every_s=20,
            timeout_s=15,
            abandon_s=60,
        )
        self.seen_history = 0
        self.tickets: list[int] = []  # reservations of calls in flight
        self.recent: list[float] = []
        self.was_settled = False

    def attempt(self, fn: Callable[[], object], expected: ErrorCode | None) -> bool:
        """Run ``fn``: it must succeed when ``expected`` is None, else refuse with exactly that code."""
        try:
            fn()
        except ClawnodeError as exc:
            assert exc.code == expected, (exc.code, expected, exc.message)
            return False
        assert expected is None
        return True

    @initialize(grant=st.integers(0, 4))
    def start(self, grant: int) -> None:
        """Mostly start from a granted lease so the runs spend their steps on the rhythm."""
        if grant:
            self.s.grant(self.now)

    @rule(dt=st.integers(0, 40))
    def advance(self, dt: int) -> None:
        self.now += dt

    @rule(dt=st.integers(0, 40))
    def time_passes(self, dt: int) -> None:
        """Time passing with the adapter's timer firing: where pauses, expiry and abandonment come from."""
        self.now += dt
        self.tick()

    @rule()
    def consumer_catches_up(self) -> None:
        """The consumer countersigns the newest receipt (resuming a paused lease)."""
        s = self.s
        if s.outstanding and s.state not in (LeaseState.QUOTED, LeaseState.SETTLED):
            paused = s.state == LeaseState.PAUSED
            s.countersigned(s.last_seq, self.now)
            assert not s.outstanding
            assert s.state == (LeaseState.ACTIVE if paused else s.state)

    @rule(units=st.integers(0, 4))
    def serve_cooperatively(self, units: int) -> None:
        """The well-behaved path: authorize, meter, receipt when due, consumer countersigns."""
        s = self.s
        try:
            s.authorize(self.now, units)
        except ClawnodeError:
            return
        self.recent.append(self.now)
        if s.meter(units, self.now):
            s.receipt_issued(s.last_seq + 1, s.units_metered, self.now)

    @rule()
    def grant(self) -> None:
        expired = self.s.state == LeaseState.QUOTED and self.now >= self.s.policy.expires_at
        expected = ErrorCode.EXPIRED if expired else table_code(self.s.state, LeaseEvent.GRANT, PROVIDER)
        self.attempt(lambda: self.s.grant(self.now), expected)

    @rule(estimate=st.integers(0, 8))
    def authorize(self, estimate: int) -> None:
        s = self.s
        self.recent = [t for t in self.recent if t > self.now - 60]
        expected: ErrorCode | None
        if s.state in LIVE and self.now >= s.policy.expires_at:
            expected = ErrorCode.EXPIRED
        elif s.state != LeaseState.ACTIVE:
            expected = ErrorCode.CONFLICT
        elif s.requests_served >= s.policy.max_requests or len(self.recent) >= s.policy.rate_per_minute:
            expected = ErrorCode.RATE_LIMITED
        elif (s.units_metered + s.units_reserved + estimate) * s.price_per_unit > s.policy.budget_cap:
            expected = ErrorCode.INSUFFICIENT_FUNDS
        else:
            expected = None
        if self.attempt(lambda: s.authorize(self.now, estimate), expected):
            self.recent.append(self.now)

    @rule(units=st.integers(0, 6))
    def meter(self, units: int) -> None:
        s = self.s
        expected: ErrorCode | None = None
        if s.state in (LeaseState.QUOTED, LeaseState.SETTLED):
            expected = ErrorCode.CONFLICT
        elif (s.units_metered + s.units_reserved + units) * s.price_per_unit > s.policy.budget_cap:
            expected = ErrorCode.INSUFFICIENT_FUNDS
        self.attempt(lambda: s.meter(units, self.now), expected)

    @rule(words=st.integers(0, 6), max_tokens=st.one_of(st.none(), st.integers(1, 12)))
    def reserve_call(self, words: int, max_tokens: int | None) -> None:
        """A call is admitted with a reservation (what concurrent calls must share)."""
        s = self.s
        body: dict[str, object] = {"prompt": " ".join("w" for _ in range(words))}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        left = s.units_left
        try:
            plan = s.reserve(self.now, body)
        except ClawnodeError as error:
            assert error.code != ErrorCode.INSUFFICIENT_FUNDS or (max_tokens or 1) > left or left == 0
            return
        self.recent.append(self.now)
        assert plan.max_tokens <= plan.reserve <= left
        assert max_tokens is None or plan.max_tokens == max_tokens
        self.tickets.append(plan.reserve)

    @rule(pick=st.integers(0, 20), units=st.integers(0, 40))
    def finish_call(self, pick: int, units: int) -> None:
        """A call in flight ends: its reservation goes back and at most that much is metered."""
        if not self.tickets:
            return
        s = self.s
        reserved = self.tickets.pop(pick % len(self.tickets))
        before = s.units_metered
        expected = ErrorCode.CONFLICT if s.state == LeaseState.SETTLED and min(units, reserved) else None
        self.attempt(lambda: s.finish_call(reserved, units, self.now), expected)
        assert s.units_metered - before in (0, min(units, reserved))

    @rule(extra=st.integers(0, 2))
    def issue_receipt(self, extra: int) -> None:
        s = self.s
        units = min(s.units_metered, s.units_receipted + extra)
        expected = ErrorCode.CONFLICT if s.state in (LeaseState.QUOTED, LeaseState.SETTLED) else None
        self.attempt(lambda: s.receipt_issued(s.last_seq + 1, units, self.now), expected)

    @rule(back=st.integers(-1, 3))
    def countersign(self, back: int) -> None:
        s = self.s
        seq = s.last_seq - back
        expected: ErrorCode | None = None
        if s.state in (LeaseState.QUOTED, LeaseState.SETTLED) or seq not in s.outstanding:
            expected = ErrorCode.CONFLICT
        paused_before = s.state == LeaseState.PAUSED
        if self.attempt(lambda: s.countersigned(seq, self.now), expected):
            assert all(k > seq for k in s.outstanding)
            if paused_before:
                assert s.state == (LeaseState.PAUSED if s.outstanding else LeaseState.ACTIVE)

    @rule()
    def seen(self) -> None:
        self.s.consumer_seen(self.now)

    @rule()
    def tick(self) -> None:
        before = self.s.state
        actions = self.s.tick(self.now)
        assert len(actions) <= 1
        if actions == [EXPIRE]:
            assert before in LIVE and self.s.state == LeaseState.ENDED
        elif actions == [END_ABANDONED]:
            assert before in (LeaseState.ACTIVE, LeaseState.PAUSED) and self.s.state == LeaseState.ENDED
        elif actions == [PAUSE]:
            assert before == LeaseState.ACTIVE and self.s.state == LeaseState.PAUSED
        elif actions == [ASK_AGAIN]:
            assert before == self.s.state == LeaseState.PAUSED and self.s.outstanding
        else:
            assert self.s.state == before
            if actions == [ISSUE_RECEIPT]:
                assert before == LeaseState.ACTIVE and self.s.units_metered > self.s.units_receipted

    @rule(actor=st.sampled_from(ROLES), go=st.integers(0, 3))
    def revoke(self, actor: str, go: int) -> None:
        if go:  # ending events are rarer, so runs get deep
            return
        self.attempt(lambda: self.s.revoke(actor), table_code(self.s.state, LeaseEvent.REVOKE, actor))

    @rule(go=st.integers(0, 3))
    def close(self, go: int) -> None:
        if go:
            return
        self.attempt(self.s.close, table_code(self.s.state, LeaseEvent.CLOSE, CONSUMER))

    @rule(actor=st.sampled_from(ROLES), delta=st.integers(-50, 200))
    def renew(self, actor: str, delta: int) -> None:
        s = self.s
        expected = table_code(s.state, LeaseEvent.RENEW, actor)
        if expected is None and delta <= 0:
            expected = ErrorCode.INVALID_ARGUMENT
        old = s.policy.expires_at
        if self.attempt(lambda: s.renew(old + delta, actor), expected):
            assert s.policy.expires_at == old + delta

    @rule()
    def settle(self) -> None:
        self.attempt(self.s.settle, table_code(self.s.state, LeaseEvent.SETTLE, SYSTEM))

    @invariant()
    def history_follows_the_table(self) -> None:
        for prev, event, new in self.s.history[self.seen_history :]:
            row = LEASE_MACHINE.lookup(prev, event)
            assert row is not None and row.target == new
            assert not LEASE_MACHINE.is_terminal(prev)
        self.seen_history = len(self.s.history)
        if self.was_settled:
            assert self.s.state == LeaseState.SETTLED
        self.was_settled = self.s.state == LeaseState.SETTLED

    @invariant()
    def money_and_counts(self) -> None:
        s = self.s
        assert s.units_metered * s.price_per_unit <= s.policy.budget_cap
        assert (s.units_metered + s.units_reserved) * s.price_per_unit <= s.policy.budget_cap
        assert s.units_reserved == sum(self.tickets)
        assert s.requests_served <= s.policy.max_requests
        assert s.units_countersigned <= s.units_receipted <= s.units_metered
        assert all(seq > s.countersigned_seq for seq in s.outstanding)
        if s.state == LeaseState.PAUSED:
            assert s.outstanding


LeaseModel.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
TestLeaseModel = LeaseModel.TestCase


# -- the money rules (issue 14): pure verdicts, checked over random inputs ------------------------

PROMPTS = st.lists(st.text(alphabet="ab é漢", min_size=1, max_size=6), max_size=8).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(prompt=PROMPTS, max_tokens=st.one_of(st.none(), st.integers(1, 400)), left=st.integers(0, 600))
def test_plan_call_never_reserves_beyond_what_is_left(prompt: str, max_tokens: int | None, left: int) -> None:
    body: dict[str, object] = {"prompt": prompt}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    try:
        plan = plan_call(body, left)
    except ClawnodeError as error:
        assert error.code == ErrorCode.INSUFFICIENT_FUNDS
        assert left == 0 or (max_tokens is not None and max_tokens > left)
        return
    assert 1 <= plan.max_tokens <= plan.reserve <= left
    assert plan.max_tokens == (max_tokens if max_tokens is not None else min(DEFAULT_COMPLETION_CAP, left))
    # The prompt is reserved as far as the budget goes beyond the completion.
    assert plan.reserve == plan.max_tokens + min(prompt_units_estimate(body), left - plan.max_tokens)


def test_plan_call_refuses_a_malformed_max_tokens() -> None:
    for bad in (0, -3, "10", 2.5, True):
        with pytest.raises(ClawnodeError) as caught:
            plan_call({"prompt": "a", "max_tokens": bad}, 100)
        assert caught.value.code == ErrorCode.INVALID_ARGUMENT


@settings(max_examples=300, deadline=None)
@given(
    prompt=PROMPTS,
    completion=st.integers(0, 50),
    per_chunk=st.integers(1, 4),
    max_tokens=st.one_of(st.none(), st.integers(1, 60)),
    prompt_counted=st.booleans(),
    inflate=st.integers(0, 10**6),
)
def test_end_frame_units_are_accepted_only_within_what_arrived(
    prompt: str, completion: int, per_chunk: int, max_tokens: int | None, prompt_counted: bool, inflate: int
) -> None:
    """An honest end frame (words: the completion; chat: prompt tokens + completion) always passes;
    one claiming more than chunks received + the prompt's bound, or max_tokens + it, is refused."""
    body: dict[str, object] = {"prompt": prompt}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
        completion = min(completion, max_tokens)
    # The consumer's count: chunks of ``per_chunk`` tokens (chat) as the chunks carried them.
    chunks = [{"text": "x", "tokens": min(per_chunk, completion - i)} for i in range(0, completion, per_chunk)]
    received = sum(chunk_tokens(c) for c in chunks)
    assert received == completion
    prompt_tokens = len(prompt.encode()) if prompt_counted else 0  # a tokenizer never beats a byte each
    honest = prompt_tokens + completion
    assert check_end_frame(honest, received, body) == honest
    claimed = honest + inflate
    bound = received + prompt_units_estimate(body)
    if max_tokens is not None:
        bound = min(bound, max_tokens + prompt_units_estimate(body))
    if claimed > bound:
        with pytest.raises(ClawnodeError) as caught:
            check_end_frame(claimed, received, body)
        assert (caught.value.code, caught.value.message) == (ErrorCode.CONFLICT, END_FRAME_INFLATED)
    else:
        assert check_end_frame(claimed, received, body) == claimed


def test_one_chunk_cannot_claim_a_million_units() -> None:
    with pytest.raises(ClawnodeError) as caught:
        check_end_frame(10**6, 1, {"prompt": "hi"})
    assert caught.value.code == ErrorCode.CONFLICT


_PAYER = Account.from_key(b"\x11" * 32)
_OTHER = Account.from_key(b"\x22" * 32)
_CONTRACT = "0x" + "ab" * 20


def _voucher(account: Any, escrow_id: bytes, amount: int) -> str:
    digest = voucher_digest(31337, _CONTRACT, _PAYER.address, escrow_id, amount)
    return "0x" + bytes(account.sign_message(encode_defunct(primitive=digest)).signature).hex()


@settings(max_examples=40, deadline=None)
@given(
    amount=st.integers(1, 10**20),
    signed_amount_delta=st.sampled_from([0, 0, 1, -1]),
    signer=st.sampled_from(["payer", "payer", "other", "none", "garbage"]),
    escrow_id=st.binary(min_size=32, max_size=32),
)
def test_a_countersignature_counts_only_with_the_payers_voucher_for_its_amount(
    amount: int, signed_amount_delta: int, signer: str, escrow_id: bytes
) -> None:
    voucher: str | None
    if signer == "none":
        voucher = None
    elif signer == "garbage":
        voucher = "0x" + "00" * 65
    else:
        voucher = _voucher(_PAYER if signer == "payer" else _OTHER, escrow_id, amount + signed_amount_delta)
    recovered = (
        None if voucher is None else voucher_signer(31337, _CONTRACT, _PAYER.address, escrow_id, amount, voucher)
    )

    def verdict() -> None:
        check_countersignature(
            escrowed=True, amount=amount, voucher=voucher, voucher_signer=recovered, payer=_PAYER.address
        )

    if signer == "payer" and signed_amount_delta == 0:
        verdict()
        return
    with pytest.raises(ClawnodeError) as caught:
        verdict()
    assert caught.value.code == (ErrorCode.FORBIDDEN if voucher is None else ErrorCode.UNAUTHENTICATED)
    # Post-paid leases and zero amounts need no voucher.
    check_countersignature(escrowed=False, amount=amount, voucher=None, voucher_signer=None, payer=None)
    check_countersignature(escrowed=True, amount=0, voucher=None, voucher_signer=None, payer=_PAYER.address)


_CONSUMER = b"\x00\x24\x08\x01\x12\x20" + b"\x07" * 32  # the shape of an ed25519 peer id's bytes
_STRANGER = b"\x00\x24\x08\x01\x12\x20" + b"\x09" * 32
_SALT = b"\x5a" * 32
_BOUND_ID = lease_id_for(_CONSUMER, _SALT).hex()
_GOOD_LOCK = LockFacts(
    lease_id=_BOUND_ID,
    escrow_id="0x" + _BOUND_ID,
    consumer=_CONSUMER,
    salt=_SALT,
    lock_payer=_PAYER.address,
    wallet=_PAYER.address.lower(),
    wallet_bound=True,
    phase="active",
    payee="0x" + "01" * 20,
    arbiter="0x" + "02" * 20,
    amount=1_000,
    released=0,
    deadline=10_000,
    window=30,
    chain_now=5_000,
    quote_payee="0x" + "01" * 20,
    quote_arbiter="0x" + "02" * 20,
    quote_window=30,
    budget=1_000,
    duration_s=4_000,
)
_LOCK_FLAWS: dict[str, tuple[dict[str, object], ErrorCode]] = {
    "lease id is not the escrow id": ({"lease_id": "cd" * 32}, ErrorCode.INVALID_ARGUMENT),
    "no wallet binding": ({"wallet": None}, ErrorCode.FORBIDDEN),
    "binding not for this peer": ({"wallet_bound": False}, ErrorCode.FORBIDDEN),
    "lock paid by another wallet": ({"lock_payer": _OTHER.address}, ErrorCode.FORBIDDEN),
    # A stranger that saw the buyer's escrow id on chain, locked its own escrow under it and opens.
    "a squatter opens the buyer's id": ({"consumer": _STRANGER}, ErrorCode.FORBIDDEN),
    "another salt": ({"salt": b"\x5b" * 32}, ErrorCode.FORBIDDEN),
    "no salt": ({"salt": None}, ErrorCode.FORBIDDEN),
    "a short salt": ({"salt": b"\x5a" * 31}, ErrorCode.FORBIDDEN),
    "disputed": ({"phase": "disputed"}, ErrorCode.INSUFFICIENT_FUNDS),
    "closed": ({"phase": "closed"}, ErrorCode.INSUFFICIENT_FUNDS),
    "missing": ({"phase": "none"}, ErrorCode.INSUFFICIENT_FUNDS),
    "another payee": ({"payee": "0x" + "03" * 20}, ErrorCode.FORBIDDEN),
    "another arbiter": ({"arbiter": "0x" + "03" * 20}, ErrorCode.FORBIDDEN),
    "short amount": ({"amount": 999}, ErrorCode.INSUFFICIENT_FUNDS),
    "partly released": ({"released": 1}, ErrorCode.INSUFFICIENT_FUNDS),
    "another window": ({"window": 31}, ErrorCode.INVALID_ARGUMENT),
    "ends too soon": ({"deadline": 8_999}, ErrorCode.INVALID_ARGUMENT),
}


@settings(max_examples=200, deadline=None)
@given(flaws=st.sets(st.sampled_from(sorted(_LOCK_FLAWS)), max_size=3), extra=st.integers(0, 10**6))
def test_the_grant_takes_only_the_consumers_own_sufficient_lock(flaws: set[str], extra: int) -> None:
    """A lock is granted iff nothing is wrong with it; any flaw refuses it with one of the flaws' codes."""
    good = dataclasses.replace(_GOOD_LOCK, amount=_GOOD_LOCK.amount + extra, deadline=_GOOD_LOCK.deadline + extra)
    check_lock(good)
    if not flaws:
        return
    changes: dict[str, object] = {}
    for flaw in flaws:
        changes.update(_LOCK_FLAWS[flaw][0])
    with pytest.raises(ClawnodeError) as caught:
        check_lock(dataclasses.replace(_GOOD_LOCK, **changes))  # type: ignore[arg-type]
    assert caught.value.code in {_LOCK_FLAWS[flaw][1] for flaw in flaws}


@settings(max_examples=100, deadline=None)
@given(phase=st.sampled_from(["none", "active", "disputed", "closed"]), paused=st.booleans())
def test_a_frozen_escrow_ends_a_live_lease(phase: str, paused: bool) -> None:
    s = make()
    if paused:
        s.receipt_issued(1, 0, T0)
        s.countersignature_refused(T0)
        assert s.state == LeaseState.PAUSED
    actions = s.escrow_observed(phase)
    if phase == "active":
        assert actions == [] and s.state in (LeaseState.ACTIVE, LeaseState.PAUSED)
    else:
        assert actions == [END_FROZEN] and s.state == LeaseState.ENDED
        assert s.history[-1][1] == LeaseEvent.FREEZE
        assert s.escrow_observed(phase) == []  # once


def test_a_refused_countersignature_pauses_service_until_a_valid_one() -> None:
    s = make(every_units=5)
    s.authorize(T0, 5)
    assert s.meter(5, T0)
    s.receipt_issued(1, 5, T0)
    assert s.countersignature_refused(T0) == [PAUSE]
    with pytest.raises(ClawnodeError) as caught:
        s.authorize(T0 + 1, 1)
    assert caught.value.code == ErrorCode.CONFLICT
    s.countersigned(1, T0 + 2)
    assert s.state == LeaseState.ACTIVE


def test_concurrent_reservations_share_the_budget() -> None:
    """8 calls without max_tokens on a 10-unit lease: the first holds all 10, the rest are refused."""
    s = make(budget_cap=20, price=2)
    plans = []
    for _ in range(8):
        try:
            plans.append(s.reserve(T0, {"prompt": "x " * 256}))
        except ClawnodeError as error:
            # Busy, not broke: the lease would cover the call once the first is metered.
            assert (error.code, error.message) == (ErrorCode.RATE_LIMITED, BUDGET_BUSY_MESSAGE)
    assert [p.max_tokens for p in plans] == [10] and s.units_reserved == 10
    assert not s.finish_call(10, 256, T0)  # the engine overshot: billed its reservation only
    assert (s.units_metered, s.units_reserved) == (10, 0)
    with pytest.raises(ClawnodeError) as caught:
        s.reserve(T0, {"prompt": "x"})
    assert caught.value.code == ErrorCode.INSUFFICIENT_FUNDS  # now it is spent


@settings(max_examples=200, deadline=None)
@given(
    consumer=st.binary(min_size=1, max_size=64),
    other=st.binary(min_size=1, max_size=64),
    salt=st.binary(min_size=32, max_size=32),
    other_salt=st.binary(min_size=32, max_size=32),
)
def test_a_lease_id_is_bound_to_its_consumer(consumer: bytes, other: bytes, salt: bytes, other_salt: bytes) -> None:
    """The lock of an id derived for one peer is refused to every other peer, whatever salt it shows."""
    bound = lease_id_for(consumer, salt).hex()
    facts = dataclasses.replace(_GOOD_LOCK, lease_id=bound, escrow_id="0x" + bound, consumer=consumer, salt=salt)
    check_lock(facts)
    for squatter, its_salt in ((other, salt), (other, other_salt), (consumer, other_salt)):
        if (squatter, its_salt) == (consumer, salt):
            continue
        with pytest.raises(ClawnodeError) as caught:
            check_lock(dataclasses.replace(facts, consumer=squatter, salt=its_salt))
        assert (caught.value.code, caught.value.message) == (ErrorCode.FORBIDDEN, LEASE_ID_NOT_BOUND)


@settings(max_examples=300, deadline=None)
@given(
    reserved=st.integers(0, 500),
    streamed=st.integers(0, 1_000),
    prompt=st.integers(0, 300),
    estimate_over=st.integers(0, 50),
    in_flight=st.integers(0, ABORTED_CALL_TOLERANCE_UNITS),
    aborted=st.integers(1, 20),
)
def test_a_cut_call_is_billed_what_streamed_and_the_prompt_decoded_within_its_reservation(
    reserved: int, streamed: int, prompt: int, estimate_over: int, in_flight: int, aborted: int
) -> None:
    """The provider bills a cut call the chunks it wrote and the prompt tokens its engine decoded
    before the cut, never beyond the reservation; a consumer that received all but what was in flight
    still countersigns it (its prompt's estimate bounds the prompt), and never more than the
    tolerance of the calls it left."""
    billed = aborted_call_units(reserved, streamed, prompt)
    assert billed == min(reserved, streamed + prompt)
    assert aborted_call_units(reserved, streamed) == min(reserved, streamed)  # cut before its prefill began
    estimate = prompt + estimate_over
    received = max(0, streamed - in_flight)
    check_receipt_claim(billed, billed * 3, received, 3, tolerance_units=receipt_tolerance(1, estimate))
    tolerance = receipt_tolerance(aborted, aborted * estimate)
    assert tolerance == aborted * (ABORTED_CALL_TOLERANCE_UNITS + estimate)
    ceiling = received + tolerance
    check_receipt_claim(ceiling, ceiling * 3, received, 3, tolerance_units=tolerance)
    with pytest.raises(ClawnodeError) as caught:
        check_receipt_claim(ceiling + 1, (ceiling + 1) * 3, received, 3, tolerance_units=tolerance)
    assert caught.value.code == ErrorCode.CONFLICT
    assert receipt_tolerance(0) == 0
    for bad in ((-1, 0, 0), (0, -1, 0), (0, 0, -1)):
        with pytest.raises(ClawnodeError):
            aborted_call_units(*bad)
    with pytest.raises(ClawnodeError):
        receipt_tolerance(1, -1)


def test_a_call_left_without_an_end_frame_allows_for_its_prompt_estimate() -> None:
    """The consumer's allowance for a call it left is its prompt's estimate: at least the tokens a
    provider's engine counts for that prompt (one per byte, plus the template's)."""
    body = {"messages": [{"role": "user", "content": "w " * 300}], "max_tokens": 8}
    assert left_call_allowance(body) == ABORTED_CALL_TOLERANCE_UNITS + prompt_units_estimate(body)
    assert prompt_units_estimate(body) >= 600
    ids = {"prompt": [1, 2, 3]}
    assert left_call_allowance(ids) == receipt_tolerance(1, prompt_units_estimate(ids))


def test_a_session_meters_a_cut_call_within_its_reservation() -> None:
    s = make(budget_cap=1_000, price=2)
    plan = s.reserve(T0, {"prompt": "x", "max_tokens": 20})
    assert not s.finish_call(plan.reserve, aborted_call_units(plan.reserve, 7), T0)
    assert (s.units_metered, s.units_reserved) == (7, 0)
    plan = s.reserve(T0, {"prompt": "x", "max_tokens": 20})
    assert not s.finish_call(plan.reserve, aborted_call_units(plan.reserve, 0, 5), T0)  # cut before its first chunk
    assert (s.units_metered, s.units_reserved) == (12, 0)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(max_size=40),
    max_tokens=st.one_of(st.none(), st.integers(-3, 5_000), st.booleans(), st.text(max_size=3)),
)
def test_the_router_counts_what_the_provider_would_reserve(text: str, max_tokens: object) -> None:
    """``call_units_needed`` (the router's lease check) is ``plan_call``'s reservation with an unlimited
    budget: the router never opens a lease too small for a call the provider would reserve for."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    try:
        reserve = plan_call(body, UNLIMITED_UNITS).reserve
    except ClawnodeError:  # an invalid max_tokens: refused by the provider, counted as absent
        reserve = DEFAULT_COMPLETION_CAP + prompt_units_estimate(body)
    assert call_units_needed(body) == reserve
