"""The provider's checks of what a consumer sends (``protocols.machines.lease_provider``): the quote
asked for, the signed open, the payment behind it, a renewal; driven with random facts, each test
prints the refusals it saw by reason and fails if a reason it should reach never came up."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.machines import lease_provider as p
from runtime.errors import ErrorCode
from tests.protocols.test_lease_consumer import report, tally

ME, PEER, OTHER = "12D3KooWprovider", "12D3KooWconsumer", "12D3KooWstranger"


def test_random_quote_requests_are_refused_by_reason() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(
        offered=st.booleans(),
        served=st.booleans(),
        duration=st.integers(1, 7_200),
        connected=st.booleans(),
        trusted=st.booleans(),
    )
    def run(offered: bool, served: bool, duration: int, connected: bool, trusted: bool) -> None:
        ask = p.QuoteAsk("chat", offered, served, duration, 3_600, connected, trusted)
        verdict = p.quote_verdict(ask)
        tally(seen, verdict)
        expected = (
            "not_offered"
            if not offered
            else "not_served"
            if not served
            else "lease_too_long"
            if duration > 3_600
            else "no_escrow_chain"
            if not (connected or trusted)
            else None
        )
        assert (verdict.reason if verdict else None) == expected

    run()
    report("quote asked", seen, {"admitted", "not_offered", "not_served", "lease_too_long", "no_escrow_chain"})


def test_random_opens_are_refused_by_reason() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=400, deadline=None, database=None)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        d = data.draw

        def flip(good: object, bad: object) -> object:
            return d(st.sampled_from([good] * 5 + [bad]))

        signer = str(flip(PEER, OTHER))
        signer_verdict = p.open_signer_verdict(PEER, signer)
        if signer != PEER:
            tally(seen, signer_verdict)
            assert signer_verdict is not None and signer_verdict.reason == "open_wrong_signer"
            return
        assert signer_verdict is None
        f = p.OpenFacts(
            sender=PEER,
            me=ME,
            quote_signer=str(flip(ME, OTHER)),
            quote_consumer=str(flip(PEER, OTHER)),
            valid_until=int(flip(1_100, 999)),  # type: ignore[call-overload]
            now=1_000,
            quote_used=bool(flip(False, True)),
            used_quotes_full=bool(flip(False, True)),
            budget=int(flip(30, 2)),  # type: ignore[call-overload]
            price_per_unit=3,
        )
        verdict = p.open_verdict(f)
        tally(seen, verdict)
        checks = [
            (f.quote_signer != ME, "quote_not_ours"),
            (f.quote_consumer != PEER, "quote_other_peer"),
            (f.valid_until < f.now, "quote_expired"),
            (f.quote_used, "quote_used"),
            (f.used_quotes_full, "too_many_opens"),
            (f.budget < f.price_per_unit, "budget_below_unit"),
        ]
        expected = next((reason for failed, reason in checks if failed), None)
        assert (verdict.reason if verdict else None) == expected

    run()
    reasons = {"admitted", "open_wrong_signer", "quote_not_ours", "quote_other_peer", "quote_expired"}
    report("open", seen, reasons | {"quote_used", "too_many_opens", "budget_below_unit"})


def test_random_payments_are_refused_by_reason() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=400, deadline=None, database=None)
    @given(
        postpaid=st.booleans(),
        escrowed=st.booleans(),
        trusted=st.booleans(),
        budget=st.sampled_from([10, 1_000]),
        has_lock=st.booleans(),
        id_bound=st.sampled_from([True, True, False]),
        connected=st.sampled_from([True, True, False]),
    )
    def run(
        postpaid: bool, escrowed: bool, trusted: bool, budget: int, has_lock: bool, id_bound: bool, connected: bool
    ) -> None:
        f = p.PaymentFacts(postpaid, escrowed, trusted, budget, 100, has_lock, id_bound, connected)
        verdict = p.payment_verdict(f)
        tally(seen, verdict)
        if postpaid:
            expected = (
                "postpaid_untrusted" if escrowed or not trusted else "over_postpaid_cap" if budget > 100 else None
            )
        else:
            expected = (
                "lock_missing"
                if not (escrowed and has_lock)
                else "no_escrow_chain"
                if not connected
                else "lease_id_not_escrow_id"
                if not id_bound
                else None
            )
        assert (verdict.reason if verdict else None) == expected

    run()
    reasons = {"admitted", "postpaid_untrusted", "over_postpaid_cap", "lock_missing", "no_escrow_chain"}
    report("payment", seen, reasons | {"lease_id_not_escrow_id"})


def test_random_renewals_are_refused_by_reason() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(
        expires_at=st.integers(1_000, 6_000),
        connected=st.booleans(),
        deadline=st.one_of(st.none(), st.integers(1_000, 6_000)),
    )
    def run(expires_at: int, connected: bool, deadline: int | None) -> None:
        verdict = p.renew_verdict(expires_at, 1_000, 3_600) or p.renew_lock_verdict(connected, deadline, expires_at)
        tally(seen, verdict)
        expected = (
            "lease_too_long"
            if expires_at > 4_600
            else "no_escrow_chain"
            if not connected
            else "lock_too_short"
            if deadline is not None and deadline < expires_at
            else None
        )
        assert (verdict.reason if verdict else None) == expected

    run()
    report("renew (provider)", seen, {"admitted", "lease_too_long", "no_escrow_chain", "lock_too_short"})


def test_an_escrow_claimed_by_one_open_is_refused_to_every_other_but_a_live_channels_next_lease() -> None:
    """Every combination of ``escrow_claim_verdict``'s facts: who may check an escrow another open, a task
    award, or a live lease or channel holds (one escrow, one use), and the bound on claims held at once."""
    uses: tuple[p.EscrowUse, ...] = ("lease", "channel", "task")
    seen: Counter[str] = Counter()
    for wanted in uses:
        for held in (None, *uses):
            for checking in (False, True):
                for drawn in (False, True):
                    for full in (False, True):
                        facts = p.EscrowClaimFacts(
                            wanted, held, checking and held is not None, drawn, claims=9 if full else 3, claims_max=9
                        )
                        verdict = p.escrow_claim_verdict(facts)
                        seen["admitted" if verdict is None else f"{verdict.code} {verdict.reason}"] += 1
                        if held is None:
                            expected = "escrow_claims_full" if full else None
                        elif wanted == "task":
                            expected = "lock_of_another_task"
                        elif wanted == held == "channel":
                            expected = "channel_busy" if drawn or checking else None
                        elif checking:
                            expected = "escrow_in_use"
                        elif held in ("lease", "task"):
                            expected = "channel_is_a_lease" if wanted == "channel" else "escrow_in_use"
                        else:
                            expected = "lease_is_a_channel"
                        assert (verdict.reason if verdict else None) == expected, facts
                        assert verdict is None or verdict.code == (
                            ErrorCode.UNAVAILABLE if expected == "escrow_claims_full" else ErrorCode.CONFLICT
                        )
    report(
        "escrow claims",
        seen,
        {
            "escrow_claims_full",
            "channel_busy",
            "escrow_in_use",
            "channel_is_a_lease",
            "lease_is_a_channel",
            "lock_of_another_task",
        },
    )


def test_an_escrow_is_the_senders_only_under_its_own_peer_id_and_salt() -> None:
    """``escrow_bound_verdict``, asked before the claim: a stranger naming a buyer's escrow (under any salt,
    the buyer's included) is refused, by the lease or the channel reason; the buyer's own passes."""
    buyer, stranger, salt = b"\x00\x24buyer", b"\x00\x24stranger", bytes(range(32))
    escrow_id = "0x" + p.lease_id_for(buyer, salt).hex()
    assert p.escrow_bound_verdict(buyer, salt, escrow_id, channel=False) is None
    assert p.escrow_bound_verdict(buyer, salt, escrow_id, channel=True) is None
    for sender, their_salt in ((stranger, salt), (stranger, bytes(32)), (buyer, bytes(32)), (buyer, None)):
        for channel, reason in ((False, "lease_id_not_bound"), (True, "channel_not_bound")):
            verdict = p.escrow_bound_verdict(sender, their_salt, escrow_id, channel=channel)
            assert verdict is not None and (verdict.code, verdict.reason) == (ErrorCode.FORBIDDEN, reason)
    assert p.escrow_bound_verdict(buyer, salt[:16], escrow_id, channel=False) is not None  # a short salt
