"""Verified inference's decisions (issue 21), as pure functions of fetched facts.

:func:`check_verdict` turns what a spot-check found into a typed outcome and its consequences: a
provider whose openings do not match the root it signed, who does not answer, or whose openings
disagree with the verifier's prefill of the advertised file has failed; the consumer then stops
countersigning, ends the lease and opens a dispute with the signed evidence. So has a provider
that sends no proof in the end frame of a call although its record names the file, one that
signs for another file than its record advertises, and one whose proof's token ids do not spell
the text the consumer received. :func:`every_call_facts` says which of these need no file, and so
fail a call whether or not it was drawn for a check. A check the consumer
cannot run (it holds another file, or none) is ``unverifiable``: no consequence, and no credit.

:func:`standing` is the per-provider score the router ranks by: checks passed raise it slowly, a
failed check (this node's own, never a stranger's report alone) puts the provider last.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from protocols.machines.verdict import Refusal
from runtime.errors import ErrorCode

Outcome = Literal["passed", "failed", "unverifiable"]
# Stable reasons, as the ledger records them and `clawnode find` shows them.
FailReason = Literal[
    "opening_mismatch",
    "prompt_mismatch",
    "no_answer",
    "logprob",
    "logprob_mean",
    "top",
    "not_sampled",
    # A declared temperature above 0, the reply far greedier than sampling at it gives
    # (runtime.verify.check.greedy_tail below TOO_GREEDY_BOUND): served greedily or much cooler.
    "too_greedy",
    "unsigned_root",
    "no_proof",
    "model_mismatch",
    # The signed temperature or top_p is not the request's (clamped as the provider signs it): every
    # sampling-dependent rule would be checked against what the provider chose to sign.
    "sampling_mismatch",
    "text_mismatch",
    "prompt_hash_mismatch",
    "text_hash_mismatch",
    # A v4 body's signed request hash is not the request this node sent: the provider signed for another.
    "request_hash_mismatch",
    # A body of an older version than the call protocol the provider answered on owes (``proof_version_met``).
    "proof_downgraded",
]
# Failures with no provider signature behind them: nothing to dispute with.
UNSIGNED_REASONS = frozenset({"unsigned_root", "no_proof"})
# Failures that rest on the consumer's word about the request or the text it received: disputable
# only where the provider's signed body binds those (a v2 body, evidence.CommitmentBody).
BOUND_ONLY_IN_V2 = frozenset({"prompt_mismatch", "text_mismatch"})
# The text received differs from the text the provider signed it streamed: the chunks are not signed,
# so only the consumer says what arrived; and a signed prompt hash that differs from this node's
# rendering needs the request itself bound to convince an arbiter (docs/verified-inference.md).
# The request is not signed either, so a signed sampling that differs from it (``sampling_mismatch``)
# is the consumer's word too: refused, not disputed (an arbiter never sees the request); so is a signed
# ``seeded`` flag that is not the request's.
CONSUMERS_WORD = frozenset(
    {"text_hash_mismatch", "prompt_hash_mismatch", "sampling_mismatch", "request_hash_mismatch", "proof_downgraded"}
)
# Except where the body signs the request (v4, ``request_sha256``): the arbiter, handed that request,
# renders the prompt with its own copy of the file, so a signed prompt that is not that rendering
# (another tokenizer behind the advertised file, a shortened prompt) is the provider's word proved false.
REQUEST_BOUND_IN_V4 = frozenset({"prompt_hash_mismatch"})
# ``too_greedy`` holds only for draws that were the provider's own: a request that names a ``seed``
# fixes the engine's draws, and a consumer that picks one can make an honest sampled reply come out all
# greedy; the arbiter, re-running the reply without the request, cannot tell. So it is disputed only
# where the provider signed ``seeded: false`` (a v3 body, evidence.CommitmentBody); on a body signed
# seeded, or one without the flag (v1, v2), it is the consumer's word (:func:`greedy_disputable`).
SIGNED_UNSEEDED_ONLY = frozenset({"too_greedy"})
# Signed for another file than the record advertises: refused, not disputed. No signature binds the
# advertised file to the lease (the grant names the capability only; a record is not dated against the
# lease, and a provider may publish another file at any time), and the commitment names the file that
# really served the call, so an arbiter's re-run would pass it (docs/verified-inference.md, "Disputes").
# A call that does not fit the file its proof names is what an arbiter decides: the consumer checks a
# mismatched call against that file too, and such a failure is disputed under its own reason.
RECORD_UNBOUND = frozenset({"model_mismatch"})


@dataclass(frozen=True)
class CheckFacts:
    """What the adapter fetched for one spot-check of one call."""

    root_signed: bool  # the call's commitment root is in a receipt the provider signed
    answered: bool  # the provider sent the openings asked for, in time
    openings_match: bool  # every opening opens against that root
    holds_file: bool  # this verifier holds the advertised file (same sha256)
    prompt_matches: bool = True  # the signed prompt length is what this verifier's rendering of the request gives
    findings_reason: str = ""  # runtime.verify.check.Findings.reason(): "" when the comparison passed
    proof_sent: bool = True  # the end frame carried a proof (a drawn call the provider must commit to)
    model_matches: bool = True  # the signed model sha256 is the one the provider's record advertises
    sampling_matches: bool = True  # the signed temperature and top_p are the request's (``signed_sampling``)
    # A v4 body's signed request hash is the request this node sent's (True for a body without one).
    request_hash_matches: bool = True
    # The body is of the version the call protocol the provider answered on owes (``proof_version_met``).
    version_met: bool = True
    text_matches: bool = True  # the text received is what the proof's token ids spell
    # v2 bodies only (True for v1): the signed prompt_sha256 is this verifier's rendering's ids' hash,
    # the signed text_sha256 the text received's.
    prompt_hash_matches: bool = True
    text_hash_matches: bool = True
    body_version: int = 1  # the signed commitment body's ``v``
    # The body's signed ``seeded`` flag (v3): True the request named a seed, False the draws were the
    # provider's own; None for a body without the flag (v1, v2), counted as seeded.
    signed_seeded: bool | None = None


@dataclass(frozen=True)
class CheckVerdict:
    outcome: Outcome
    reason: str = ""
    body_version: int = 1
    signed_seeded: bool | None = None

    @property
    def stop_countersigning(self) -> bool:
        return self.outcome == "failed"

    @property
    def dispute(self) -> bool:
        """Open a dispute with the evidence: only when the provider's own signature binds the root."""
        if self.outcome != "failed":
            return False
        if self.reason in REQUEST_BOUND_IN_V4:
            return self.body_version >= 4
        if self.reason in UNSIGNED_REASONS | CONSUMERS_WORD | RECORD_UNBOUND:
            return False
        if self.reason in SIGNED_UNSEEDED_ONLY:
            return greedy_disputable(self.signed_seeded)
        return self.body_version >= 2 or self.reason not in BOUND_ONLY_IN_V2

    def refusal(self) -> Refusal | None:
        if self.outcome != "failed":
            return None
        return Refusal(
            ErrorCode.FORBIDDEN, f"verification_{self.reason}", f"the provider failed verification ({self.reason})"
        )


