"""The consumer's side of a lease (``protocols.machines.lease_consumer``): its table driven by random
event sequences, and its decisions (quote, grant, end frame, countersignature, renewal, what a
refused call does) driven by random facts; each test prints the refusals it saw by reason and fails
if a reason it should reach never came up."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from protocols.machines import lease_consumer as c
from protocols.machines.lease import (
    ABORTED_CALL_TOLERANCE_UNITS,
    DEFAULT_COMPLETION_CAP,
    lease_fits,
    prompt_units_estimate,
)
from protocols.machines.lease_consumer import (
    CONSUMER,
    CONSUMER_LEASE_MACHINE,
    PROVIDER,
    SYSTEM,
    ConsumerEvent,
    ConsumerLease,
    ConsumerState,
)
from protocols.machines.verdict import Refusal
from runtime.errors import ClawnodeError, ErrorCode, Reason, clean_reason
from tests.protocols.refusals import report

ME, PROV, OTHER = "12D3KooWme", "12D3KooWprovider", "12D3KooWstranger"
TOKEN = "t" * 43
DIGEST = hashlib.sha256(TOKEN.encode()).hexdigest()


def tally(seen: Counter[str], verdict: Refusal | None) -> None:
    reason = "admitted" if verdict is None else f"{verdict.code} {verdict.reason}"
    seen[reason] += 1
    event(reason)
    if verdict is not None:
        assert verdict.message
        error = verdict.error()  # the reason travels with the error as a token the wire takes
        assert (error.code, error.reason) == (verdict.code, clean_reason(verdict.reason))


# -- the table -----------------------------------------------------------------------------------

EVENTS = list(ConsumerEvent)
ACTORS = [CONSUMER, PROVIDER, SYSTEM, "stranger"]


def test_the_table_is_what_the_docstring_draws() -> None:
    m = CONSUMER_LEASE_MACHINE
    assert m.initial == ConsumerState.OPENING and m.terminal == {ConsumerState.SETTLED}
    assert m.states == set(ConsumerState)
    assert m.next_state(ConsumerState.OPENING, "lock", CONSUMER) == ConsumerState.LOCKED
    assert m.next_state(ConsumerState.LOCKED, "grant", CONSUMER) == ConsumerState.ACTIVE
    assert m.next_state(ConsumerState.ACTIVE, "pause", PROVIDER) == ConsumerState.PAUSED
    assert m.next_state(ConsumerState.PAUSED, "countersign", CONSUMER) == ConsumerState.ACTIVE
    assert m.next_state(ConsumerState.ACTIVE, "close", CONSUMER) == ConsumerState.ENDING
    assert m.next_state(ConsumerState.ENDING, "end", CONSUMER) == ConsumerState.ENDED
    assert m.next_state(ConsumerState.ENDED, "settle", SYSTEM) == ConsumerState.SETTLED
    with pytest.raises(ClawnodeError) as caught:
        m.next_state(ConsumerState.PAUSED, "renew", CONSUMER)  # a paused lease is not renewed
    assert caught.value.code == ErrorCode.CONFLICT
    with pytest.raises(ClawnodeError) as caught:
        m.next_state(ConsumerState.ACTIVE, "pause", CONSUMER)  # only the provider's refusal pauses it
    assert caught.value.code == ErrorCode.FORBIDDEN


def test_random_event_sequences_move_only_along_the_table() -> None:
    seen: Counter[str] = Counter()
    reached: Counter[str] = Counter()

    @settings(max_examples=150, deadline=None, database=None)
    @given(data=st.data(), length=st.integers(0, 20))
    def run(data: st.DataObject, length: int) -> None:
        lease = ConsumerLease()
        for _ in range(length):
            # Half the steps take a move the table allows (so runs get deep), half anything at all.
            legal = [
                (t.event, a) for t in CONSUMER_LEASE_MACHINE.transitions if t.source == lease.state for a in t.actors
            ]
            pick = st.tuples(st.sampled_from(EVENTS), st.sampled_from(ACTORS))
            ev, actor = data.draw(st.one_of(pick, st.sampled_from(legal)) if legal else pick)
            before = lease.state
            allowed = lease.may(ev, actor)
            try:
                after = lease.apply(ev, actor)
            except ClawnodeError as error:
                assert not allowed and lease.state == before  # a refusal changes nothing
                assert error.code in (ErrorCode.CONFLICT, ErrorCode.FORBIDDEN)
                seen[f"{error.code} {'forbidden' if error.code == ErrorCode.FORBIDDEN else 'not_in_table'}"] += 1
                continue
            assert allowed
            row = CONSUMER_LEASE_MACHINE.lookup(before, ev)
            assert row is not None and row.target == after and actor in row.actors
            seen["admitted"] += 1
            reached[after] += 1
            # Once ended, a lease never serves again; nothing leaves settled.
            if before in (ConsumerState.ENDED, ConsumerState.SETTLED):
                assert after in (ConsumerState.ENDED, ConsumerState.SETTLED)
            assert c.call_verdict(after) is None or after not in c.USABLE
        assert len(lease.history) <= lease.history.maxlen  # type: ignore[operator]

    run()
    report("consumer table", seen, {"admitted", "not_in_table", "forbidden"})
    assert set(reached) >= {s.value for s in ConsumerState} - {ConsumerState.OPENING.value}


# -- quote and grant -----------------------------------------------------------------------------


def test_random_quotes_are_refused_by_reason() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        d = data.draw
        peer = st.sampled_from([PROV, PROV, PROV, OTHER])
        me = st.sampled_from([ME, ME, ME, OTHER])
        f = c.QuoteFacts(
            signer=d(peer),
            provider=PROV,
            me=ME,
            quote_provider=d(peer),
            quote_consumer=d(me),
            quote_capability=d(st.sampled_from(["chat", "chat", "chat", "embed"])),
            capability="chat",
            escrowed=d(st.booleans()),
            budget=d(st.integers(0, 2_000)),
            postpaid_cap=d(st.sampled_from([0, 1_000, 10_000])),
            quote_arbiter=d(st.sampled_from(["0xAbC1", "0xabc1", "0xabc1", "0xdef2"])),
            trusted_arbiter=d(st.sampled_from(["0xabc1", "0xabc1", "0xABC1", None])),
        )
        verdict = c.quote_verdict(f)
        tally(seen, verdict)
        if f.signer != PROV:
            assert verdict is not None and verdict.reason == "quote_wrong_signer"
        elif (f.quote_provider, f.quote_consumer, f.quote_capability) != (PROV, ME, "chat"):
            assert verdict is not None and verdict.reason == "quote_not_asked"
        elif f.escrowed and f.trusted_arbiter is None:
            assert verdict is not None and verdict.reason == "no_trusted_arbiter"
        elif f.escrowed and f.quote_arbiter.lower() != (f.trusted_arbiter or "").lower():
            assert verdict is not None and verdict.reason == "quote_untrusted_arbiter"
        elif not f.escrowed and f.budget > f.postpaid_cap:
            assert verdict is not None and verdict.code == ErrorCode.INSUFFICIENT_FUNDS
        else:
            assert verdict is None

    run()
    report(
        "quote",
        seen,
        {
            "admitted",
            "quote_wrong_signer",
            "quote_not_asked",
            "no_trusted_arbiter",
            "quote_untrusted_arbiter",
            "over_postpaid_cap",
        },
    )


def test_random_grants_are_refused_by_reason() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        d = data.draw

        def flip(good: Any, bad: Any) -> Any:
            return d(st.sampled_from([good] * 6 + [bad]))

        token = flip(TOKEN, "u" * 43)
        f = c.GrantFacts(
            signer=flip(PROV, OTHER),
            provider=PROV,
            me=ME,
            lease_id="ab" * 32,
            quote_id="q1",
            price_per_unit=3,
            budget=900,
            token=token,
            grant_lease_id=flip("ab" * 32, "cd" * 32),
            grant_consumer=flip(ME, OTHER),
            grant_quote_id=flip("q1", "q2"),
            grant_price_per_unit=flip(3, 4),
            grant_budget=flip(900, 9_000),
            grant_token_sha256=DIGEST,
        )
        verdict = c.grant_verdict(f, hashlib.sha256(f.token.encode()).hexdigest())
        tally(seen, verdict)
        matches = (f.grant_lease_id, f.grant_consumer, f.grant_quote_id, f.grant_price_per_unit, f.grant_budget) == (
            "ab" * 32,
            ME,
            "q1",
            3,
            900,
        )
        if f.signer != PROV:
            assert verdict is not None and verdict.reason == "grant_wrong_signer"
        elif not matches:
            assert verdict is not None and (verdict.code, verdict.reason) == (ErrorCode.CONFLICT, "grant_mismatch")
        elif token != TOKEN:
            assert verdict is not None and verdict.reason == "grant_wrong_token"
        else:
            assert verdict is None

    run()
    report("grant", seen, {"admitted", "grant_wrong_signer", "grant_mismatch", "grant_wrong_token"})


# -- end frames, receipts, refused calls -----------------------------------------------------------


def test_random_end_frames_count_only_what_arrived() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @example(claimed=-1, received=0, prompt="", max_tokens=None)  # drawn too rarely to rely on
    @given(
        claimed=st.integers(-2, 400),
        received=st.integers(0, 200),
        prompt=st.text(max_size=40),
        max_tokens=st.one_of(st.none(), st.integers(1, 300)),
    )
    def run(claimed: int, received: int, prompt: str, max_tokens: int | None) -> None:
        body: dict[str, Any] = {"prompt": prompt}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        counted = c.end_frame_units(claimed, received, body)
        tally(seen, counted if isinstance(counted, Refusal) else None)
        reservable = (max_tokens or DEFAULT_COMPLETION_CAP) + prompt_units_estimate(body)
        bound = min(received + prompt_units_estimate(body), reservable)
        if claimed < 0:
            assert isinstance(counted, Refusal) and counted.code == ErrorCode.INVALID_ARGUMENT
        elif claimed > bound:
            assert isinstance(counted, Refusal) and counted.reason == "end_frame_inflated"
        else:
            assert counted == claimed

    run()
    report("end frame", seen, {"admitted", "end_frame_inflated", "units_negative"})


def test_random_error_frames_count_their_units_within_an_end_frames_bound() -> None:
    """An error frame's ``units`` (the chunks before it and the prompt the engine decoded) count as an
    end frame's would; one that names none (an older provider's), or more than an end frame could
    claim, counts the chunks received alone, never past what the call could be reserved."""
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(
        claimed=st.one_of(st.none(), st.integers(-2, 400)),
        received=st.integers(0, 200),
        prompt=st.text(max_size=40),
        max_tokens=st.one_of(st.none(), st.integers(1, 300)),
    )
    def run(claimed: int | None, received: int, prompt: str, max_tokens: int | None) -> None:
        body: dict[str, Any] = {"prompt": prompt}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        counted = c.error_frame_units(claimed, received, body)
        # What the provider could reserve for the call at most: max_tokens, else the default cap.
        reservable = (max_tokens or DEFAULT_COMPLETION_CAP) + prompt_units_estimate(body)
        bound = min(received + prompt_units_estimate(body), reservable)
        if claimed is None or not 0 <= claimed <= bound:
            seen["chunks alone"] += 1
            assert counted == min(received, reservable)
        else:
            seen["units"] += 1
            assert counted == claimed

    run()
    assert seen["chunks alone"] and seen["units"], seen


STATES = list(ConsumerState)


def test_random_receipts_are_countersigned_only_for_what_was_counted() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=400, deadline=None, database=None)
    @given(
        state=st.sampled_from(STATES),
        seen_units=st.integers(0, 100),
        over=st.integers(-5, 40),
        aborted=st.integers(0, 2),
        prompts=st.integers(0, 30),
        mispriced=st.sampled_from([0, 0, 0, 1]),
    )
    def run(state: ConsumerState, seen_units: int, over: int, aborted: int, prompts: int, mispriced: int) -> None:
        units = max(0, seen_units + over)
        prompts *= aborted  # the prompt estimates of the calls left, if any
        left = aborted * ABORTED_CALL_TOLERANCE_UNITS + prompts  # what the calls left allow, if any
        f = c.ReceiptFacts(state, units, units * 3 + mispriced, seen_units, left_units=left, price_per_unit=3)
        verdict = c.countersign_verdict(f)
        tally(seen, verdict)
        if state in (ConsumerState.OPENING, ConsumerState.LOCKED, ConsumerState.SETTLED):
            assert verdict is not None and verdict.reason == "not_countersignable"
        elif units > seen_units + aborted * ABORTED_CALL_TOLERANCE_UNITS + prompts:
            assert verdict is not None and verdict.reason == "receipt_over_count"
            assert not c.receipt_counted(f)
        elif mispriced:
            assert verdict is not None and verdict.reason == "receipt_mispriced"
        else:
            assert verdict is None and c.receipt_counted(f)

    run()
    report("countersign", seen, {"admitted", "not_countersignable", "receipt_over_count", "receipt_mispriced"})


CODES = [ErrorCode.CONFLICT, ErrorCode.EXPIRED, ErrorCode.RATE_LIMITED, ErrorCode.INSUFFICIENT_FUNDS]
CODES += [ErrorCode.FORBIDDEN, ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT]
REASONS = [None, *(r.value for r in Reason)]


def test_random_refused_calls_pause_end_or_keep_the_lease() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(
        refusals=st.lists(st.tuples(st.sampled_from(CODES), st.sampled_from(REASONS)), max_size=8),
        countersign_between=st.booleans(),
    )
    def run(refusals: list[tuple[ErrorCode, str | None]], countersign_between: bool) -> None:
        lease = ConsumerLease()
        lease.apply(ConsumerEvent.LOCK, CONSUMER)
        lease.apply(ConsumerEvent.GRANT, CONSUMER)
        for code, reason in refusals:
            ev = c.call_refused_event(code, reason)
            seen[str(ev)] += 1
            event(str(ev))
            if ev in (ConsumerEvent.SPEND, ConsumerEvent.EXPIRE):
                assert c.should_abandon(code, reason)  # what ends the lease, a router retires too
            if reason == Reason.OVER_BUDGET:  # this call only: a smaller one may fit, a router retires it
                assert ev is None and c.should_abandon(code, reason)
            if reason == Reason.PAUSED:
                assert ev == ConsumerEvent.PAUSE and not c.should_abandon(code, reason)
            if ev is not None and lease.may(ev, PROVIDER):
                lease.apply(ev, PROVIDER)
            if countersign_between and lease.may(ConsumerEvent.COUNTERSIGN, CONSUMER):
                lease.apply(ConsumerEvent.COUNTERSIGN, CONSUMER)  # a paused lease resumes
                assert lease.state != ConsumerState.PAUSED
            verdict = c.call_verdict(lease.state, "expired" if lease.state == ConsumerState.ENDED else None)
            assert (verdict is None) == (lease.state in c.USABLE)
        if any(reason in (Reason.ENDED, Reason.EXPIRED, Reason.REQUEST_LIMIT) for _, reason in refusals):
            assert lease.ended  # a lease that can serve nothing more is never used again

    run()
    report("refused call", seen, {"pause", "spend", "expire", "None"})


def test_random_renewals_only_extend_an_active_lease() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=200, deadline=None, database=None)
    @example(state=ConsumerState.ACTIVE, extend=0)  # an active state with extend <= 0 is drawn too rarely to rely on
    @given(state=st.sampled_from(STATES), extend=st.integers(-10, 100))
    def run(state: ConsumerState, extend: int) -> None:
        verdict = c.renew_verdict(state, 1_000, 1_000 + extend)
        tally(seen, verdict)
        if state != ConsumerState.ACTIVE:
            assert verdict is not None and verdict.reason == "not_renewable"
        elif extend <= 0:
            assert verdict is not None and verdict.reason == "renew_not_later"
        else:
            assert verdict is None

    run()
    report("renew", seen, {"admitted", "not_renewable", "renew_not_later"})
    fit = lease_fits(  # the router asks this before each call (renew when it does not fit)
        budget=300,
        price_per_unit=3,
        used_units=90,
        reserved_units=0,
        need_units=20,
        expires_at=2_000,
        now=1_000,
        renew_before_s=60,
    )
    assert (fit.ok, fit.reason) == (False, "budget")


def test_settled_only_once_the_escrow_is_closed_and_booked() -> None:
    kw: dict[str, Any] = {"escrowed": True, "booked": 30, "committed": 30}
    assert c.settled(state=ConsumerState.ENDED, phase="closed", **kw)
    assert not c.settled(state=ConsumerState.ENDED, phase="active", **kw)  # the refund is not through
    assert not c.settled(state=ConsumerState.ACTIVE, phase="closed", **kw)
    assert not c.settled(state=ConsumerState.ENDED, phase="closed", escrowed=True, booked=20, committed=30)
    assert not c.settled(state=ConsumerState.ENDED, phase="closed", escrowed=False, booked=0, committed=0)
    assert not c.settled(state=ConsumerState.ENDED, phase="disputed", **kw)  # the arbiter may still release


def test_a_frozen_escrow_ends_the_held_lease_and_its_release_is_booked() -> None:
    """The chain has the last word: a disputed escrow ends a live lease whether or not the provider's
    notice arrived; the arbiter's release is booked as spend, and what we committed beyond it is not
    owed once the escrow is closed."""
    live: dict[str, Any] = {"state": ConsumerState.ACTIVE, "ended": False}
    assert c.escrow_seen(**live, phase="active", released=0, booked=0, committed=9) == c.EscrowSeen(
        end=False, event=None, book=0, committed=9, settle=False
    )
    disputed = c.escrow_seen(**live, phase="disputed", released=0, booked=0, committed=9)
    assert (disputed.end, disputed.event, disputed.committed, disputed.settle) == (
        True,
        ConsumerEvent.FREEZE,
        9,  # not forgotten: the resolution may still release it
        False,
    )
    ended: dict[str, Any] = {"state": ConsumerState.ENDED, "ended": True}
    still = c.escrow_seen(**ended, phase="disputed", released=0, booked=0, committed=9)
    assert (still.end, still.book, still.committed, still.settle) == (False, 0, 9, False)
    resolved = c.escrow_seen(**ended, phase="closed", released=7, booked=0, committed=9)
    assert (resolved.end, resolved.book, resolved.committed, resolved.settle) == (False, 7, 7, True)
    # A lease a refused call spent (ended in the machine, its end work not done) ends on a frozen escrow.
    spent = c.escrow_seen(state=ConsumerState.ENDED, ended=False, phase="disputed", released=0, booked=0, committed=0)
    assert (spent.end, spent.event) == (True, None)
    # Our own revocation under way: the frozen escrow ends it too.
    ending = c.escrow_seen(state=ConsumerState.ENDING, ended=False, phase="closed", released=3, booked=3, committed=3)
    assert (ending.end, ending.event, ending.book, ending.settle) == (True, ConsumerEvent.FREEZE, 0, True)
    with pytest.raises(ClawnodeError):
        c.escrow_seen(**live, phase="active", released=-1, booked=0, committed=0)
