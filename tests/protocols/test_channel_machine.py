"""Payment channel rules (protocols/machines/channel.py): the table, the verdicts, and random event
sequences of one consumer–provider pair in which nothing is paid twice and nothing is lost."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocols.machines import channel as ch
from protocols.machines.lease import LEASE_SALT_BYTES, lease_id_for
from runtime.errors import ClawnodeError, ErrorCode

S, E = ch.ChannelState, ch.ChannelEvent
POLICY = ch.ChannelPolicy(leases_per_lock=4, duration_s=1000, idle_close_s=50, claim_idle_s=20, margin_s=100)


def test_the_table_reaches_every_state_and_ends_in_closed_or_failed() -> None:
    m = ch.CHANNEL_MACHINE
    assert m.states == set(S)
    assert m.terminal == {S.CLOSED, S.FAILED}
    assert set(ch.PERSISTED_STATES) <= m.states
    # A channel a lease draws on cannot be closed from under it, only frozen by the chain.
    with pytest.raises(ClawnodeError) as caught:
        m.next_state(S.BUSY, E.CLOSE, ch.CONSUMER)
    assert caught.value.code == ErrorCode.CONFLICT
    with pytest.raises(ClawnodeError):
        m.next_state(S.BUSY, E.DRAW, ch.CONSUMER)  # one lease at a time
    assert m.next_state(S.BUSY, E.FREEZE, ch.SYSTEM) == S.CLOSING
    with pytest.raises(ClawnodeError) as caught:
        m.next_state(S.OPENING, E.LOCKED, ch.PROVIDER)  # only the payer locks
    assert caught.value.code == ErrorCode.FORBIDDEN


def _view(
    state: ch.ChannelState = S.OPEN, amount: int = 400, committed: int = 0, deadline: int = 2000
) -> ch.ChannelView:
    return ch.ChannelView(state=state, amount=amount, committed=committed, deadline=deadline)


def _draw(view: ch.ChannelView | None, budget: int = 100, top_up: bool = False) -> ch.DrawVerdict:
    return ch.draw_verdict(
        ch.DrawFacts(channel=view, budget=budget, duration_s=60, chain_now=1000, top_up_supported=top_up, policy=POLICY)
    )


def test_draw_verdicts() -> None:
    assert _draw(None) == ch.OpenChannel(400, "no_channel")
    assert _draw(_view(committed=150)) == ch.Draw(150)
    assert _draw(_view(state=S.BUSY)) == ch.PerLease("channel_busy")
    assert _draw(_view(state=S.CLOSING)) == ch.OpenChannel(400, "no_channel")
    assert _draw(_view(deadline=1150)) == ch.OpenChannel(400, "channel_ending")  # 1000 + 60 + margin 100
    assert _draw(_view(committed=350)) == ch.OpenChannel(400, "channel_spent")
    assert _draw(_view(committed=350), top_up=True) == ch.TopUp(350, 350)  # back to 4 budgets free
    long = ch.draw_verdict(
        ch.DrawFacts(channel=None, budget=1, duration_s=950, chain_now=0, top_up_supported=False, policy=POLICY)
    )
    assert long == ch.PerLease("lease_outlasts_channels")


def _close(**kw: object) -> ch.Close | None:
    facts = dict(
        state=S.OPEN,
        amount=400,
        committed=100,
        deadline=2000,
        chain_now=1000,
        idle_s=0.0,
        newer_channel=False,
        policy=POLICY,
    )
    facts.update(kw)
    return ch.close_verdict(ch.CloseFacts(**facts))  # type: ignore[arg-type]


def test_close_verdicts() -> None:
    assert _close() is None
    assert _close(idle_s=50.0) == ch.Close("idle")
    assert _close(state=S.BUSY, idle_s=10_000.0, chain_now=5000) is None  # never under a drawing lease
    assert _close(chain_now=1900) == ch.Close("ending")
    assert _close(committed=400) == ch.Close("spent")
    assert _close(newer_channel=True) == ch.Close("replaced")


def test_claim_verdicts() -> None:
    def claim(**kw: object) -> ch.Claim | None:
        facts = dict(
            high_water=100, claimed=0, busy=False, idle_s=0.0, deadline=2000, window=10, chain_now=1000, policy=POLICY
        )
        facts.update(kw)
        return ch.claim_verdict(ch.ClaimFacts(**facts))  # type: ignore[arg-type]

    assert claim() is None
    assert claim(idle_s=20.0) == ch.Claim(100, "idle")
    assert claim(idle_s=20.0, busy=True) is None
    assert claim(busy=True, chain_now=1900) == ch.Claim(100, "ending")
    assert claim(idle_s=99.0, claimed=100) is None  # claimed once


def _lock_facts(**kw: object) -> ch.ChannelLockFacts:
    consumer = b"\x00\x24" + hashlib.sha256(b"consumer").digest()
    salt = bytes(range(LEASE_SALT_BYTES))
    payer = "0x" + "11" * 20
    facts = dict(
        escrow_id="0x" + lease_id_for(consumer, salt).hex(),
        consumer=consumer,
        salt=salt,
        lock_payer=payer,
        wallet=payer,
        wallet_bound=True,
        base=100,
        high_water=100,
        busy=False,
        phase="active",
        payee="0x" + "22" * 20,
        arbiter="0x" + "33" * 20,
        amount=400,
        released=0,
        deadline=2000,
        window=10,
        chain_now=1000,
        quote_payee="0x" + "22" * 20,
        quote_arbiter="0x" + "33" * 20,
        quote_window=10,
        budget=100,
        duration_s=60,
        margin_s=100,
    )
    facts.update(kw)
    return ch.ChannelLockFacts(**facts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"base": 99}, "channel_base_behind"),  # below a voucher we already hold: paid twice
        ({"released": 150, "base": 120}, "channel_base_behind"),
        ({"busy": True}, "channel_busy"),
        ({"salt": bytes(LEASE_SALT_BYTES)}, "channel_not_bound"),
        ({"wallet": "0x" + "44" * 20}, "lock_wrong_payer"),
        ({"wallet_bound": False}, "wallet_not_bound"),
        ({"base": 301}, "lock_short"),  # 400 - 301 < budget 100
        ({"deadline": 1159}, "lock_too_short"),  # 1000 + 60 + margin 100
        ({"phase": "disputed"}, "lock_not_active"),
        ({"payee": "0x" + "55" * 20}, "lock_wrong_parties"),
    ],
)
def test_the_provider_accepts_a_lease_on_a_channel_only_above_every_voucher(
    change: dict[str, object], reason: str | None
) -> None:
    verdict = ch.channel_lock_verdict(_lock_facts(**change))
    assert (None if verdict is None else verdict.reason) == reason


# -- random event sequences of one pair ------------------------------------------------------------

EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("draw"), st.integers(1, 300)),  # a lease of this budget
        st.tuples(st.just("use"), st.integers(1, 120)),  # the drawing lease countersigns this much more
        st.tuples(st.just("end"), st.just(0)),
        st.tuples(st.just("late"), st.integers(1, 50)),  # a late receipt of an ended lease
        st.tuples(st.just("idle"), st.integers(1, 100)),  # time passes
        st.tuples(st.just("claim"), st.just(0)),  # the provider's timer
        st.tuples(st.just("close"), st.just(0)),  # the consumer's timer
        st.tuples(st.just("crash"), st.just(0)),  # the consumer restarts: its channels close
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(events=EVENTS, top_up=st.booleans())
# A late receipt of the first lease after the second drew on the channel: its voucher would overlap.
@example(events=[("draw", 100), ("use", 10), ("end", 0), ("draw", 100), ("use", 1), ("late", 2)], top_up=False)
def test_random_sequences_pay_each_unit_once_and_return_the_rest(events: list[tuple[str, int]], top_up: bool) -> None:
    now = 1000
    channels: list[dict[str, int | str]] = []  # amount, committed, released, state, deadline, idle_since
    leases: list[dict[str, int]] = []  # channel index (or -1: own lock), base, budget, final
    drawing: int | None = None  # index into leases
    last_on: dict[int, int] = {}  # channel -> lease drawn last
    for kind, n in events:
        if kind == "draw" and drawing is None:
            newest = channels[-1] if channels else None
            view = None
            if newest is not None and newest["state"] == S.OPEN:
                view = ch.ChannelView(
                    state=S.OPEN,
                    amount=int(newest["amount"]),
                    committed=int(newest["committed"]),
                    deadline=int(newest["deadline"]),
                )
            verdict = ch.draw_verdict(
                ch.DrawFacts(
                    channel=view, budget=n, duration_s=60, chain_now=now, top_up_supported=top_up, policy=POLICY
                )
            )
            if isinstance(verdict, ch.PerLease):
                leases.append({"channel": -1, "base": 0, "budget": n, "final": 0, "expires": now + 60})
            else:
                if isinstance(verdict, ch.OpenChannel):
                    if newest is not None and newest["state"] == S.OPEN:
                        newest["state"] = S.CLOSING
                    channels.append(
                        {
                            "amount": verdict.amount,
                            "committed": 0,
                            "released": 0,
                            "state": S.OPEN,
                            "deadline": now + POLICY.duration_s,
                            "idle_since": now,
                        }
                    )
                    base = 0
                elif isinstance(verdict, ch.TopUp):
                    channels[-1]["amount"] = int(channels[-1]["amount"]) + verdict.amount
                    base = verdict.base
                else:
                    base = verdict.base
                index = len(channels) - 1
                # The provider's check of the same facts: above every voucher it holds, free, funded.
                c = channels[index]
                assert base >= int(c["committed"]) and base >= int(c["released"])
                assert int(c["amount"]) - base >= n
                leases.append({"channel": index, "base": base, "budget": n, "final": 0, "expires": now + 60})
                last_on[index] = len(leases) - 1
            drawing = len(leases) - 1
        elif kind in ("use", "late"):
            target = drawing if kind == "use" else (n * 7919 % len(leases) if leases else None)  # any lease
            if target is None or (kind == "late" and target == drawing):
                continue
            lease = leases[target]
            amount = min(lease["budget"], lease["final"] + n)
            if now > lease["expires"]:
                continue  # the provider serves and receipts nothing after the lease's expiry
            if lease["channel"] >= 0:
                c = channels[lease["channel"]]
                if c["state"] == S.CLOSED:
                    continue  # the provider closed it: it pushes no receipt for that lease any more
                refusal = ch.voucher_verdict(
                    current=last_on.get(lease["channel"]) == target,
                    base=lease["base"],
                    amount=amount,
                    channel_amount=int(c["amount"]),
                )
                if refusal is not None:
                    continue
                c["committed"] = max(int(c["committed"]), lease["base"] + amount)
            lease["final"] = amount
        elif kind == "end" and drawing is not None:
            if leases[drawing]["channel"] >= 0:
                channels[leases[drawing]["channel"]]["idle_since"] = now
            drawing = None
        elif kind == "idle":
            now += n
        elif kind == "claim":
            for index, c in enumerate(channels):
                if c["state"] == S.CLOSED:
                    continue
                busy = drawing is not None and leases[drawing]["channel"] == index
                claim = ch.claim_verdict(
                    ch.ClaimFacts(
                        high_water=int(c["committed"]),
                        claimed=int(c["released"]),
                        busy=busy,
                        idle_s=now - int(c["idle_since"]),
                        deadline=int(c["deadline"]),
                        window=10,
                        chain_now=now,
                        policy=POLICY,
                    )
                )
                if claim is not None:  # settle: the voucher paid, the rest back, the channel closed
                    assert claim.cumulative <= int(c["amount"])
                    c["released"], c["state"] = claim.cumulative, S.CLOSED
        elif kind in ("close", "crash"):
            for index, c in enumerate(channels):
                busy = drawing is not None and leases[drawing]["channel"] == index
                state = S.BUSY if busy else S(str(c["state"]))
                if kind == "crash" and c["state"] == S.OPEN:
                    c["state"] = S.CLOSING
                    continue
                closing = ch.close_verdict(
                    ch.CloseFacts(
                        state=state,
                        amount=int(c["amount"]),
                        committed=int(c["committed"]),
                        deadline=int(c["deadline"]),
                        chain_now=now,
                        idle_s=now - int(c["idle_since"]),
                        newer_channel=index != len(channels) - 1,
                        policy=POLICY,
                    )
                )
                if closing is not None:
                    assert not busy
                    c["state"] = S.CLOSING
            if kind == "crash":
                drawing = None
        for c in channels:
            assert int(c["committed"]) <= int(c["amount"])

    # The end of the day: every channel settles with its highest voucher (the provider's close).
    for index, c in enumerate(channels):
        c["released"] = max(int(c["released"]), int(c["committed"]))
        drawn = [lease for lease in leases if lease["channel"] == index]
        shares = [ch.lease_share(int(c["released"]), lease["base"], lease["final"]) for lease in drawn]
        # Nothing paid twice: the shares of the leases are exactly what the channel released, each
        # lease gets all it countersigned, and the rest goes back to the payer.
        assert sum(shares) == int(c["released"])
        assert shares == [lease["final"] for lease in drawn]
        assert int(c["amount"]) - int(c["released"]) >= 0