def check_verdict(facts: CheckFacts) -> CheckVerdict:
    verdict = _check_verdict(facts)
    return CheckVerdict(verdict.outcome, verdict.reason, facts.body_version, facts.signed_seeded)


def _check_verdict(facts: CheckFacts) -> CheckVerdict:
    if not facts.proof_sent:
        return CheckVerdict("failed", "no_proof")
    if not facts.root_signed:
        return CheckVerdict("failed", "unsigned_root")
    if not facts.model_matches:
        # Signed for another file than its record advertises: no file needed to see it.
        return CheckVerdict("failed", "model_mismatch")
    if not facts.sampling_matches:
        # Signed for another temperature or top_p than asked: no file needed to see it.
        return CheckVerdict("failed", "sampling_mismatch")
    if not facts.version_met:
        # An older body than the protocol owes: what a dispute needs left out. No file needed to see it.
        return CheckVerdict("failed", "proof_downgraded")
    if not facts.request_hash_matches:
        # Signed for another request than the one sent: no file needed to see it.
        return CheckVerdict("failed", "request_hash_mismatch")
    if not facts.answered:
        return CheckVerdict("failed", "no_answer")
    if not facts.openings_match:
        return CheckVerdict("failed", "opening_mismatch")
    if not facts.holds_file:
        return CheckVerdict("unverifiable", "no_file")
    if not facts.prompt_matches:
        return CheckVerdict("failed", "prompt_mismatch")
    if not facts.prompt_hash_matches:
        return CheckVerdict("failed", "prompt_hash_mismatch")
    if not facts.text_hash_matches:
        return CheckVerdict("failed", "text_hash_mismatch")
    if not facts.text_matches:
        return CheckVerdict("failed", "text_mismatch")
    if facts.findings_reason:
        return CheckVerdict("failed", facts.findings_reason)
    return CheckVerdict("passed")


