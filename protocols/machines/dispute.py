"""A lease dispute's refusals that are not about the evidence itself (docs/security.md), as pure rules of
fetched facts: who may tell a party how its dispute ended, when an arbiter takes a case and how often it
re-runs one it could not decide, when a provider asks to end a freeze without a case or answers an
arbiter's receipt ask, and what a restarted consumer does with each case it kept (``protocols.lease.arbiter``
fetches the facts and acts on the verdicts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from protocols.machines.verdict import Refusal
from runtime.errors import ErrorCode

# ---- an outcome told to a party (LeaseDisputeOutcome pushed by the arbiter) ----


@dataclass(frozen=True)
class ToldOutcomeFacts:
    """What a party read when a peer tells it how a dispute of one of its leases ended.

    ``known``: the ledger holds the lease, with an escrow whose payer is the outcome's. ``sender``: the
    peer that sent it; ``arbiter_peer``: the peer this node knows for the escrows' arbiter ("" when none
    is configured: then the chain alone says who resolved). ``dispute_open``: (a consumer) the ledger
    holds the dispute this node opened at its freeze. ``phase``, ``escrow_arbiter``, ``threshold``: the
    escrow as the chain holds it. ``resolved_by``: the sender of the transaction the outcome names, when
    that transaction resolved this very escrow (its ``Resolved`` log, from the escrow contract); None
    when it names no transaction or one that resolved nothing of this escrow."""

    known: bool
    role: str  # the lease's role in this node's ledger: provider, consumer
    sender: str
    arbiter_peer: str
    dispute_open: bool
    phase: str
    escrow_arbiter: str
    threshold: int
    resolved_by: str | None
    chain: bool = True  # this node's escrow chain is connected (the facts above could be read)


def told_outcome_verdict(facts: ToldOutcomeFacts) -> Refusal | None:
    """Whether a party records the split of a dispute it is told of: only for a lease of its own, from
    the arbiter it knows for its escrows (when it knows one), for an escrow the chain shows resolved by
    its own arbiter in the transaction the outcome names. A lease that closed without a dispute (paid out,
    refunded) has no such transaction: nothing is written, whoever knows its id."""
    if not facts.known:
        return Refusal(ErrorCode.NOT_FOUND, "unknown_lease", "no such lease")
    if not facts.chain:
        return Refusal(ErrorCode.UNAVAILABLE, "chain_unavailable", "this node's escrow chain is not connected")
    if facts.arbiter_peer and facts.sender != facts.arbiter_peer:
        return Refusal(ErrorCode.FORBIDDEN, "not_arbiter", "only the escrows' arbiter tells a dispute's outcome")
    if facts.role != "provider" and not facts.dispute_open:
        # A consumer opened the dispute itself at its freeze: a push about a lease without one is no news.
        return Refusal(ErrorCode.NOT_FOUND, "unknown_lease", "no open dispute of this lease")
    if facts.phase != "closed":
        return Refusal(ErrorCode.CONFLICT, "not_resolved", "the escrow is not resolved on chain")
    if facts.resolved_by is None:
        return Refusal(ErrorCode.CONFLICT, "no_resolution", "the named transaction resolved no dispute of this escrow")
    if facts.threshold or facts.resolved_by.lower() != facts.escrow_arbiter.lower():
        return Refusal(ErrorCode.FORBIDDEN, "not_arbiter", "the escrow was not resolved by its arbiter")
    return None


# ---- an arbiter taking a case (or a freeze without one) ----


def case_intake_verdict(
    *, chain: bool, lease_escrow: bool, in_progress: bool, deciding: int, limit: int, stale: bool = False
) -> Refusal | None:
    """Whether an arbiter starts on a case (``stale``: on a payee's ask to end a freeze without one):
    its escrow chain is connected, the lease has an escrow of its own (its id is the escrow's), the same
    lease's case is not being decided already (a stale ask goes on: ``stale_freeze_verdict`` refuses
    it on the chain's facts), and fewer than ``limit`` are being decided."""
    if not chain:
        return Refusal(ErrorCode.UNAVAILABLE, "chain_unavailable", "this node's escrow chain is not connected")
    if not lease_escrow:
        return Refusal(ErrorCode.INVALID_ARGUMENT, "escrow_not_lease", "the lease has no escrow of its own")
    if in_progress and not stale:
        return Refusal(ErrorCode.CONFLICT, "case_in_progress", "this case is being decided")
    if not in_progress and deciding >= limit:
        return Refusal(ErrorCode.RATE_LIMITED, "busy", "the arbiter is deciding other cases")
    return None


def stale_ask_verdict(*, served: bool, arbiter_known: bool, vouched: bool) -> Refusal | None:
    """Whether a provider asks the arbiter to end a freeze without a case: a lease it served with an
    escrow, an arbiter peer it knows, and a countersigned receipt carrying the payer's voucher."""
    if not served:
        return Refusal(ErrorCode.NOT_FOUND, "unknown_lease", "no such lease served")
    if not arbiter_known:
        return Refusal(ErrorCode.UNAVAILABLE, "no_arbiter", "no arbiter peer known")
    if not vouched:
        return Refusal(ErrorCode.NOT_FOUND, "no_voucher", "no receipt with the payer's voucher")
    return None


def receipt_ask_verdict(*, served: bool, sender: str, arbiter_peer: str) -> Refusal | None:
    """Whether a provider answers an ask for its newest countersigned receipt of a lease (its amounts):
    only from the escrows' arbiter peer this node knows (``arbiter_peer``; "" when none is configured:
    then nobody is answered, as the sender cannot be told from a stranger), for a lease it served. The
    lease id is no secret (it is the escrow's id, on chain), so any other sender gets the very refusal
    an unknown lease gets: it learns neither the amounts nor whether this node holds the lease."""
    if not arbiter_peer or sender != arbiter_peer or not served:
        return Refusal(ErrorCode.NOT_FOUND, "unknown_lease", "no such lease served")
    return None


# ---- re-runs of a case an arbiter could not decide ----

MAX_RERUNS_PER_LEASE = 2  # re-runs of one lease's case, whatever came of them (an undecided one stays frozen)
MAX_RERUNS_PER_PEER = 8  # re-runs asked by one peer within RERUN_WINDOW_S
RERUN_WINDOW_S = 3600.0
MAX_RERUN_LEASES = 4096  # leases whose re-run count is kept (the oldest forgotten first)
MAX_RERUN_PEERS = 1024  # peers whose recent re-runs are kept


def lease_rerun_verdict(*, lease_reruns: int, peer_reruns: int, holds_file: bool = True) -> Refusal | None:
    """Whether the arbiter re-runs a case (a few seconds of inference on its own copy of the file): only
    with a copy of the file the proof names (else nothing is resolved: the escrow stays frozen for a
    person, ``E_NOT_FOUND arbiter_no_file``); and a case it could not decide (``undecided``: the escrow
    stays frozen for a person) is not re-run again and again because its sender asks (``E_CONFLICT``:
    sending it again changes nothing, a person decides it), nor are one peer's cases past a rate
    (``E_RATE_LIMITED``: later, it may)."""
    if not holds_file:
        return Refusal(ErrorCode.NOT_FOUND, "arbiter_no_file", "this arbiter holds no copy of the file the proof names")
    if lease_reruns >= MAX_RERUNS_PER_LEASE:
        return Refusal(ErrorCode.CONFLICT, "rerun_limit", "this lease's case was re-run as often as it may be")
    if peer_reruns >= MAX_RERUNS_PER_PEER:
        return Refusal(ErrorCode.RATE_LIMITED, "peer_rerun_limit", "this peer asked for too many re-runs lately")
    return None


# ---- a consumer's kept cases, after a restart ----

ResumeAction = Literal["drop", "record", "freeze_and_send", "send"]
RESUME_RETRY_S = (1.0, 5.0)  # waits before a kept case that failed is tried again; then left for the next start


def resume_case_action(*, ours: bool, phase: str, dispute_open: bool) -> ResumeAction:
    """What a restarted consumer does with a kept case: one that is not its wallet's lease escrow goes;
    a closed escrow's split is recorded where this node opened the dispute (else it closed otherwise,
    no dispute's), then the case goes; a freeze that had not landed is made now and the case sent; a
    frozen one is sent; any other escrow (none on chain) goes."""
    if not ours:
        return "drop"
    if phase == "closed":
        return "record" if dispute_open else "drop"
    if phase == "active":
        return "freeze_and_send"
    if phase == "disputed":
        return "send"
    return "drop"


def resume_retry_delay(failures: int) -> float | None:
    """The wait before a kept case is tried again after ``failures`` failed tries in this run; None: it is
    left until the next start (one bad case never holds up the others)."""
    return RESUME_RETRY_S[failures - 1] if 0 < failures <= len(RESUME_RETRY_S) else None
