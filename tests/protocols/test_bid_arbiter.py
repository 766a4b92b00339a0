"""A bidder judges a task's announced single arbiter before it bids, as its award check will."""

from __future__ import annotations

from protocols.machines import task_checks as c

ARBITER, STRANGER = "12D3KooWarbiter", "12D3KooWstranger"
ARB_WALLET, OTHER_WALLET, ZERO = "0x" + "a1" * 20, "0x" + "b2" * 20, "0x" + "0" * 40


def test_a_bid_is_refused_with_the_verdict_its_award_would_get() -> None:
    own = (ARBITER, ARB_WALLET)
    cases = [
        (ARBITER, ARB_WALLET.upper().replace("0X", "0x"), ARB_WALLET, (own,)),  # trusted: no refusal
        (STRANGER, ARB_WALLET, ARB_WALLET, (own,)),  # our wallet under another peer id
        (ARBITER, OTHER_WALLET, ARB_WALLET, (own,)),  # another arbiter
        (ARBITER, ARB_WALLET, ARB_WALLET, ()),  # escrow.arbiter_peer unknown
        (ARBITER, ARB_WALLET, None, ()),  # no arbiter known at all
    ]
    seen = set()
    for args in cases:
        at_bid, at_award = c.bid_arbiter_verdict(*args), c.award_arbiter_verdict(*args)
        assert at_bid == at_award, args
        seen.add(None if at_bid is None else at_bid.reason)
    assert seen == {None, "award_untrusted_arbiter", "no_trusted_arbiter"}


def test_a_panel_task_is_left_to_its_awards_check() -> None:
    # Announced under the zero wallet: its panel is in the parameters the award carries (panel_trust_verdict).
    assert c.bid_arbiter_verdict(STRANGER, ZERO, ARB_WALLET, ((ARBITER, ARB_WALLET),)) is None
    assert c.award_arbiter_verdict(STRANGER, ZERO, ARB_WALLET, ((ARBITER, ARB_WALLET),)) is not None