@dataclass(frozen=True)
class CallFacts:
    """What a consumer sees of every call that ended after a reply, with no file and no prefill
    (:func:`every_call_facts`): checked on every call, drawn for a spot check or not."""

    proof_sent: bool  # the call's last frame carried a proof that parses
    # No proof: one was owed (the provider's record names a file, the request is verifiable, tokens
    # were produced: by the end frame's usage or the chunks received, whichever says more).
    proof_owed: bool = False
    # The call ended after its text otherwise than by its own end frame: an error frame, a stop, an end
    # frame answering this side's cancel (``lease_consumer.CUT_ENDINGS``). Its missing proof is an
    # unproved cut, forgiven once and then drawn (``lease_consumer.cut_forgiven``), not failed here.
    cut: bool = False
    # The proof came on an error frame (an error, or a stop answered by one): an honest provider whose
    # write of a chunk failed (its consumer not reading for ``CALL_READ_TIMEOUT_S``) signs text that
    # never left, so its text hash is compared only in a drawn check, as before.
    error_frame: bool = False
    root_signed: bool = True  # the body's signature is the provider's, for this provider and lease
    sampling_matches: bool = True  # the signed temperature, top_p and seeded flag are the request's
    # The signed ``request_sha256`` (v4) is the hash of the request sent (:func:`signed_hash_matches`).
    request_hash_matches: bool = True
    # The body is of the version the call protocol owes (:func:`proof_version_met`).
    version_met: bool = True
    # The signed ``text_sha256`` (v2 to v4) is the hash of the text received (:func:`signed_hash_matches`).
    text_hash_matches: bool = True
    body_version: int = 1
    signed_seeded: bool | None = None


def every_call_facts(call: CallFacts) -> CheckFacts | None:
    """The facts :func:`check_verdict` fails a call on whatever the draw, or None when nothing needing
    no file is wrong (the prefill, the openings and the rest wait for a drawn check). A missing proof
    the end frame owed (``no_proof``: a cut's goes by its forgiven-once rule and the draw), a signature
    that is not the provider's for this lease (``unsigned_root``), a signed sampling that is not the
    request's (``sampling_mismatch``), a body older than the call protocol owes (``proof_downgraded``:
    a v3 body on 1.2.0 binds no request, so its substitute could not be refunded), a signed request
    hash that is not the request sent
    (``request_hash_mismatch``: an arbiter could not bind the request of a v4 dispute to it), a signed
    text hash that is not the text received, on an end frame (``text_hash_mismatch``): each needs a
    hash or a signature check, and an honest provider
    never trips one (its end frame of a reply always carries a proof that hashes the text it wrote),
    so a provider that omits its proofs, or signs one for other text, is caught on that very call,
    not on one call in ``verify.sample_rate``. The reasons, and whether each is disputed, are
    :func:`check_verdict`'s, as after a drawn check."""
    if not call.proof_sent:
        if call.proof_owed and not call.cut:
            return CheckFacts(False, False, False, False, proof_sent=False)
        return None
    # Everything else as a passed check would find it: only the one fact that fails is set.
    sound = CheckFacts(True, True, True, True, body_version=call.body_version, signed_seeded=call.signed_seeded)
    if not call.root_signed:
        return replace(sound, root_signed=False)
    if not call.sampling_matches:
        return replace(sound, sampling_matches=False)
    if not call.version_met:
        return replace(sound, version_met=False)
    if not call.request_hash_matches:
        return replace(sound, request_hash_matches=False)
    if not call.text_hash_matches and not call.error_frame:
        return replace(sound, text_hash_matches=False)
    return None


