"""Leased verifiers are picked at random among those at an acceptable price, weighted by their standing
with this node (issue 21): a cheat's accomplices selling checks of its file more cheaply than anyone are
not asked merely for being cheapest, a verifier the arbiter overruled or that disagreed with a second
verifier is asked less, and two verifiers that disagree leave the provider unchecked."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.lease.verifying import Verifying
from protocols.machines.verify import (
    MAX_VERIFIER_TRIES,
    CheckVerdict,
    VerifierOffer,
    acceptable_price,
    choose_verifiers,
    reconcile_opinions,
    second_opinion_drawn,
    verifier_standing,
)

PEERS = [f"peer{i}" for i in range(8)]
offers_st = st.lists(
    st.builds(VerifierOffer, st.sampled_from(PEERS), st.integers(min_value=0, max_value=2000)), max_size=12
)


@settings(max_examples=200, deadline=None)
@given(
    offers=offers_st,
    provider=st.sampled_from(PEERS),
    self_id=st.sampled_from(PEERS),
    exclude=st.sets(st.sampled_from(PEERS), max_size=3),
    max_price=st.none() | st.integers(min_value=0, max_value=2000),
    checked_price=st.none() | st.integers(min_value=0, max_value=2000),
    standing=st.dictionaries(st.sampled_from(PEERS), st.floats(min_value=0, max_value=1)),
    rng=st.randoms(use_true_random=False),
)
def test_the_pick_never_asks_the_provider_itself_an_excluded_or_a_too_dear_verifier(
    offers: list[VerifierOffer],
    provider: str,
    self_id: str,
    exclude: set[str],
    max_price: int | None,
    checked_price: int | None,
    standing: dict[str, float],
    rng: random.Random,
) -> None:
    chosen = choose_verifiers(
        offers,
        provider=provider,
        self_id=self_id,
        rng=rng,
        standing=standing,
        max_price=max_price,
        checked_price=checked_price,
        exclude=exclude,
    )
    fit = {
        o.peer_id
        for o in offers
        if o.peer_id not in {provider, self_id, *exclude}
        and acceptable_price(o.price_per_unit, max_price=max_price, checked_price=checked_price)
    }
    assert len(chosen) == len(set(chosen)) == min(len(fit), MAX_VERIFIER_TRIES)
    assert set(chosen) <= fit  # every one chosen had an acceptable offer (a peer may offer at two prices)
    assert provider not in chosen and self_id not in chosen and not set(chosen) & exclude


@settings(max_examples=100, deadline=None)
@given(price=st.integers(min_value=0, max_value=10**6), checked=st.integers(min_value=1, max_value=10**6))
def test_a_check_never_costs_more_per_token_than_the_call_it_checks(price: int, checked: int) -> None:
    assert acceptable_price(price, max_price=None, checked_price=checked) == (price <= checked)


def _first_counts(offers: list[VerifierOffer], standing: dict[str, float], rounds: int = 3000) -> Counter[str]:
    rng = random.Random(7)
    return Counter(
        choose_verifiers(offers, provider="cheat", self_id="me", rng=rng, standing=standing)[0] for _ in range(rounds)
    )


def test_the_cheapest_verifier_is_not_asked_first_for_being_cheapest() -> None:
    offers = [VerifierOffer("accomplice", 1), VerifierOffer("honest1", 500), VerifierOffer("honest2", 900)]
    first = _first_counts(offers, {})
    assert set(first) == {"accomplice", "honest1", "honest2"}  # each is asked first sometimes
    assert first["accomplice"] < 0.45 * 3000  # about a third: equal standing, equal chances


def test_a_verifier_that_lost_standing_is_asked_first_far_less_often() -> None:
    offers = [VerifierOffer("overruled", 1), VerifierOffer("confirmed", 500)]
    standing = {"overruled": verifier_standing(0, 1, 1), "confirmed": verifier_standing(5, 0, 0)}
    first = _first_counts(offers, standing)
    assert first["confirmed"] > 5 * first["overruled"] > 0  # less, never never


@given(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50))
def test_a_verifier_s_standing_rises_with_agreement_and_falls_with_every_loss(agreed: int, over: int, dis: int) -> None:
    now = verifier_standing(agreed, over, dis)
    assert 0 < now < 1
    assert verifier_standing(agreed + 1, over, dis) > now
    assert verifier_standing(agreed, over + 1, dis) < now and verifier_standing(agreed, over, dis + 1) < now


def test_two_verifiers_that_disagree_leave_the_provider_unchecked_unless_this_node_s_own_check_decides() -> None:
    passed, failed = CheckVerdict("passed"), CheckVerdict("failed", "logprob", 2)
    agree = reconcile_opinions(passed, CheckVerdict("passed"))
    assert agree.outcome == "passed" and agree.credit == ("first", "second") and not agree.blame
    split = reconcile_opinions(passed, failed)
    assert (split.outcome, split.reason, split.blame, split.credit) == (
        "unverifiable",
        "verifiers_disagree",
        ("first", "second"),
        (),
    )
    own = reconcile_opinions(passed, failed, failed)
    assert (own.outcome, own.reason, own.credit, own.blame) == ("failed", "logprob", ("second",), ("first",))
    alone = reconcile_opinions(passed, None)
    assert alone.outcome == "passed" and not alone.credit and not alone.blame
    assert second_opinion_drawn(0.25, 0.2) and not second_opinion_drawn(0.25, 0.3) and not second_opinion_drawn(0, 0)


async def test_the_arbiter_s_word_moves_the_verifier_that_failed_the_call_and_clears_the_provider() -> None:
    verifying = Verifying(local_model=lambda sha256: None)
    await verifying._note("cheat", "failed", "logprob")
    verifying.verifiers.failed_lease("lease-1", "liar")
    await verifying.overruled("cheat", "lease-1")  # the arbiter rejected the dispute: the provider was honest
    record = verifying.book.get("cheat")
    assert record is not None and record.failed == 0 and verifying.standing("cheat") > 0
    liar = verifying.verifiers.get("liar")
    assert liar is not None and liar.overruled == 1
    assert verifying.verifier_standings()["liar"] < verifier_standing(0, 0, 0)
    verifying.verifiers.failed_lease("lease-2", "truthful")
    verifying.confirmed("lease-2")  # the arbiter refunded: the verifier was right
    truthful = verifying.verifiers.get("truthful")
    assert truthful is not None and truthful.agreed == 1
