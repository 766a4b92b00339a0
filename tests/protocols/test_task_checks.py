"""The task market's checks of fetched facts (``protocols.machines.task_checks``) and the escrow-lock
check both markets share, driven with random facts; each test prints the refusals it saw by reason
and fails if a reason it should reach never came up."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections import Counter
from typing import Any, TypeVar

from hypothesis import event, given, settings
from hypothesis import strategies as st

from protocols.machines import task_checks as c
from protocols.machines.escrow_lock import LockState, LockTerms, lock_verdict
from protocols.machines.task_model import ReceiptState, ResultState
from protocols.machines.verdict import Refusal
from protocols.task_wire import MAX_ARTIFACT, MAX_EVIDENCE_ATTACHMENT, MAX_EVIDENCE_NOTE
from runtime.errors import ErrorCode, clean_reason
from tests.protocols.refusals import report

PEERS = ["12D3KooWcreator", "12D3KooWbidder", "12D3KooWstranger", "12D3KooWarbiter"]
CREATOR, BIDDER, STRANGER, ARBITER = PEERS
WALLETS = ["0x" + "01" * 20, "0x" + "02" * 20, "0x" + "03" * 20]
PAYEE, ARB_WALLET, OTHER_WALLET = WALLETS
H1, H2 = "a" * 64, "b" * 64

T = TypeVar("T")


def tally(seen: Counter[str], verdict: Refusal | None) -> None:
    reason = "admitted" if verdict is None else f"{verdict.code} {verdict.reason}"
    seen[reason] += 1
    event(reason)
    if verdict is not None:
        assert verdict.message and "/" not in verdict.message
        error = verdict.error()  # the reason travels with the error, as a token the wire takes
        assert (error.code, error.reason) == (verdict.code, verdict.reason) == (error.code, clean_reason(error.reason))


def flip(draw: Any, good: T, bad: list[Any]) -> Any:
    """Mostly the good value (so runs reach the later rules), sometimes a bad one."""
    return draw(st.sampled_from([good, good, good, *bad]))


# -- the shared escrow lock ---------------------------------------------------------------------
GOOD_LOCK = LockState("active", PAYEE, ARB_WALLET, 1_000, 0, 10_000, 30)
TERMS = LockTerms("task", PAYEE, ARB_WALLET, 1_000, 30, 9_000)


@st.composite
def locks(draw: st.DrawFn) -> LockState:
    return LockState(
        phase=flip(draw, "active", ["none", "disputed", "closed"]),
        payee=flip(draw, PAYEE, [OTHER_WALLET, PAYEE.upper().replace("0X", "0x")]),
        arbiter=flip(draw, ARB_WALLET, [OTHER_WALLET]),
        amount=flip(draw, 1_000, [999, 2_000, 0]),
        released=flip(draw, 0, [1, 500]),
        deadline=flip(draw, 10_000, [8_999, 9_000, 5_000]),
        window=flip(draw, 30, [0, 31]),
    )


def lock_oracle(lock: LockState, terms: LockTerms) -> str | None:
    if lock.phase != "active":
        return "lock_not_active"
    if lock.payee.lower() != terms.payee.lower() or lock.arbiter.lower() != terms.arbiter.lower():
        return "lock_wrong_parties"
    if lock.amount - lock.released < terms.amount:
        return "lock_short"
    if lock.window != terms.window:
        return "lock_wrong_window"
    if lock.deadline < terms.lasts_until:
        return "lock_too_short"
    return None


def test_the_shared_lock_check_refuses_random_locks_by_reason() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=400, deadline=None, database=None)
    @given(lock=locks(), subject=st.sampled_from(["task", "lease"]))
    def run(lock: LockState, subject: Any) -> None:
        terms = dataclasses.replace(TERMS, subject=subject)
        verdict = lock_verdict(lock, terms)
        tally(seen, verdict)
        assert (verdict.reason if verdict else None) == lock_oracle(lock, terms)
        if verdict is not None and verdict.reason in ("lock_not_active", "lock_too_short"):
            assert subject in verdict.message  # says which market's lock it is

    run()
    assert lock_verdict(GOOD_LOCK, TERMS) is None
    report(
        "escrow lock",
        seen,
        {"admitted", "lock_not_active", "lock_wrong_parties", "lock_short"}
        | {
            "lock_wrong_window",
            "lock_too_short",
        },
    )


def test_the_award_lock_check_asks_chain_contract_and_payee_first() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(data=st.data(), lock=locks())
    def run(data: st.DataObject, lock: LockState) -> None:
        d = data.draw
        facts = c.AwardLockFacts(
            our_chain_id=31337,
            award_chain_id=d(st.sampled_from([31337, 31337, 31337, 1])),
            our_contract=WALLETS[2],
            award_contract=d(st.sampled_from([WALLETS[2], WALLETS[2].upper().replace("0X", "0x"), WALLETS[0]])),
            our_wallet=PAYEE,
            payee=d(st.sampled_from([PAYEE, PAYEE, OTHER_WALLET])),
            arbiter_wallet=ARB_WALLET,
            price=1_000,
            window=30,
            lasts_until=9_000,
            lock=d(st.sampled_from([lock, lock, lock, None])),
            trusted_arbiter=d(
                st.sampled_from([ARB_WALLET, ARB_WALLET, ARB_WALLET.upper().replace("0X", "0x"), OTHER_WALLET, None])
            ),
            arbiter_peer=ARBITER,
        )
        # This node knows its own arbiter's peer id: escrow.arbiter_peer with its escrow.arbiter.
        if facts.trusted_arbiter is not None:
            facts = dataclasses.replace(facts, trusted_members=((ARBITER, facts.trusted_arbiter),))
        verdict = c.award_lock_verdict(facts)
        tally(seen, verdict)
        if facts.award_chain_id != 31337 or facts.award_contract.lower() != WALLETS[2]:
            assert verdict is not None and verdict.reason == "award_other_chain"
        elif facts.payee != PAYEE:
            assert verdict is not None and verdict.code == ErrorCode.FORBIDDEN
        elif facts.lock is None:
            assert verdict is not None and verdict.reason == "lock_unread"
        elif facts.trusted_arbiter is None:
            assert verdict is not None and (verdict.code, verdict.reason) == (
                ErrorCode.UNAVAILABLE,
                "no_trusted_arbiter",
            )
        elif facts.trusted_arbiter.lower() != ARB_WALLET.lower():
            assert verdict is not None and (verdict.code, verdict.reason) == (
                ErrorCode.FORBIDDEN,
                "award_untrusted_arbiter",
            )
        else:
            assert (verdict.reason if verdict else None) == lock_oracle(facts.lock, TERMS)

    run()
    report(
        "award lock",
        seen,
        {
            "admitted",
            "award_other_chain",
            "award_pays_other_wallet",
            "lock_not_active",
            "award_untrusted_arbiter",
            "no_trusted_arbiter",
        },
    )


def test_a_panel_lock_counts_only_under_params_that_name_a_panel() -> None:
    zero = "0x" + "00" * 20
    lock = LockState("active", PAYEE, zero, 1_000, 0, 9_000, 30)
    facts = c.AwardLockFacts(
        31337, 31337, WALLETS[2], WALLETS[2], PAYEE, PAYEE, zero, 1_000, 30, 9_000, lock, zero, arbiter_peer=ARBITER
    )
    facts = dataclasses.replace(facts, trusted_members=((ARBITER, zero),))
    assert c.award_lock_verdict(facts) is None  # a zero arbiter alone is the panel check's to judge
    # ... but a single arbiter this node does not trust is not, under params that name no panel
    untrusted = c.award_lock_verdict(dataclasses.replace(facts, trusted_arbiter=PAYEE, trusted_members=()))
    assert untrusted is not None and (untrusted.code, untrusted.reason) == (
        ErrorCode.FORBIDDEN,
        "award_untrusted_arbiter",
    )
    # A named panel of three, two of whom this node trusts (its arbiter and one configured, each by peer id
    # and wallet): m = 2.
    panel = ((ARBITER, ARB_WALLET), (STRANGER, OTHER_WALLET), (CREATOR + "2", PAYEE))
    named = dataclasses.replace(facts, panel_named=True, panel_members=panel, panel_threshold=2)
    trusting = dataclasses.replace(named, trusted_members=panel[:2])
    assert c.award_lock_verdict(trusting) is None
    unnamed = c.award_lock_verdict(dataclasses.replace(facts, lock_threshold=2))
    assert unnamed is not None and (unnamed.code, unnamed.reason) == (ErrorCode.FORBIDDEN, "lock_panel_unnamed")
    assert c.award_lock_verdict(dataclasses.replace(trusting, lock_threshold=2)) is None
    # ... and one this node's trusted arbiters do not decide is refused, whatever the lock says: too few trusted,
    # or a trusted wallet under another peer id (the creator's: the trusted node never hears of the case).
    for trusted in ((), panel[:1], panel[2:], ((ARBITER, ARB_WALLET), (CREATOR, OTHER_WALLET))):
        refused = c.award_lock_verdict(dataclasses.replace(named, lock_threshold=2, trusted_members=trusted))
        assert refused is not None and (refused.code, refused.reason) == (ErrorCode.FORBIDDEN, "panel_untrusted")


def test_a_seller_takes_a_single_arbiter_only_by_a_peer_id_and_wallet_it_trusts() -> None:
    own, extra = (ARBITER, ARB_WALLET), (STRANGER, OTHER_WALLET)  # escrow.arbiter_peer + escrow.arbiter; a trusted one
    loud = ARB_WALLET.upper().replace("0X", "0x")
    assert c.award_arbiter_verdict(ARBITER, loud, ARB_WALLET, (own,)) is None
    assert c.award_arbiter_verdict(STRANGER, OTHER_WALLET, ARB_WALLET, (own, extra)) is None  # escrow.trusted_arbiters
    assert c.award_arbiter_verdict(STRANGER, OTHER_WALLET, None, (extra,)) is None
    cases = [
        # the trusted wallet under the creator's peer id or a made-up one: the case would never reach our arbiter
        ((CREATOR, ARB_WALLET, ARB_WALLET, (own,)), ErrorCode.FORBIDDEN, "award_untrusted_arbiter", "another peer id"),
        (
            (ARBITER, OTHER_WALLET, ARB_WALLET, (own, extra)),
            ErrorCode.FORBIDDEN,
            "award_untrusted_arbiter",
            "another peer id",
        ),
        ((ARBITER, PAYEE, ARB_WALLET, (own, extra)), ErrorCode.FORBIDDEN, "award_untrusted_arbiter", "another arbiter"),
        # escrow.arbiter_peer unset: our own wallet is named, but we cannot tell whose peer id goes with it
        ((ARBITER, ARB_WALLET, ARB_WALLET, ()), ErrorCode.UNAVAILABLE, "no_trusted_arbiter", "escrow.arbiter_peer"),
        (
            (CREATOR, ARB_WALLET, ARB_WALLET, (extra,)),
            ErrorCode.UNAVAILABLE,
            "no_trusted_arbiter",
            "escrow.arbiter_peer",
        ),
        ((ARBITER, PAYEE, ARB_WALLET, ()), ErrorCode.FORBIDDEN, "award_untrusted_arbiter", "another arbiter"),
        # no arbiter known at all
        ((ARBITER, ARB_WALLET, None, ()), ErrorCode.UNAVAILABLE, "no_trusted_arbiter", "escrow.arbiter_peer"),
    ]
    for args, code, reason, said in cases:
        refused = c.award_arbiter_verdict(*args)
        assert refused is not None and (refused.code, refused.reason) == (code, reason), args
        assert said in refused.message, (args, refused.message)


def test_a_panel_is_taken_only_when_trusted_members_reach_the_threshold_and_untrusted_ones_do_not() -> None:
    t1, t2, a1, a2, a3 = ((f"12D3KooWmember{i}", "0x" + f"{i:02x}" * 20) for i in range(1, 6))
    trusted = (t1, t2)
    # The creator's members hold a veto (trusted < m) although they cannot decide alone (untrusted < m).
    for members, m in (((t1, a1, a2), 3), ((t1, a1), 2), ((t1, t2, a1, a2, a3), 4)):
        refused = c.panel_trust_verdict(members, m, trusted)
        assert refused is not None and refused.reason == "panel_untrusted", (members, m)
        assert "escrow.arbiter_peer" in refused.message and "escrow.trusted_arbiters" in refused.message
    # A trusted wallet seated under the creator's peer id is not a trusted member.
    assert c.panel_trust_verdict(((CREATOR, t1[1]), t2, a1), 2, trusted) is not None
    assert c.panel_trust_verdict((t1, t2, a1), 2, trusted) is None
    assert c.panel_trust_verdict((t1, t2), 2, trusted) is None


def test_a_seller_takes_a_panel_only_if_its_trusted_members_decide_it() -> None:
    seen: Counter[str] = Counter()
    peers = [f"12D3KooWpeer{i}" for i in range(1, 6)]
    wallets = ["0x" + "ab" * 19 + f"{i:02x}" for i in range(1, 6)]
    pairs = st.tuples(st.sampled_from(peers), st.sampled_from(wallets))

    @settings(max_examples=600, deadline=None, database=None)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        d = data.draw
        members = d(st.lists(pairs, min_size=1, max_size=5))
        threshold = d(st.integers(0, len(members) + 1))
        # Mostly pairs of the panel's (so panels get taken), sometimes a panel wallet under another peer id.
        trusted = d(st.lists(st.one_of(st.sampled_from(members), pairs), max_size=5))
        shown = [(peer, wallet.upper().replace("0X", "0x") if d(st.booleans()) else wallet) for peer, wallet in members]
        verdict = c.panel_trust_verdict(shown, threshold, trusted)
        tally(seen, verdict)
        # Taken exactly when some m members, each a (peer id, wallet) pair this node trusts, can decide, and no
        # m members none of whom it trusts can: the creator's members can neither decide nor block a decision.
        ours = set(trusted)
        seatings = list(itertools.combinations(members, threshold))
        decide = any(all(seat in ours for seat in seats) for seats in seatings)
        alone = any(all(seat not in ours for seat in seats) for seats in seatings)
        assert (verdict is None) == (decide and not alone)
        if verdict is not None:
            assert (verdict.code, verdict.reason) == (ErrorCode.FORBIDDEN, "panel_untrusted")

    run()
    report("panel trust", seen, {"admitted", "panel_untrusted"})


# -- signed envelopes and artifacts -------------------------------------------------------------
def _peers(draw: Any, good: str) -> str:
    return flip(draw, good, [p for p in PEERS if p != good])


def test_results_evidence_reviews_and_awards_refuse_random_envelopes_by_reason() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=500, deadline=None, database=None)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        d = data.draw
        kind = d(st.sampled_from(["result", "evidence", "review", "award", "award_bid", "piece", "dispute"]))
        verdict: Refusal | None
        if kind == "result":
            size = d(st.sampled_from([5, 5, 5, MAX_ARTIFACT + 1]))
            f = c.ResultFacts(
                signer=_peers(d, BIDDER),
                remote=BIDDER,
                bidder=_peers(d, BIDDER),
                size=5,
                content_hash=H1,
                artifact_size=size,
                artifact_sha256=flip(d, H1, [H2]),
            )
            verdict = c.result_verdict(f)
            ok = f.signer == f.bidder == BIDDER and size == 5 and f.artifact_sha256 == H1
        elif kind == "evidence":
            e = c.EvidenceFacts(
                signer=_peers(d, BIDDER),
                remote=BIDDER,
                party=_peers(d, BIDDER),
                content_hash=H1,
                size=3,
                attachment_sha256=flip(d, H1, [H2]),
                attachment_size=flip(d, 3, [4]),
            )
            verdict = c.evidence_verdict(e)
            ok = e.signer == e.party == BIDDER and (e.attachment_sha256, e.attachment_size) == (H1, 3)
        elif kind == "review":
            signer, creator = _peers(d, CREATOR), _peers(d, CREATOR)
            verdict = c.review_verdict(signer, CREATOR, creator)
            ok = signer == creator == CREATOR
        elif kind == "award":
            a = c.AwardFacts(
                remote=CREATOR,
                me=BIDDER,
                signer=_peers(d, CREATOR),
                creator=_peers(d, CREATOR),
                bidder=_peers(d, BIDDER),
                task_id="t1",
                arbiter_wallet=ARB_WALLET,
                price=10,
                announcement_signer=_peers(d, CREATOR),
                announcement_task_id=flip(d, "t1", ["t2"]),
                announcement_arbiter_wallet=flip(d, ARB_WALLET, [OTHER_WALLET, None]),
            )
            verdict = c.award_verdict(a)
            ok = (a.signer, a.creator, a.announcement_signer, a.bidder) == (CREATOR, CREATOR, CREATOR, BIDDER) and (
                a.announcement_task_id,
                a.announcement_arbiter_wallet,
            ) == ("t1", ARB_WALLET)
        elif kind == "award_bid":
            owner, price = flip(d, BIDDER, [STRANGER, None]), flip(d, 10, [9, None])
            verdict = c.award_bid_verdict(BIDDER, 10, owner, price)
            ok = (owner, price) == (BIDDER, 10)
        elif kind == "piece":
            note = d(st.sampled_from(["log", "  ", "", "x" * (MAX_EVIDENCE_NOTE + 1)]))
            size = d(st.sampled_from([0, 10, MAX_EVIDENCE_ATTACHMENT + 1]))
            verdict = c.evidence_piece_verdict(note, size)
            ok = len(note) <= MAX_EVIDENCE_NOTE and size <= MAX_EVIDENCE_ATTACHMENT and bool(note.strip() or size)
        else:
            remote = d(st.sampled_from(PEERS))
            phase = d(st.sampled_from(["disputed", "disputed", "active", "closed"]))
            verdict = c.dispute_notice_verdict(remote, BIDDER, CREATOR, BIDDER, phase)
            ok = remote == CREATOR and phase == "disputed"
        tally(seen, verdict)
        assert (verdict is None) == ok, (kind, verdict)

    run()
    report(
        "envelopes",
        seen,
        {
            "admitted",
            "result_signer_not_sender",
            "result_names_other_bidder",
            "artifact_too_large",
            "artifact_mismatch",
            "evidence_signer_not_sender",
            "attachment_mismatch",
            "review_signer_not_sender",
            "award_signer_not_sender",
            "award_for_other_bidder",
            "award_not_announced",
            "award_unknown_bid",
            "attachment_too_large",
            "note_too_long",
            "evidence_empty",
            "not_the_other_party",
            "escrow_not_disputed",
        },
    )


def test_the_arbiter_refuses_random_cases_resolutions_and_resolves_by_reason() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=400, deadline=None, database=None)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        d = data.draw
        kind = d(st.sampled_from(["case", "case_lock", "resolve", "resolution"]))
        verdict: Refusal | None
        if kind == "case":
            good = c.CaseFacts(
                me=ARBITER,
                remote=BIDDER,
                creator=CREATOR,
                arbiter=ARBITER,
                announcement_signer=CREATOR,
                announcement_arbiter_wallet=ARB_WALLET,
                award_signer=CREATOR,
                award_creator=CREATOR,
                award_bidder=BIDDER,
                award_arbiter_wallet=ARB_WALLET,
                result_signer=BIDDER,
                result_bidder=BIDDER,
                review_signer=d(st.sampled_from([CREATOR, None])),
                task_ids=("t1", "t1", "t1"),
                our_wallet=ARB_WALLET,
                tasks_in_book=0,
                known_task=d(st.booleans()),
            )
            flaws: dict[str, dict[str, Any]] = {
                "the creator opens it": {"remote": CREATOR},
                "a stranger opens it": {"remote": STRANGER},
                "another arbiter": {"arbiter": STRANGER},
                "announcement signed by another": {"announcement_signer": STRANGER},
                "announcement names another wallet": {"announcement_arbiter_wallet": OTHER_WALLET},
                "award signed by the bidder": {"award_signer": BIDDER},
                "result signed by the creator": {"result_signer": CREATOR},
                "review signed by the bidder": {"review_signer": BIDDER},
                "mixed tasks": {"task_ids": ("t1", "t1", "t2")},
                "our wallet is not the arbiter's": {"our_wallet": OTHER_WALLET},
                "the book is full": {"tasks_in_book": c.TASK_BOOK_MAX},
            }
            picked = d(st.sets(st.sampled_from(sorted(flaws)), max_size=2))
            f = dataclasses.replace(good, **{k: v for flaw in picked for k, v in flaws[flaw].items()})
            verdict = c.case_verdict(f)
            ok = (
                f.review_signer in (None, CREATOR)
                and f.announcement_signer == f.award_signer == CREATOR
                and f.result_signer == BIDDER
                and f.task_ids[-1] == "t1"
                and f.arbiter == ARBITER
                and f.announcement_arbiter_wallet == ARB_WALLET
                and f.remote in (CREATOR, BIDDER)
                and f.our_wallet == ARB_WALLET
                and (f.known_task or f.tasks_in_book < c.TASK_BOOK_MAX)
            )
        elif kind == "case_lock":
            lock = d(locks())
            phase = d(st.sampled_from(["disputed", "disputed", "active", "closed"]))
            lock = dataclasses.replace(lock, phase=phase)
            verdict = c.case_lock_verdict(lock, ARB_WALLET, PAYEE, 1_000)
            ok = phase == "disputed" and lock.arbiter == ARB_WALLET and lock.payee.lower() == PAYEE
            ok = ok and lock.amount == 1_000
        elif kind == "resolve":
            wallet = flip(d, ARB_WALLET, [OTHER_WALLET])
            phase = d(st.sampled_from(["disputed", "closed", "active"]))
            released = d(st.sampled_from([0, 40, 60]))
            action = c.resolve_verdict(wallet, ARB_WALLET, phase, released, 60)
            verdict = action if isinstance(action, Refusal) else None
            ok = wallet == ARB_WALLET and (phase == "disputed" or (phase == "closed" and released == 60))
            if ok:
                assert action == ("send" if phase == "disputed" else "recorded")
        else:
            remote = d(st.sampled_from(PEERS))
            phase, released = d(st.sampled_from(["closed", "disputed"])), d(st.sampled_from([60, 40]))
            verdict = c.resolution_verdict(remote, ARBITER, phase, released, 60)
            ok = remote == ARBITER and phase == "closed" and released == 60
        tally(seen, verdict)
        assert (verdict is None) == ok, (kind, verdict)

    run()
    report(
        "arbiter",
        seen,
        {
            "admitted",
            "review_not_creators",
            "case_not_creator_signed",
            "result_not_bidders",
            "case_mixes_tasks",
            "not_the_arbiter",
            "not_a_party",
            "other_arbiter_wallet",
            "book_full",
            "escrow_not_disputed",
            "lock_not_the_award",
            "not_the_arbiter_wallet",
            "resolution_not_on_chain",
        },
    )


def test_publish_funding_and_announcements_refuse_random_facts_by_reason() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        d = data.draw
        kind = d(st.sampled_from(["publish", "funding", "announcement"]))
        verdict: Refusal | None
        if kind == "publish":
            p = c.PublishFacts(
                arbiter_peer=flip(d, ARBITER, [None]),
                arbiter_wallet=flip(d, ARB_WALLET, [None]),
                arbiter_peer_valid=flip(d, True, [False]),
                params_size=flip(d, 10, [10**6]),
                own_wallet=flip(d, PAYEE, [None, ARB_WALLET]),
            )
            verdict = c.publish_verdict(p)
            ok = None not in (p.arbiter_peer, p.arbiter_wallet) and p.arbiter_peer_valid and p.params_size == 10
            ok = ok and p.own_wallet != ARB_WALLET
        elif kind == "funding":
            f = c.FundingFacts(
                payee=flip(d, PAYEE, [None]),
                arbiter_wallet=flip(d, ARB_WALLET, [None]),
                announced=flip(d, True, [False]),
                balance=d(st.integers(0, 2_000)),
                price=1_000,
                lock_gas_cost=100,
            )
            verdict = c.funding_verdict(f)
            ok = f.payee is not None and f.arbiter_wallet is not None and f.announced and f.balance >= 1_100
        else:
            names, size = d(st.booleans()), d(st.sampled_from([0, c.TASK_BOOK_MAX - 1, c.TASK_BOOK_MAX]))
            verdict = c.announcement_verdict(names, size)
            ok = names and size < c.TASK_BOOK_MAX
        tally(seen, verdict)
        assert (verdict is None) == ok, (kind, verdict)

    run()
    report(
        "creator",
        seen,
        {
            "admitted",
            "no_arbiter",
            "params_too_large",
            "arbiter_not_a_peer_id",
            "arbiter_is_self",
            "award_terms_unknown",
            "cannot_pay",
            "book_full",
        },
    )


# -- the close-out --------------------------------------------------------------------------------
def simulate_close_out(window_s: float, settle_after_s: float, creator_side: bool) -> tuple[int, float]:
    """Drive ``close_out_step`` as ``closeout.py`` does over a rejected task whose refund waits
    ``window_s``, with a lock that closes ``settle_after_s`` after the window ends (when the creator
    queues the refund), and no news to wake it: (chain reads, when the lock was seen closed)."""
    now, backoff, quiet_since, queued, reads = 0.0, c.CLOSE_POLL_MIN_S, 0.0, False, 0
    closes_at = window_s + settle_after_s
    while True:
        reads += 1
        step = c.close_out_step(
            c.CloseOutFacts(
                phase="closed" if now >= closes_at else "active",
                creator_side=creator_side,
                refund_queued=queued,
                receipt_state=ReceiptState.PENDING,
                to_creator=100,
                not_before=window_s,
                now=now,
                backoff=backoff,
            )
        )
        if step.action == "book":
            return reads, now
        if step.action == "queue_refund":
            assert creator_side and now >= window_s
            queued, backoff, quiet_since = True, c.CLOSE_POLL_MIN_S, now
            continue
        assert 0 < step.wait_s <= c.CLOSE_IDLE_POLL_S
        now += step.wait_s
        backoff = c.next_backoff(backoff, now - max(quiet_since, window_s))


@settings(max_examples=200, deadline=None, database=None)
@given(window_s=st.integers(0, 86_400), settle_after_s=st.floats(0.1, 55), creator_side=st.booleans())
def test_the_close_out_sleeps_through_the_dispute_window(
    window_s: int, settle_after_s: float, creator_side: bool
) -> None:
    """Waiting out a day's dispute window costs a read every 30 s, not two a second (the loop this
    replaced); the refund is queued the moment the window ends and the closed lock is seen within
    one short backoff."""
    reads, seen_closed_at = simulate_close_out(window_s, settle_after_s, creator_side)
    landing = math.log2(c.CLOSE_POLL_MAX_S / c.CLOSE_POLL_MIN_S) + settle_after_s / c.CLOSE_POLL_MAX_S + 1
    assert reads <= window_s / c.CLOSE_IDLE_POLL_S + 3 + landing
    assert window_s + settle_after_s <= seen_closed_at <= window_s + settle_after_s + c.CLOSE_POLL_MAX_S
    event(f"reads per hour of window: {int(3600 * reads / max(window_s, 3600))}")


@settings(max_examples=300, deadline=None, database=None)
@given(
    phase=st.sampled_from([None, "none", "active", "disputed", "closed"]),
    creator_side=st.booleans(),
    queued=st.booleans(),
    state=st.sampled_from([None, *ReceiptState]),
    to_creator=st.sampled_from([None, 0, 10]),
    not_before=st.floats(0, 1_000),
    now=st.floats(0, 1_000),
    backoff=st.sampled_from([c.CLOSE_POLL_MIN_S, 2.0, c.CLOSE_POLL_MAX_S]),
)
def test_every_close_out_step_books_queues_or_waits_a_bounded_time(
    phase: str | None,
    creator_side: bool,
    queued: bool,
    state: ReceiptState | None,
    to_creator: int | None,
    not_before: float,
    now: float,
    backoff: float,
) -> None:
    facts = c.CloseOutFacts(phase, creator_side, queued, state, to_creator, not_before, now, backoff)
    step = c.close_out_step(facts)
    event(f"close-out: {step.action}")
    assert (step.action == "book") == (phase == "closed")
    if step.action == "queue_refund":
        assert creator_side and not queued and to_creator and now >= not_before and phase == "active"
    if step.action == "wait":
        assert 0 < step.wait_s <= c.CLOSE_IDLE_POLL_S


@settings(max_examples=300, deadline=None, database=None)
@given(
    state=st.sampled_from([None, *ReceiptState]),
    decided=st.booleans(),
    not_before=st.floats(0, 1_000),
    now=st.floats(0, 1_000),
    to_bidder=st.sampled_from([0, 1, 60]),
)
def test_finalize_applies_only_a_due_decision(
    state: ReceiptState | None, decided: bool, not_before: float, now: float, to_bidder: int
) -> None:
    step = c.finalize_step(state, decided, not_before, now, to_bidder)
    event(f"finalize: {step.action}")
    final = state in (None, ReceiptState.SETTLED, ReceiptState.REFUNDED)
    if final:
        assert step.action == "done"
    elif not decided or now < not_before:
        assert step.action == "wait" and 0 < step.wait_s <= c.CLOSE_IDLE_POLL_S
    else:
        assert step.action == ("settle" if to_bidder else "refund")


def test_a_seller_disputes_silence_only_past_the_review_timeout_and_its_grace() -> None:
    due_at = 100.0 + 60 + c.SILENCE_GRACE_S
    facts = c.SilenceFacts(
        seller=True,
        result_state=ResultState.SUBMITTED,
        receipt_state=ReceiptState.PENDING,
        disputed=False,
        submitted_at=100.0,
        review_timeout_s=60,
        now=due_at,
        tried_at=0.0,
    )
    assert c.silence_dispute_due(facts)
    for changed in (
        {"now": due_at - 0.1},
        {"seller": False},
        {"result_state": ResultState.ACCEPTED},
        {"result_state": ResultState.REJECTED},
        {"receipt_state": ReceiptState.SETTLED},
        {"disputed": True},
        {"tried_at": due_at - c.SILENCE_RETRY_S + 0.1},
    ):
        assert not c.silence_dispute_due(dataclasses.replace(facts, **changed)), changed
    assert c.silence_dispute_due(dataclasses.replace(facts, tried_at=due_at - c.SILENCE_RETRY_S))


def test_a_seller_disputes_a_rejection_only_where_a_re_run_decides_and_after_its_grace() -> None:
    facts = c.SilenceFacts(
        seller=True,
        result_state=ResultState.REJECTED,
        receipt_state=ReceiptState.PENDING,
        disputed=False,
        submitted_at=100.0,
        review_timeout_s=60,
        now=110.0 + c.SILENCE_GRACE_S,
        tried_at=0.0,
        rerun_decides=True,
        rejected_at=110.0,
    )
    assert c.rejection_dispute_due(facts) and not c.silence_dispute_due(facts)
    for changed in (
        {"rerun_decides": False},
        {"now": 110.0 + c.SILENCE_GRACE_S - 0.1},
        {"seller": False},
        {"result_state": ResultState.SUBMITTED},
        {"receipt_state": ReceiptState.REFUNDED},
        {"disputed": True},
        {"tried_at": 110.0},
    ):
        assert not c.rejection_dispute_due(dataclasses.replace(facts, **changed)), changed


def test_a_creator_revokes_an_award_only_when_nothing_was_delivered_by_the_deadline() -> None:
    assert c.no_show_revoke_due(True, True, False, deadline=100.0, now=100.0)
    assert not c.no_show_revoke_due(True, True, False, deadline=100.0, now=99.9)
    assert not c.no_show_revoke_due(True, True, True, deadline=100.0, now=200.0)  # delivered: reviewed instead
    assert not c.no_show_revoke_due(True, False, False, deadline=100.0, now=200.0)  # revoked already
    assert not c.no_show_revoke_due(False, True, False, deadline=100.0, now=200.0)  # not our task
    # A revoke the book refused waits until its retry time, not the next sweep.
    assert not c.no_show_revoke_due(True, True, False, deadline=100.0, now=104.9, retry_at=105.0)
    assert c.no_show_revoke_due(True, True, False, deadline=100.0, now=105.0, retry_at=105.0)


def test_a_refused_revoke_waits_longer_each_time_up_to_a_bound() -> None:
    waits = [0.0]
    for _ in range(12):
        waits.append(c.next_revoke_wait(waits[-1]))
    assert waits[1] == c.REVOKE_RETRY_MIN_S > 1.0  # not every one-second sweep
    assert all(later >= earlier for earlier, later in itertools.pairwise(waits))
    assert waits[-1] == c.REVOKE_RETRY_MAX_S and max(waits) == c.REVOKE_RETRY_MAX_S


def test_an_award_is_taken_only_with_the_parameters_the_announcement_committed_to() -> None:
    announced = '{"limits": {"fuel": 1000}}'
    committed = hashlib.sha256(announced.encode()).hexdigest()
    assert c.award_params_verdict(committed, announced) is None
    changed = c.award_params_verdict(committed, '{"limits": {"fuel": 1000}, "arbitration": "person"}')
    assert changed is not None and changed.code == ErrorCode.FORBIDDEN and changed.reason == "award_params_changed"