def proof_version_met(signed: int, owed: int, *, request_hashable: bool) -> bool:
    """Whether a body's version ``signed`` is what the call protocol the provider answered on ``owed``
    (``protocols.lease.base.body_version_owed``): at least that, except that a request JSON cannot hash
    (``request_hashable`` False: ``evidence.request_sha256`` is None) is owed v3 at most, as an honest
    provider signs it."""
    return signed >= (owed if request_hashable else min(owed, 3))


def signed_hash_matches(signed: str | None, seen: str | None) -> bool:
    """Whether a hash a body signs is the hash of what this side saw: the text received (``text_sha256``,
    None in a v1 body) or the request sent (``request_sha256``, None before v4). ``seen`` None: nothing
    known here to compare (no text; a request JSON cannot write exactly), so nothing fails."""
    return signed is None or seen is None or signed == seen


MAX_TEMPERATURE_MILLI = 2000  # what a commitment body can sign (evidence.CommitmentBody)
MAX_TOP_P_MILLI = 1000


def signed_sampling(declared: tuple[int, int]) -> tuple[int, int]:
    """The (temperature, top_p) × 1000 an honest provider signs for a request that declares ``declared``
    (``runtime.verify.provider.declared_sampling``): clamped as ``evidence.call_proof`` clamps it."""
    temperature, top_p = declared
    return min(MAX_TEMPERATURE_MILLI, temperature), min(MAX_TOP_P_MILLI, top_p)


def sampling_matches(signed: tuple[int, int], declared: tuple[int, int] | None) -> bool:
    """Whether a proof's signed (temperature, top_p) × 1000 is what the request asked (``declared``:
    the request's own, None when it names none this node can read: nothing to compare)."""
    return declared is None or signed == signed_sampling(declared)


def seeded_matches(signed: bool | None, requested: bool) -> bool:
    """Whether a proof's signed ``seeded`` flag is the request's (``requested``: it named a ``seed``,
    ``evidence.request_seeded``); a body without the flag (None: v1, v2) signs nothing to compare. One
    that differs is ``sampling_mismatch``, as a signed temperature that differs: a provider that signs
    seeded for an unseeded request would escape a ``too_greedy`` dispute."""
    return signed is None or signed == requested


def findings_counted(reason: str, *, seeded: bool) -> str:
    """What a comparison's finding (``Findings.reason()``) counts for: ``too_greedy`` is not applied to
    a request that names a ``seed`` (the consumer chose the draws, so it could choose greedy ones)."""
    return "" if seeded and reason == "too_greedy" else reason


def greedy_disputable(signed_seeded: bool | None) -> bool:
    """Whether a ``too_greedy`` failure rests on the provider's own signed words: only where its body
    signs that the request named no seed (False), so the draws were its own randomness."""
    return signed_seeded is False


