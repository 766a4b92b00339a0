"""The pure decisions of verified inference: what a spot-check's facts mean, and a provider's standing."""

from __future__ import annotations

import dataclasses

from protocols.machines.verify import (
    CheckFacts,
    LeaseCaseFacts,
    check_verdict,
    consumer_dispute_verdict,
    lease_case_verdict,
    standing,
)
from runtime.verify.spot import MAX_CUT_CHARS, text_matches

GOOD = CheckFacts(root_signed=True, answered=True, openings_match=True, holds_file=True)


def test_a_check_passes_only_when_every_fact_holds() -> None:
    assert check_verdict(GOOD).outcome == "passed" and check_verdict(GOOD).refusal() is None
    cases = {
        "unsigned_root": dataclasses.replace(GOOD, root_signed=False),
        "no_answer": dataclasses.replace(GOOD, answered=False),
        "opening_mismatch": dataclasses.replace(GOOD, openings_match=False),
        "prompt_mismatch": dataclasses.replace(GOOD, prompt_matches=False),
        "logprob": dataclasses.replace(GOOD, findings_reason="logprob"),
        "not_sampled": dataclasses.replace(GOOD, findings_reason="not_sampled"),
        "no_proof": dataclasses.replace(GOOD, proof_sent=False),
        "model_mismatch": dataclasses.replace(GOOD, model_matches=False, holds_file=False),  # no file needed
        "text_mismatch": dataclasses.replace(GOOD, text_matches=False),
    }
    for reason, facts in cases.items():
        verdict = check_verdict(facts)
        assert (verdict.outcome, verdict.reason, verdict.stop_countersigning) == ("failed", reason, True)
        refusal = verdict.refusal()
        assert refusal is not None and refusal.reason == f"verification_{reason}"
    # Without the provider's signature on the root there is no evidence to dispute with.
    assert not check_verdict(cases["unsigned_root"]).dispute and check_verdict(cases["logprob"]).dispute
    assert not check_verdict(cases["no_proof"]).dispute
    # Signed for another file than the record states: refused, but the record is not kept as evidence.
    assert not check_verdict(cases["model_mismatch"]).dispute
    # A consumer without the advertised file can neither pass nor fail the provider.
    unverifiable = check_verdict(dataclasses.replace(GOOD, holds_file=False, findings_reason="logprob"))
    assert (unverifiable.outcome, unverifiable.stop_countersigning) == ("unverifiable", False)


def test_standing_rises_with_passed_checks_and_drops_to_zero_on_a_failure() -> None:
    assert standing(0, 0) == 0.5
    assert standing(0, 0) < standing(3, 0) < standing(30, 0) < 1
    assert standing(100, 1) == 0.0


def test_the_text_received_must_be_what_the_ids_spell_but_for_a_stop_strings_cut() -> None:
    spelled = "Paris is the capital of France.\n\nUser: and Spain?"
    assert text_matches(spelled, spelled)
    assert text_matches(spelled, "Paris is the capital of France.")  # cut at a stop string
    assert not text_matches(spelled, "Buy now! Paris is the capital of France.")  # edited
    assert not text_matches("Paris", "Paris is the capital")  # the ids cover less than was sent
    long_stop = "x" * (MAX_CUT_CHARS + 10)
    assert not text_matches("ok" + long_stop, "ok")
    assert text_matches("ok" + long_stop, "ok", longest_stop=len(long_stop))  # the request named it


def test_what_a_failure_can_be_disputed_with_depends_on_what_the_signed_body_binds() -> None:
    prompt = dataclasses.replace(GOOD, prompt_matches=False)
    text = dataclasses.replace(GOOD, text_matches=False)
    # v1 binds the prompt only by length and not the text streamed: the consumer's word, no dispute.
    assert not check_verdict(prompt).dispute and not check_verdict(text).dispute
    assert check_verdict(dataclasses.replace(prompt, body_version=2)).dispute
    assert check_verdict(dataclasses.replace(text, body_version=2)).dispute
    # The signed hashes differ from what this node rendered or received: refused, never disputed.
    for facts, reason in (
        (dataclasses.replace(GOOD, prompt_hash_matches=False, body_version=2), "prompt_hash_mismatch"),
        (dataclasses.replace(GOOD, text_hash_matches=False, body_version=2), "text_hash_mismatch"),
    ):
        verdict = check_verdict(facts)
        assert (verdict.outcome, verdict.reason, verdict.dispute) == ("failed", reason, False)
        refusal = verdict.refusal()
        assert refusal is not None and refusal.reason == f"verification_{reason}"


