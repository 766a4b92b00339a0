"""The k-of-m panel's pure rules: who sits on it, which votes count, when it has decided."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.machines.task_panel import (
    MAX_PANEL,
    PanelCandidate,
    PanelFacts,
    RunNeeds,
    Vote,
    draw_panel,
    panel_terms_verdict,
    tally,
    vote_verdict,
)

PRICE = 100
PANEL = PanelFacts(members=("a", "b", "c"), threshold=2, price=PRICE)


def _reason(verdict: object) -> str | None:
    return getattr(verdict, "reason", None)


def test_a_panel_is_a_strict_majority_of_distinct_members_who_are_not_parties() -> None:
    members = [("a", "0x" + "1" * 40), ("b", "0x" + "2" * 40), ("c", "0x" + "3" * 40)]
    assert panel_terms_verdict(members, 2, ["creator"]) is None
    assert panel_terms_verdict(members, 3) is None
    assert _reason(panel_terms_verdict(members, 1)) == "panel_threshold"  # two splits could both win
    assert _reason(panel_terms_verdict(members, 4)) == "panel_threshold"
    assert _reason(panel_terms_verdict([], 1)) == "panel_size"
    many = [(f"p{i}", f"0x{i:040x}") for i in range(MAX_PANEL + 1)]
    assert _reason(panel_terms_verdict(many, MAX_PANEL)) == "panel_size"
    assert _reason(panel_terms_verdict([*members[:2], ("a", "0x" + "4" * 40)], 2)) == "panel_duplicate"
    assert _reason(panel_terms_verdict([*members[:2], ("d", "0x" + "2" * 40)], 2)) == "panel_duplicate"
    assert _reason(panel_terms_verdict(members, 2, ["b"])) == "panel_party"


def test_two_agreeing_votes_of_three_decide_and_a_member_votes_once() -> None:
    assert tally(PANEL, [Vote("a", 100)]).state == "open"
    decided = tally(PANEL, [Vote("a", 100), Vote("b", 0), Vote("c", 100)])
    assert (decided.state, decided.to_bidder, decided.agreeing) == ("decided", 100, 2)
    # A stranger, an impossible split and a changed vote do not count; the same vote again is harmless.
    verdict = tally(PANEL, [Vote("x", 0), Vote("a", 101), Vote("a", 0), Vote("a", 100), Vote("a", 0), Vote("b", 0)])
    assert verdict.refused == (("x", "not_on_panel"), ("a", "bad_split"), ("a", "vote_final"))
    assert verdict.state == "decided" and verdict.to_bidder == 0
    assert vote_verdict(PANEL, {"a": 0}, Vote("a", 0)) == "merged"
    # Abstentions and a split vote leave nothing that can reach the threshold: a person decides.
    # An abstention waits for a person at that member, who may then vote a split by hand.
    stuck = [Vote("a", None), Vote("b", 0), Vote("c", 100)]
    assert tally(PANEL, stuck).state == "needs_person"
    assert (tally(PANEL, [*stuck, Vote("a", 100)]).state, tally(PANEL, [*stuck, Vote("a", 100)]).to_bidder) == (
        "decided",
        100,
    )
    assert tally(PANEL, [Vote("a", None), Vote("b", None)]).state == "open"
    assert tally(PANEL, [Vote("a", 0), Vote("b", 40), Vote("c", 100)]).state == "deadlocked"  # no split can win
    assert tally(PANEL, [Vote("a", 100), Vote("a", None)]).refused == (("a", "vote_final"),)


@st.composite
def panels(draw: st.DrawFn) -> PanelFacts:
    k = draw(st.integers(1, MAX_PANEL))
    return PanelFacts(tuple(f"m{i}" for i in range(k)), draw(st.integers(k // 2 + 1, k)), PRICE)


def _votes(facts: PanelFacts) -> st.SearchStrategy[list[Vote]]:
    voters = st.sampled_from([*facts.members, "stranger"])
    splits = st.one_of(st.none(), st.sampled_from([0, 50, PRICE, PRICE + 1]))  # few splits: they collide
    return st.lists(st.builds(Vote, voters, splits), max_size=3 * MAX_PANEL)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_the_tally_matches_a_plain_count_of_each_members_first_valid_vote(data: st.DataObject) -> None:
    facts = data.draw(panels())
    votes = data.draw(_votes(facts))
    verdict = tally(facts, votes)
    first: dict[str, int | None] = {}  # each member's first split, else None if it only abstained
    for vote in votes:
        if vote.voter in facts.members and (vote.to_bidder is None or vote.to_bidder <= PRICE):
            if first.get(vote.voter) is None:
                first[vote.voter] = vote.to_bidder
    assert verdict.votes == first
    counts = Counter(v for v in first.values() if v is not None)
    winners = [split for split, n in counts.items() if n >= facts.threshold]
    assert len(winners) <= 1  # a strict majority: never two decided splits
    if winners:
        assert (verdict.state, verdict.to_bidder) == ("decided", winners[0])
    elif max(counts.values(), default=0) + len(facts.members) - sum(counts.values()) < facts.threshold:
        assert verdict.state == "deadlocked"
    elif len(first) == len(facts.members):
        assert verdict.state == "needs_person"
    else:
        assert verdict.state == "open"
    assert all(reason in ("not_on_panel", "bad_split", "vote_final") for _, reason in verdict.refused)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_the_decision_does_not_depend_on_the_order_votes_land_in(data: st.DataObject) -> None:
    facts = data.draw(panels())
    chosen = data.draw(st.dictionaries(st.sampled_from(facts.members), st.one_of(st.none(), st.sampled_from([0, 50]))))
    votes = [Vote(voter, split) for voter, split in chosen.items()]
    # Each sent twice in any order, and a member that voted a split may have abstained first.
    abstained_first = [Vote(v.voter, None) for v in votes if v.to_bidder is not None and data.draw(st.booleans())]
    again = abstained_first + data.draw(st.permutations(votes + votes))
    first, second = tally(facts, votes), tally(facts, again)
    assert (first.state, first.to_bidder, first.votes) == (second.state, second.to_bidder, second.votes)
    assert second.refused == ()


def _candidate(peer: str, kinds: str = "wasm native", fuel: int = 10**9, memory: int = 2**28) -> PanelCandidate:
    return PanelCandidate(peer, f"0x{peer * 40}"[:42], frozenset(kinds.split()), fuel, memory, 60.0, 2**16, 2**18)


NEEDS = RunNeeds("native", fuel=5000, memory_bytes=2**26, wall_s=5.0, output_bytes=4096, module_size=100)


def test_a_drawn_panel_seats_only_members_able_to_re_run_the_task() -> None:
    pool = [
        _candidate("a", fuel=1000),  # caps below the task's fuel
        _candidate("b", kinds="wasm"),  # does not run native programs
        _candidate("c"),
        _candidate("d", memory=2**20),  # too little memory
        _candidate("e"),
        _candidate("f"),
        _candidate("g"),
    ]
    drawn = draw_panel(pool, NEEDS, 3, 2, ("creator",))
    assert isinstance(drawn, tuple) and [c.peer for c in drawn] == ["c", "e", "f"]  # in the caller's order
    # A party never sits; a peer or wallet named twice sits once.
    drawn = draw_panel([_candidate("c"), _candidate("c"), *pool], NEEDS, 3, 2, ("e",))
    assert isinstance(drawn, tuple) and [c.peer for c in drawn] == ["c", "f", "g"]
    # Fewer able than asked: refused, not padded with members who would abstain.
    short = draw_panel(pool, NEEDS, 5, 3)
    assert _reason(short) == "panel_short"
    # The panel's own rules still hold: a threshold that is not a strict majority is refused.
    assert _reason(draw_panel(pool, NEEDS, 3, 1)) == "panel_threshold"
    assert _reason(draw_panel(pool, NEEDS, 0, 1)) == "panel_size"


@settings(max_examples=100, deadline=None, database=None, derandomize=True)
@given(st.data())
def test_every_drawn_member_can_re_run_and_a_short_draw_means_too_few_could(data: st.DataObject) -> None:
    pool = data.draw(
        st.lists(
            st.builds(
                _candidate,
                st.sampled_from("abcdefgh"),
                st.sampled_from(["wasm", "native", "wasm native"]),
                st.sampled_from([1000, 5000, 10**9]),
                st.sampled_from([2**20, 2**26, 2**28]),
            ),
            max_size=10,
        )
    )
    size = data.draw(st.integers(1, MAX_PANEL))
    parties = data.draw(st.sets(st.sampled_from("abcdefgh"), max_size=2))
    drawn = draw_panel(pool, NEEDS, size, size // 2 + 1, parties)
    able = {c.peer for c in pool if c.can_rerun(NEEDS) and c.peer not in parties}
    if isinstance(drawn, tuple):
        assert len(drawn) == size and len({c.peer for c in drawn}) == size
        assert all(c.can_rerun(NEEDS) and c.peer not in parties for c in drawn)
    else:
        assert drawn.reason == "panel_short" and len(able) < size