def rechecked_findings(reason: str, signed_seeded: bool | None) -> str:
    """What an arbiter's re-run finding counts for: the arbiter does not re-run the request's sampling
    (it renders a v4 package's request only for its prompt), so it applies
    ``too_greedy`` only where the provider signed the draws its own (:func:`greedy_disputable`); a body
    signed seeded, or one without the flag, is not held to it (an honest reply a consumer's chosen seed
    made greedy passes)."""
    return findings_counted(reason, seeded=not greedy_disputable(signed_seeded))


def standing(passed: int, failed: int) -> float:
    """0 after any failed check by this node; else rises from 0.5 toward 1 with checks passed."""
    if failed > 0:
        return 0.0
    return (passed + 1) / (passed + 2)


ArbitrationOutcome = Literal["refund", "reject", "undecided"]


@dataclass(frozen=True)
class ArbitrationFacts:
    """What a lease's arbiter fetched and re-ran for a verification dispute (docs/verified-inference.md).

    ``evidence_bound``: the package binds this escrow: its signed commitment names the disputed lease
    and the escrow's payee's node, is a v2 to v4 body, and the package's text hashes to the signed
    ``text_sha256``, its prompt ids to the signed ``prompt_sha256`` (v2, v3) or its request to the
    signed ``request_sha256`` (v4). ``recheck``: the arbiter's own :func:`check_verdict` over the
    package (for v4, first its own rendering of the request: a signed prompt that is not it fails
    ``prompt_mismatch`` or ``prompt_hash_mismatch``; then ``runtime.verify.spot.check_call`` on its copy
    of the file the proof names, by sha256; its finding counted by :func:`rechecked_findings`), which carries the
    body's signed ``seeded`` flag as plain data (``CheckVerdict.signed_seeded``). ``left``: what is
    left of the frozen escrow; ``owed_if_honest``: what the consumer's countersigned receipts plus the
    disputed call's units come to, not yet released."""

    evidence_bound: bool
    recheck: CheckVerdict
    left: int
    owed_if_honest: int


@dataclass(frozen=True)
class Arbitration:
    outcome: ArbitrationOutcome
    to_payee: int = 0
    reason: str = ""

    def to_payer(self, left: int) -> int:
        return left - self.to_payee


def arbitrate(facts: ArbitrationFacts) -> Arbitration:
    """A verification dispute, decided without a person where the arbiter's own re-run decides it: a
    failure the provider's signature binds → everything left goes back to the consumer (the cheat loses
    the sale; what it released before the freeze stays released); a pass, or evidence that does not bind
    this escrow or fails only on what the provider never signed → the provider is paid what it is owed;
    a re-run the arbiter cannot do (no copy of the file) → undecided, nothing resolved."""
    left = max(0, facts.left)
    paid = min(left, max(0, facts.owed_if_honest))
    if not facts.evidence_bound:
        return Arbitration("reject", paid, "evidence_unbound")
    verdict = facts.recheck
    if verdict.outcome == "unverifiable":
        return Arbitration("undecided", 0, verdict.reason or "unverifiable")
    if verdict.outcome == "failed" and verdict.dispute:
        return Arbitration("refund", 0, verdict.reason)
    return Arbitration("reject", paid, verdict.reason or "passed")


@dataclass(frozen=True)
class StaleFreezeFacts:
    """What a lease's arbiter read when the escrow's payee asks it to end a freeze no case came for:
    the escrow as the chain holds it, the chain's time, whether a case for it is being decided, and
    the payee's newest receipt the payer vouched for (its amount; None: none that verifies)."""

    lease_id: str
    escrow_id: str  # 0x hex
    our_wallet: str
    escrow_arbiter: str
    phase: str
    threshold: int
    amount: int
    released: int
    deadline: int
    window: int
    chain_now: int
    deciding: bool
    vouched: int | None