def test_the_arbiter_refunds_in_full_only_on_its_own_rerun_of_evidence_the_provider_signed() -> None:
    from protocols.machines.verify import ArbitrationFacts, arbitrate

    v2 = dataclasses.replace(GOOD, body_version=2)
    cheat = check_verdict(dataclasses.replace(v2, findings_reason="logprob"))
    honest = check_verdict(v2)

    def decided(recheck: object, bound: bool = True) -> tuple[str, int, str]:
        result = arbitrate(ArbitrationFacts(bound, recheck, left=1000, owed_if_honest=300))  # type: ignore[arg-type]
        return result.outcome, result.to_payee, result.reason

    assert decided(cheat) == ("refund", 0, "logprob")  # everything left back to the consumer
    assert decided(check_verdict(dataclasses.replace(v2, text_matches=False))) == ("refund", 0, "text_mismatch")
    assert decided(honest) == ("reject", 300, "passed")  # the provider is paid what it is owed
    # A package that does not bind this escrow (another lease, another prompt than signed) decides nothing.
    assert decided(cheat, bound=False) == ("reject", 300, "evidence_unbound")
    # A failure on what the provider never signed (a v1 body's text, a forged root) is no cheat of its.
    assert decided(check_verdict(dataclasses.replace(GOOD, text_matches=False)))[0] == "reject"
    assert decided(check_verdict(dataclasses.replace(v2, root_signed=False)))[0] == "reject"
    assert decided(check_verdict(dataclasses.replace(v2, holds_file=False))) == ("undecided", 0, "no_file")
    owed_more = arbitrate(ArbitrationFacts(True, honest, left=100, owed_if_honest=300))
    assert (owed_more.to_payee, owed_more.to_payer(100)) == (100, 0)  # never more than is left


def test_an_arbiter_takes_only_a_frozen_escrow_of_its_own_for_the_very_lease_the_evidence_names() -> None:
    lease = "ab" * 32
    case = LeaseCaseFacts(
        lease_id=lease,
        escrow_id="0x" + lease,
        package_lease=lease,
        our_wallet="0x" + "1" * 40,
        escrow_arbiter="0x" + "1" * 40,
        phase="disputed",
        payer="0x" + "3" * 40,
        case_signer="0x" + "3" * 40,
    )
    assert lease_case_verdict(case) is None
    for change, reason in (
        ({"phase": "none"}, "no_escrow"),
        ({"escrow_arbiter": "0x" + "2" * 40}, "not_arbiter"),
        ({"threshold": 2}, "not_arbiter"),  # a panel escrow: votes, not one arbiter's resolve
        ({"package_lease": "cd" * 32}, "escrow_not_lease"),  # evidence of another lease
        ({"escrow_id": "0x" + "cd" * 32}, "escrow_not_lease"),
        ({"phase": "active"}, "not_disputed"),
        ({"phase": "closed"}, "not_disputed"),
        ({"case_signer": "0x" + "4" * 40}, "case_not_payer"),  # the payee froze it and states what it is owed
        ({"case_signer": None}, "case_not_payer"),
    ):
        refusal = lease_case_verdict(dataclasses.replace(case, **change))  # type: ignore[arg-type]
        assert refusal is not None and refusal.reason == reason


def test_a_consumer_disputes_only_with_signed_evidence_on_an_escrow_of_the_lease_s_own() -> None:
    facts = {"evidence": True, "escrowed": True, "channel": False, "arbiter_known": True}
    assert consumer_dispute_verdict(**facts) is None
    for change, reason in (
        ({"evidence": False}, "no_evidence"),
        ({"escrowed": False}, "no_lease_escrow"),
        ({"channel": True}, "no_lease_escrow"),  # a channel's lock pays many leases
        ({"arbiter_known": False}, "arbiter_unknown"),
    ):
        refusal = consumer_dispute_verdict(**{**facts, **change})
        assert refusal is not None and refusal.reason == reason


def test_a_leased_verifier_is_never_the_provider_under_check_nor_this_node_nor_dearer_than_the_call() -> None:
    import random

    from protocols.machines.verify import MAX_VERIFIER_TRIES, VerifierOffer, choose_verifiers

    offers = [VerifierOffer("cheat", 1), VerifierOffer("me", 2), VerifierOffer("b", 30), VerifierOffer("a", 30)]
    offers += [VerifierOffer("c", 10), VerifierOffer("c", 10), VerifierOffer("dear", 10**6)]
    rng = random.Random(1)
    chosen = choose_verifiers(offers, provider="cheat", self_id="me", rng=rng, checked_price=1000)
    assert sorted(chosen) == ["a", "b", "c"][:MAX_VERIFIER_TRIES]  # in a random order; "dear" costs more than the call
    assert choose_verifiers(offers, provider="cheat", self_id="me", rng=rng, max_price=20) == ["c"]
    assert choose_verifiers([VerifierOffer("cheat", 0)], provider="cheat", self_id="me", rng=rng) == []