def stale_freeze_verdict(facts: StaleFreezeFacts) -> Refusal | Arbitration:
    """A frozen escrow whose payer sent no case by the time it would have been refundable (deadline +
    window: the payer's whole time to dispute): the payee is paid what the payer's own voucher says it
    owes, the rest goes back to the payer (``reject``, reason ``no_case``). Nothing more than the payer
    signed, so a payee that froze the escrow itself gains nothing by it; a payer that froze and stayed
    silent no longer holds the payee's vouched pay for good."""
    if facts.phase == "none":
        return Refusal(ErrorCode.NOT_FOUND, "no_escrow", "no such escrow on chain")
    if facts.threshold or facts.escrow_arbiter.lower() != facts.our_wallet.lower():
        return Refusal(ErrorCode.FORBIDDEN, "not_arbiter", "this node's wallet is not the escrow's arbiter")
    if facts.escrow_id.lower().removeprefix("0x") != facts.lease_id:
        return Refusal(ErrorCode.INVALID_ARGUMENT, "escrow_not_lease", "the escrow and the lease differ")
    if facts.phase != "disputed":
        return Refusal(ErrorCode.CONFLICT, "not_disputed", "the escrow is not disputed")
    if facts.deciding:
        return Refusal(ErrorCode.CONFLICT, "case_in_progress", "a case for this escrow is being decided")
    if facts.chain_now <= facts.deadline + facts.window:
        return Refusal(ErrorCode.CONFLICT, "case_time_left", "the payer may still send its case")
    if facts.vouched is None:
        return Refusal(ErrorCode.FORBIDDEN, "no_voucher", "no receipt with the payer's voucher for this escrow")
    left = max(0, facts.amount - facts.released)
    return Arbitration("reject", min(left, max(0, facts.vouched - facts.released)), "no_case")


@dataclass(frozen=True)
class LeaseCaseFacts:
    """What a lease's arbiter read for a verification dispute before re-running anything: the case as
    sent and the escrow as the chain holds it (``runtime.escrow.client.EscrowState``)."""

    lease_id: str  # the case's lease (a lease's escrow id is its id: ``lease_id_for``)
    escrow_id: str  # 0x hex: the escrow the case names
    package_lease: str  # the lease the dispute package (and its signed body) names
    our_wallet: str
    escrow_arbiter: str
    phase: str  # none, active, disputed, closed
    threshold: int = 0  # a panel escrow's m (its arbiter is then no one wallet)
    payer: str = ""  # the escrow's payer (the case's)
    case_signer: str | None = None  # who signed the case and its owed figure (None: no valid signature)


def lease_case_verdict(facts: LeaseCaseFacts) -> Refusal | None:
    """Whether this node takes the case: the escrow exists, names this node's wallet as its one arbiter,
    is frozen (the consumer disputed it), is the escrow of the very lease the package is about, and its
    payer signed the case."""
    if facts.phase == "none":
        return Refusal(ErrorCode.NOT_FOUND, "no_escrow", "no such escrow on chain")
    if facts.threshold or facts.escrow_arbiter.lower() != facts.our_wallet.lower():
        return Refusal(ErrorCode.FORBIDDEN, "not_arbiter", "this node's wallet is not the escrow's arbiter")
    if facts.escrow_id.lower().removeprefix("0x") != facts.lease_id or facts.package_lease != facts.lease_id:
        return Refusal(ErrorCode.INVALID_ARGUMENT, "escrow_not_lease", "the escrow, the lease and the evidence differ")
    if facts.phase != "disputed":
        return Refusal(ErrorCode.CONFLICT, "not_disputed", "the escrow is not disputed")
    if facts.case_signer is None or facts.case_signer.lower() != facts.payer.lower():
        # The payee may freeze the escrow too: only the payer states what it owes (else a provider would
        # send its own honest call's package and name the whole lock as owed).
        return Refusal(ErrorCode.FORBIDDEN, "case_not_payer", "the escrow's payer did not sign this case")
    return None


def consumer_dispute_verdict(*, evidence: bool, escrowed: bool, channel: bool, arbiter_known: bool) -> Refusal | None:
    """Whether the consumer freezes a lease's escrow and sends its evidence after a failed check: only
    with a package the provider's signature binds, on a lease with an escrow of its own (a channel's
    lock serves many leases: one lease's cheat does not freeze the others'), whose arbiter it can reach."""
    if not evidence:
        return Refusal(ErrorCode.NOT_FOUND, "no_evidence", "no signed evidence of this failure")
    if not escrowed or channel:
        return Refusal(ErrorCode.CONFLICT, "no_lease_escrow", "the lease has no escrow of its own to dispute")
    if not arbiter_known:
        return Refusal(ErrorCode.UNAVAILABLE, "arbiter_unknown", "no peer is known for the escrow's arbiter")
    return None


def owed_total(consumer_says: int, countersigned: int) -> int:
    """What an honest provider is owed for a lease in all: the consumer's figure (its vouchers and the
    disputed call), never less than the newest receipt the consumer countersigned (signed by both)."""
    return max(0, consumer_says, countersigned)


# Leased verifiers (``verify:<sha256>``, protocols/lease/verifier.py): a consumer without the file a
# proof names leases another node that holds it, never the provider under check. Verifiers are picked at
# random among those at an acceptable price, weighted by their own standing, so a cheat's accomplices
# (other peer ids selling checks of its file cheaply and always answering passed) are not asked merely
# for being cheapest; a share of passes goes to a second, different verifier (``second_opinion``).
MAX_VERIFIER_TRIES = 3  # verifiers asked, one after another, for one check
NEW_VERIFIER_STANDING = 0.5  # a verifier this node has no record of
MIN_VERIFIER_WEIGHT = 0.01  # a discredited verifier is still picked, rarely (it may have been the honest one)
VERIFIER_LOSS = 4  # each overruled failure or disagreement weighs as much as this many agreements


@dataclass(frozen=True)
class VerifierOffer:
    """A ``verify:<sha256>`` provider as discovery found it. ``reads``: the newest commitment body
    version its request schema says it takes (``protocols.lease.verifier.body_versions_read``; 3 for a
    verifier of a release that states none: one before v4 bodies)."""

    peer_id: str
    price_per_unit: int
    reads: int = 3


def verifier_standing(agreed: int, overruled: int, disagreed: int) -> float:
    """A verifier's standing with this node: 0.5 before anything is known, rising toward 1 with each
    answer a second verifier or the arbiter confirmed, falling with each failure the arbiter overruled
    and each disagreement with a second verifier (never to 0)."""
    agreed, lost = max(0, agreed), max(0, overruled) + max(0, disagreed)
    return (agreed + 1) / (agreed + 2 + VERIFIER_LOSS * lost)


def acceptable_price(price: int, *, max_price: int | None, checked_price: int | None) -> bool:
    """A verifier's price per token checked is acceptable when within ``max_price`` (where one is set)
    and not above the price per token of the call it checks (where known): a check never costs more
    per token than the service it checks, whatever the cheapest verifier asks."""
    if max_price is not None and price > max_price:
        return False
    return checked_price is None or checked_price <= 0 or price <= checked_price


def choose_verifiers(
    offers: list[VerifierOffer],
    *,
    provider: str,
    self_id: str,
    rng: random.Random,
    standing: Mapping[str, float] | None = None,
    max_price: int | None = None,
    checked_price: int | None = None,
    exclude: Collection[str] = (),
    body_version: int = 1,
) -> list[str]:
    """The verifiers to ask for one check, in order: never the provider under check, never this node,
    none in ``exclude`` (the first opinion's verifier, for a second), none at an unacceptable price
    (:func:`acceptable_price`), none that takes no proof of ``body_version`` (it would refuse it, after
    a lease opened for nothing); drawn at random without replacement, each with a weight of its
    ``standing`` (:data:`NEW_VERIFIER_STANDING` when unknown, at least :data:`MIN_VERIFIER_WEIGHT`);
    at most :data:`MAX_VERIFIER_TRIES`."""
    known = standing or {}
    weights: dict[str, float] = {}
    for offer in offers:
        peer = offer.peer_id
        if peer in (provider, self_id) or peer in exclude or peer in weights or offer.reads < body_version:
            continue
        if not acceptable_price(offer.price_per_unit, max_price=max_price, checked_price=checked_price):
            continue
        weights[peer] = max(MIN_VERIFIER_WEIGHT, min(1.0, known.get(peer, NEW_VERIFIER_STANDING)))
    pool = sorted(weights)  # a fixed order, so a seeded draw is reproducible
    chosen: list[str] = []
    while pool and len(chosen) < MAX_VERIFIER_TRIES:
        total = sum(weights[peer] for peer in pool)
        point = rng.random() * total
        pick = pool[-1]
        for peer in pool:
            point -= weights[peer]
            if point < 0:
                pick = peer
                break
        pool.remove(pick)
        chosen.append(pick)
    return chosen


DEFAULT_SECOND_OPINION_RATE = 0.25  # of the passes a leased verifier answers (docs/verified-inference.md)


def second_opinion_drawn(rate: float, draw: float) -> bool:
    """Whether a leased verifier's pass is checked again by another verifier (``draw`` uniform in [0, 1))."""
    return draw < min(1.0, max(0.0, rate))


@dataclass(frozen=True)
class Opinions:
    """Two verifiers' verdicts on one call reconciled: what counts for the provider, and which of the
    two gain (``credit``) or lose (``blame``) standing: ``first``, ``second``."""

    outcome: Outcome
    reason: str = ""
    credit: tuple[str, ...] = ()
    blame: tuple[str, ...] = ()


def reconcile_opinions(first: CheckVerdict, second: CheckVerdict | None, own: CheckVerdict | None = None) -> Opinions:
    """The first verifier's verdict stands alone when no second opinion came (``second`` None or
    unverifiable). Two that agree on the outcome both gain standing. Two that disagree: this node's own
    check decides where it has one (``own``: it holds the file), the verifier that disagrees with it
    loses standing and the other gains; without one both lose standing and the provider is left
    unchecked (``unverifiable``, ``verifiers_disagree``): neither's word is taken against the other's."""
    if second is None or second.outcome == "unverifiable":
        return Opinions(first.outcome, first.reason)
    if first.outcome == second.outcome:
        return Opinions(first.outcome, first.reason or second.reason, credit=("first", "second"))
    if own is not None and own.outcome != "unverifiable":
        right = tuple(n for n, v in (("first", first), ("second", second)) if v.outcome == own.outcome)
        wrong = tuple(n for n in ("first", "second") if n not in right)
        return Opinions(own.outcome, own.reason, credit=right, blame=wrong)
    return Opinions("unverifiable", "verifiers_disagree", blame=("first", "second"))


# Shared reports (runtime/verify/reports.py) shift standing by at most ``weight`` of the way toward 1 or
# toward this floor: never to 0, so no report from others alone makes the router leave a provider out.
REPORTED_FLOOR = 0.01
MAX_REPORT_WEIGHT = 0.9


def standing_with_reports(
    passed: int, failed: int, reported_passed: int = 0, reported_failed: int = 0, weight: float = 0.0
) -> float:
    """:func:`standing` shifted by other nodes' reports (each reporter counted once): 0 only after a
    failed check of this node's own; otherwise the share of reporters that saw the provider pass or
    fail moves it ``weight`` (at most 0.9) of the way toward 1 or toward :data:`REPORTED_FLOOR`."""
    own = standing(passed, failed)
    if failed > 0:
        return 0.0
    reports = reported_passed + reported_failed
    weight = min(MAX_REPORT_WEIGHT, max(0.0, weight))
    if reports <= 0 or weight == 0.0:
        return own
    share = (reported_passed - reported_failed) / reports  # -1 … 1
    target = 1.0 if share > 0 else REPORTED_FLOOR
    shifted = own + weight * abs(share) * (target - own)
    return max(REPORTED_FLOOR, min(1.0, shifted))
