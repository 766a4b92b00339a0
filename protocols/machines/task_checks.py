"""The task market's refusals that look at what the adapter fetched: signatures, artifacts, the chain.

The rule of the market wing (as h11 states it in ``_state.py``): every decision that can refuse is a
pure function here or in :mod:`protocols.machines.task` (the book: bid, award, result, review,
dispute, evidence, settle/refund), taking what was fetched (who signed an envelope, the sha256 of an
artifact, an escrow lock as the chain shows it, the clock) as plain data and returning a typed
verdict (:class:`~protocols.machines.verdict.Refusal` or ``None``, or a :class:`CloseOutStep`). The
adapters in ``protocols/task/`` only fetch, ask, and act.

The escrow lock of an award is checked with the check the lease market uses
(:func:`protocols.machines.escrow_lock.lock_verdict`); what only a task asks (the award pays *our*
wallet, on *our* chain and contract) is checked here first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from protocols.machines.escrow_lock import LockState, LockTerms, lock_verdict
from protocols.machines.lease_provider import escrow_bound_verdict
from protocols.machines.task_model import ReceiptState, ResultState
from protocols.machines.verdict import Refusal
from protocols.task_wire import MAX_ARTIFACT, MAX_EVIDENCE_ATTACHMENT, MAX_EVIDENCE_NOTE, MAX_PARAMS
from runtime.errors import ErrorCode

# Live tasks a node keeps of others' announcements; finished ones leave on the book's own schedule
# (``TaskBook.forget_finished``). Our own tasks are bounded by ``max_open_tasks_per_account``.
TASK_BOOK_MAX = 4096
# Chain time and our clock differ by a block or two; the lock must outlive deadline + review.
DEADLINE_SLACK_S = 30
# The close-out sleeps until the next thing it waits for (a refund's ``not_before``) or until woken
# (a review, a resolution, a dispute, evidence). While a release or refund lands it looks at the chain
# with a backoff from CLOSE_POLL_MIN_S to CLOSE_POLL_MAX_S; after CLOSE_FAST_FOR_S without news, and
# through a dispute window or a dispute, every CLOSE_IDLE_POLL_S (in case a message was lost).
CLOSE_POLL_MIN_S = 0.5
CLOSE_POLL_MAX_S = 2.0
CLOSE_FAST_FOR_S = 60.0
CLOSE_IDLE_POLL_S = 30.0

F = ErrorCode.FORBIDDEN
INV = ErrorCode.INVALID_ARGUMENT


def _refuse(code: ErrorCode, reason: str, message: str) -> Refusal:
    return Refusal(code, reason, message)


# -- creator ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishFacts:
    arbiter_peer: str | None
    arbiter_wallet: str | None
    arbiter_peer_valid: bool
    params_size: int
    own_wallet: str | None  # None when the chain is not connected


def publish_verdict(f: PublishFacts) -> Refusal | None:
    if f.arbiter_peer is None or f.arbiter_wallet is None:
        return _refuse(INV, "no_arbiter", "a task needs an arbiter (peer id and wallet)")
    if f.params_size > MAX_PARAMS:
        return _refuse(INV, "params_too_large", f"task parameters over {MAX_PARAMS} bytes")
    if not f.arbiter_peer_valid:
        return _refuse(INV, "arbiter_not_a_peer_id", "not a peer id")
    if f.own_wallet is not None and f.own_wallet.lower() == f.arbiter_wallet.lower():
        return _refuse(INV, "arbiter_is_self", "the arbiter wallet cannot be this node's own wallet")
    return None


@dataclass(frozen=True)
class FundingFacts:
    payee: str | None  # the bid's payee, as the bidder sent it
    arbiter_wallet: str | None
    announced: bool  # the signed announcement is at hand
    balance: int
    price: int
    lock_gas_cost: int


def funding_verdict(f: FundingFacts) -> Refusal | None:
    """May the creator lock this bid's price? (Asked after the book took the award in a dry run.)"""
    if f.payee is None or f.arbiter_wallet is None or not f.announced:
        return _refuse(ErrorCode.CONFLICT, "award_terms_unknown", "the bid's payee or the task's arbiter is unknown")
    if f.balance < f.price + f.lock_gas_cost:
        return _refuse(ErrorCode.INSUFFICIENT_FUNDS, "cannot_pay", "this node's wallet cannot lock the price and gas")
    return None


def lock_lasts_until(chain_now: int, task_deadline: int, now: float, review_timeout_s: int) -> int:
    """The chain time an award's lock must last until: the delivery deadline, then the review."""
    return chain_now + max(0, task_deadline - int(now)) + review_timeout_s


@dataclass(frozen=True)
class ResultFacts:
    signer: str
    remote: str
    bidder: str  # as the notice names it
    size: int  # as the notice signs it
    content_hash: str
    artifact_size: int  # what arrived
    artifact_sha256: str


def result_verdict(f: ResultFacts) -> Refusal | None:
    if f.signer != f.remote:
        return _refuse(F, "result_signer_not_sender", "the result is signed by another peer than the sender")
    if f.bidder != f.remote:
        return _refuse(F, "result_names_other_bidder", "the result names another bidder")
    if f.artifact_size > MAX_ARTIFACT:
        return _refuse(INV, "artifact_too_large", f"artifacts are at most {MAX_ARTIFACT} bytes")
    if f.artifact_size != f.size or f.artifact_sha256 != f.content_hash:
        return _refuse(INV, "artifact_mismatch", "the artifact does not match its signed hash and size")
    return None


def artifact_verdict(size: int) -> Refusal | None:
    """A bidder's own artifact, before it is sent."""
    if size > MAX_ARTIFACT:
        return _refuse(INV, "artifact_too_large", f"artifacts are at most {MAX_ARTIFACT} bytes")
    return None


# -- bidder -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AwardFacts:
    """A signed award as the bidder opened it, and what the bidder's book says of its bid."""

    remote: str
    me: str
    signer: str
    creator: str
    bidder: str
    task_id: str
    arbiter_wallet: str
    price: int
    announcement_signer: str
    announcement_task_id: str
    announcement_arbiter_wallet: str | None


def award_verdict(f: AwardFacts) -> Refusal | None:
    if f.signer != f.remote or f.creator != f.remote:
        return _refuse(F, "award_signer_not_sender", "the award is not signed by its sender")
    if f.bidder != f.me:
        return _refuse(F, "award_for_other_bidder", "the award is made out to another bidder")
    if (
        f.announcement_signer != f.remote
        or f.announcement_task_id != f.task_id
        or f.announcement_arbiter_wallet != f.arbiter_wallet
    ):
        return _refuse(F, "award_not_announced", "the award does not match the creator's announcement")
    return None


def award_bid_verdict(me: str, price: int, bid_bidder: str | None, bid_price: int | None) -> Refusal | None:
    """The award is for a bid our book holds, at its price (``bid_bidder`` None: no such bid)."""
    if bid_bidder is None or bid_bidder != me or bid_price != price:
        return _refuse(ErrorCode.NOT_FOUND, "award_unknown_bid", "no such bid of ours")
    return None


def award_params_verdict(params_hash: str, params: str) -> Refusal | None:
    """The award's parameters are the ones the announcement we bid on committed to (its ``params_hash``,
    from the gossip copy, not the copy inside the award, which the creator may sign anew). Without it a
    creator could award other terms than the bid's: arbitration by a person in place of a re-run (no
    arbiter decides and the contract has no dispute timeout, so the seller's pay stays frozen), or
    more work for the bid's price."""
    if hashlib.sha256(params.encode()).hexdigest() != params_hash:
        return _refuse(
            ErrorCode.FORBIDDEN, "award_params_changed", "the award's parameters are not those of the task bid on"
        )
    return None


def award_lock_bound_verdict(creator: bytes, salt: str | None, escrow_id: str) -> Refusal | None:
    """The award's lock must be the creator's own: its id is ``lease_id_for(creator, salt)`` with the salt
    the award carries (``lease_provider.escrow_bound_verdict``, the rule a lease open's lock keeps). Without
    it an award could name any lock paying this seller under its arbiter and window, a buyer's lease lock
    among them: the seller would write the task's lease row under the buyer's escrow, refuse the buyer's own
    open (``lease_exists``) for good, and the buyer's money would stand behind the creator's task. Pure and
    cheap, so the bidder asks it before it claims the escrow and before any read (``creator``: the award's
    creator peer id as bytes, already checked to be the sender)."""
    raw = None
    if salt is not None:
        try:
            raw = bytes.fromhex(salt)
        except ValueError:
            raw = None
    if escrow_bound_verdict(creator, raw, escrow_id, channel=False) is None:
        return None
    return _refuse(F, "lock_not_bound", "the award's lock id is not derived from the creator's peer id")


def award_lock_free_verdict(lock_taken: bool) -> Refusal | None:
    """The award's lock pays no other task or lease of ours (``lock_taken``: our ledger holds a lease or a
    payment channel under that escrow): one locked price for two tasks' work. One being checked now, an
    award's or a lease open's, is refused before any read by the node's escrow claim table
    (``lease_provider.escrow_claim_verdict``), with this reason."""
    if lock_taken:
        return _refuse(ErrorCode.CONFLICT, "lock_of_another_task", "the award's lock already pays another of ours")
    return None


@dataclass(frozen=True)
class AwardLockFacts:
    """The award's lock as the chain shows it, and what the bidder expects of it."""

    our_chain_id: int
    award_chain_id: int
    our_contract: str
    award_contract: str
    our_wallet: str
    payee: str
    arbiter_wallet: str
    price: int
    window: int  # our dispute window
    lasts_until: int  # :func:`lock_lasts_until`
    lock: LockState | None  # None: not read (the chain or the contract is not ours)
    trusted_arbiter: str | None  # the arbiter our own escrow terms name; None when this node knows none
    lock_threshold: int = 0  # m of a panel lock (its arbiter is then the zero address); 0: one arbiter
    panel_named: bool = False  # the award's params name a panel (its lock: ``panel_lock_verdict``)
    panel_members: tuple[tuple[str, str], ...] = ()  # (peer id, wallet) of each member the params name
    panel_threshold: int = 0  # its m
    # The (peer id, wallet) pairs this node trusts, as a single arbiter or on a panel: its own arbiter's
    # (escrow.arbiter_peer with escrow.arbiter, when both are known) and those of escrow.trusted_arbiters.
    trusted_members: tuple[tuple[str, str], ...] = ()
    arbiter_peer: str = ""  # the peer id the announcement names as its single arbiter: a dispute's case goes there


def award_arbiter_verdict(
    arbiter_peer: str, arbiter_wallet: str, own_wallet: str | None, trusted: Sequence[tuple[str, str]]
) -> Refusal | None:
    """An award's single arbiter must be one this node trusts by peer id AND wallet (a panel's members:
    ``panel_trust_verdict``). ``arbiter_peer`` is the peer id the announcement names (a dispute's case goes
    there), ``arbiter_wallet`` the wallet the award's lock names (it resolves the escrow); ``own_wallet`` is
    this node's own arbiter wallet (escrow.arbiter; None: none known) and ``trusted`` the ``(peer id,
    wallet)`` pairs it trusts: its own arbiter's (escrow.arbiter_peer with escrow.arbiter, when both are
    known) and those of escrow.trusted_arbiters. Wallets compare case-insensitively. A trusted wallet under
    a peer id of the creator's own or a made-up one is refused: the seller's dispute would go to that peer,
    the trusted arbiter would never hear of it, and the disputed lock (which no timeout refunds) would keep
    the seller's pay frozen."""
    ours = {(peer, wallet.lower()) for peer, wallet in trusted}
    wallet = arbiter_wallet.lower()
    if (arbiter_peer, wallet) in ours:
        return None
    own = None if own_wallet is None else own_wallet.lower()
    if own is None and not ours:
        return _refuse(
            ErrorCode.UNAVAILABLE,
            "no_trusted_arbiter",
            "this node knows no arbiter of its own (no escrow chain connected, or none configured): "
            "set escrow.arbiter and escrow.arbiter_peer to the arbiter you trust",
        )
    trusted_wallets = {w for _, w in ours}
    if wallet == own and own not in trusted_wallets:
        return _refuse(
            ErrorCode.UNAVAILABLE,
            "no_trusted_arbiter",
            "the award names this node's arbiter wallet, but this node does not know that arbiter's peer id: "
            "set escrow.arbiter_peer to it (or trust it as PEER:WALLET in escrow.trusted_arbiters)",
        )
    if wallet == own or wallet in trusted_wallets:
        return _refuse(
            F,
            "award_untrusted_arbiter",
            "the award's arbiter wallet is one this node trusts, but the announcement names another peer id for "
            "it, which a dispute would go to (trusted pairs: escrow.arbiter_peer with escrow.arbiter, and "
            "escrow.trusted_arbiters)",
        )
    return _refuse(
        F,
        "award_untrusted_arbiter",
        "the award's escrow names another arbiter than the ones this node trusts (escrow.arbiter_peer with "
        "escrow.arbiter, and escrow.trusted_arbiters)",
    )


def bid_arbiter_verdict(
    arbiter_peer: str, arbiter_wallet: str, own_wallet: str | None, trusted: Sequence[tuple[str, str]]
) -> Refusal | None:
    """Before a bid: a task announced under a single arbiter this node's award check would refuse
    (:func:`award_arbiter_verdict`, same arguments: the announcement's arbiter peer id and wallet, which
    its award must repeat) is refused now with that verdict, so no bid is placed that can never be
    awarded, and whoever bids hears why at once instead of the creator's award failing after its
    retries. A panel task (announced under the zero wallet: its panel is in the parameters the award
    carries) is left to the award's check (:func:`panel_trust_verdict`)."""
    if arbiter_wallet.lower() == "0x" + "0" * 40:
        return None
    return award_arbiter_verdict(arbiter_peer, arbiter_wallet, own_wallet, trusted)


def panel_trust_verdict(
    members: Sequence[tuple[str, str]], threshold: int, trusted: Sequence[tuple[str, str]]
) -> Refusal | None:
    """An award's panel must be one whose decision this node's trusted arbiters make: at least ``threshold``
    members trusted, and fewer than ``threshold`` not. ``members`` and ``trusted`` are ``(peer id, wallet)``
    pairs (wallets compared case-insensitively); a member counts as trusted only when both its peer id and
    its wallet are a pair this node trusts, since the case goes to the member's peer id and a vote counts
    for the wallet the panel pairs with its voter's peer. Otherwise a creator could seat wallets of its own
    under fresh peer ids, whose m agreeing votes split the disputed price back to it; seat a trusted wallet
    under a peer id of its own or a made-up one, so the trusted node never hears of the case; or seat fewer than m
    trusted members, so its own members' silence or rejection keeps any split from reaching m, and the
    disputed lock (which no timeout refunds) stays frozen with the seller's pay in it."""
    ours = {(peer, wallet.lower()) for peer, wallet in trusted}
    held = sum(1 for peer, wallet in members if (peer, wallet.lower()) in ours)  # a member named twice counts twice
    untrusted = len(members) - held
    if held < threshold or untrusted >= threshold:
        return _refuse(
            F,
            "panel_untrusted",
            f"{held} of the panel's {len(members)} members are arbiters this node trusts (peer id and wallet) and "
            f"{threshold} votes decide: trust more of them (escrow.arbiter_peer for this node's own arbiter, "
            "escrow.trusted_arbiters as PEER:WALLET) or bid on another task",
        )
    return None


def award_lock_verdict(f: AwardLockFacts) -> Refusal | None:
    if f.our_chain_id != f.award_chain_id or f.our_contract.lower() != f.award_contract.lower():
        return _refuse(ErrorCode.UNAVAILABLE, "award_other_chain", "the award's escrow is on another chain or contract")
    if f.payee.lower() != f.our_wallet.lower():
        return _refuse(F, "award_pays_other_wallet", "the award pays another wallet than ours")
    if f.lock is None:
        return _refuse(ErrorCode.UNAVAILABLE, "lock_unread", "the award's escrow lock was not read")
    if f.lock_threshold and not f.panel_named:
        # A panel lock's arbiter is the zero address, as a panel task's announced arbiter_wallet: without
        # this, a creator could lock with a panel of its own wallets under params that name none.
        return _refuse(F, "lock_panel_unnamed", "the escrow lock is decided by a panel the award does not name")
    if f.panel_named:
        refusal = panel_trust_verdict(f.panel_members, f.panel_threshold, f.trusted_members)
    else:
        refusal = award_arbiter_verdict(f.arbiter_peer, f.arbiter_wallet, f.trusted_arbiter, f.trusted_members)
    if refusal is not None:
        return refusal
    return lock_verdict(f.lock, LockTerms("task", f.payee, f.arbiter_wallet, f.price, f.window, f.lasts_until))


def review_verdict(signer: str, remote: str, creator: str) -> Refusal | None:
    if signer != remote or creator != remote:
        return _refuse(F, "review_signer_not_sender", "the review is not signed by its sender")
    return None


# -- disputes and evidence (either party) -------------------------------------------------------
def dispute_ready_verdict(announced: bool, awarded: bool, delivered: bool) -> Refusal | None:
    """A party may only take to the arbiter what it can prove with signed envelopes."""
    if not (announced and awarded and delivered):
        return _refuse(ErrorCode.CONFLICT, "evidence_incomplete", "the signed evidence for this task is incomplete")
    return None


def dispute_notice_verdict(remote: str, me: str, creator: str, bidder: str, phase: str) -> Refusal | None:
    """The other party says it disputed: only a party, and only when the chain shows the dispute."""
    if remote not in (creator, bidder) or remote == me:
        return _refuse(F, "not_the_other_party", "only the other party may dispute this task")
    if phase != "disputed":
        return _refuse(ErrorCode.CONFLICT, "escrow_not_disputed", "the escrow is not disputed on chain")
    return None


def evidence_piece_verdict(note: str, attachment_size: int) -> Refusal | None:
    """A party's own piece of evidence, before it is signed and sent."""
    if attachment_size > MAX_EVIDENCE_ATTACHMENT:
        return _refuse(INV, "attachment_too_large", f"evidence attachments are at most {MAX_EVIDENCE_ATTACHMENT} bytes")
    if len(note) > MAX_EVIDENCE_NOTE:
        return _refuse(INV, "note_too_long", f"evidence notes are at most {MAX_EVIDENCE_NOTE} characters")
    if not note.strip() and not attachment_size:
        return _refuse(INV, "evidence_empty", "evidence needs a note or an attachment")
    return None


@dataclass(frozen=True)
class EvidenceFacts:
    signer: str
    remote: str
    party: str
    content_hash: str  # signed
    size: int  # signed
    attachment_sha256: str  # what arrived
    attachment_size: int


def evidence_verdict(f: EvidenceFacts) -> Refusal | None:
    if f.signer != f.remote or f.party != f.remote:
        return _refuse(F, "evidence_signer_not_sender", "the evidence is not signed by its sender")
    if f.attachment_sha256 != f.content_hash or f.attachment_size != f.size:
        return _refuse(INV, "attachment_mismatch", "the attachment does not match the signed hash")
    return None


# An arbiter's or panel member's signed re-run records kept per task: one per run it made (a member that
# abstained and then voted by hand has sent the same record twice; a re-delivered case may run again).
MAX_RUN_EVIDENCE = 4


def run_evidence_verdict(kept_from_sender: int, already_kept: bool) -> Refusal | None:
    """Whether another re-run record from one arbiter or member is kept: a vote or resolution repeated with
    a new record each time (another note, another 64 KiB attachment) must not grow the ledger without end."""
    if not already_kept and kept_from_sender >= MAX_RUN_EVIDENCE:
        return _refuse(ErrorCode.RATE_LIMITED, "too_much_evidence", "too many re-run records from this arbiter")
    return None


# -- arbiter ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseFacts:
    """A dispute case as the arbiter opened its envelopes (task ids and signers), before the chain."""

    me: str
    remote: str
    creator: str  # the announcement's
    arbiter: str  # the announcement's arbiter peer
    announcement_signer: str
    announcement_arbiter_wallet: str | None
    award_signer: str
    award_creator: str
    award_bidder: str
    award_arbiter_wallet: str
    result_signer: str
    result_bidder: str
    review_signer: str | None  # None: no review in the case
    task_ids: tuple[str, ...]  # announcement, award, result, case (and review)
    our_wallet: str
    tasks_in_book: int
    known_task: bool


def case_verdict(f: CaseFacts) -> Refusal | None:
    if f.review_signer is not None and f.review_signer != f.creator:
        return _refuse(F, "review_not_creators", "the review is not the creator's")
    if f.announcement_signer != f.creator or f.award_signer != f.creator or f.award_creator != f.creator:
        return _refuse(F, "case_not_creator_signed", "the announcement and award must be signed by the creator")
    if f.result_signer != f.award_bidder or f.result_bidder != f.award_bidder:
        return _refuse(F, "result_not_bidders", "the result must be signed by the awarded bidder")
    if len(set(f.task_ids)) != 1:
        return _refuse(INV, "case_mixes_tasks", "the evidence is about different tasks")
    if f.arbiter != f.me or f.announcement_arbiter_wallet != f.award_arbiter_wallet:
        return _refuse(F, "not_the_arbiter", "this node is not the task's arbiter")
    if f.remote not in (f.creator, f.award_bidder):
        return _refuse(F, "not_a_party", "only a party to the task may bring a dispute")
    if f.our_wallet.lower() != f.award_arbiter_wallet.lower():
        return _refuse(F, "other_arbiter_wallet", "the task names another arbiter wallet than this node's")
    if not f.known_task and f.tasks_in_book >= TASK_BOOK_MAX:
        return _refuse(ErrorCode.RATE_LIMITED, "book_full", "this node keeps too many live tasks; try again later")
    return None


def case_lock_verdict(lock: LockState, our_wallet: str, payee: str, price: int) -> Refusal | None:
    """The case's lock on chain: disputed, with us as its arbiter, for the award's payee and price."""
    if lock.phase != "disputed" or lock.arbiter.lower() != our_wallet.lower():
        return _refuse(
            ErrorCode.CONFLICT, "escrow_not_disputed", "the escrow is not disputed on chain with this arbiter"
        )
    if lock.payee.lower() != payee.lower() or lock.amount != price:
        return _refuse(F, "lock_not_the_award", "the escrow lock does not match the award")
    return None


ResolveAction = Literal["send", "recorded"]


def resolve_verdict(
    our_wallet: str, arbiter_wallet: str, phase: str, released: int, to_bidder: int
) -> ResolveAction | Refusal:
    """The arbiter's resolve: send the split on chain, or record one the chain already shows."""
    if our_wallet.lower() != arbiter_wallet.lower():
        return _refuse(F, "not_the_arbiter_wallet", "this node's wallet is not the task's arbiter wallet")
    if phase == "disputed":
        return "send"
    if phase == "closed" and released == to_bidder:
        return "recorded"
    return _refuse(ErrorCode.CONFLICT, "escrow_not_disputed", "the escrow is not disputed on chain")


def resolution_verdict(remote: str, arbiter: str, phase: str, released: int, to_bidder: int) -> Refusal | None:
    """A party hears the resolution: only from the arbiter, only as the chain shows it."""
    if remote != arbiter:
        return _refuse(F, "not_the_arbiter", "only the task's arbiter resolves its dispute")
    if phase != "closed" or released != to_bidder:
        return _refuse(ErrorCode.CONFLICT, "resolution_not_on_chain", "the chain does not show this resolution")
    return None


def announcement_verdict(names_arbiter: bool, tasks_in_book: int) -> Refusal | None:
    """An announcement joins the book only with an arbiter, and only while the book has room."""
    if not names_arbiter:
        return _refuse(INV, "no_arbiter", "the announcement names no arbiter")
    if tasks_in_book >= TASK_BOOK_MAX:
        return _refuse(ErrorCode.RATE_LIMITED, "book_full", "this node keeps too many live tasks")
    return None


# -- a creator's silence (the awarded seller) ----------------------------------------------------
# How long past the review timeout the seller waits before disputing (the creator's clock may lag ours),
# and how often it tries again while the dispute cannot be sent (the chain or the arbiter unreachable).
SILENCE_GRACE_S = 2.0
SILENCE_RETRY_S = 10.0


@dataclass(frozen=True)
class SilenceFacts:
    """The awarded seller's view of its delivered result."""

    seller: bool  # this node is the task's awarded bidder
    result_state: ResultState | None
    receipt_state: ReceiptState | None
    disputed: bool  # a dispute is open (ours or the creator's)
    submitted_at: float
    review_timeout_s: int
    now: float
    tried_at: float  # when this node last tried to dispute the silence (0: never)
    rerun_decides: bool = False  # a sandboxed or inference task whose dispute a re-run decides
    rejected_at: float = 0.0  # when the rejection was decided (its refund's not_before less the window)


def silence_dispute_due(f: SilenceFacts) -> bool:
    """Does the seller dispute a result the creator left unreviewed past the task's review timeout?

    Left alone, the lock goes back to the creator at its deadline + window (``refund``: anyone may call
    it once no dispute froze the escrow), so a creator that never answers gets the work unpaid; the
    seller's node therefore takes it to the arbiter itself, as a person would with ``task dispute``."""
    return (
        f.seller
        and f.result_state == ResultState.SUBMITTED
        and f.receipt_state == ReceiptState.PENDING
        and not f.disputed
        and f.now >= f.submitted_at + f.review_timeout_s + SILENCE_GRACE_S
        and f.now >= f.tried_at + SILENCE_RETRY_S
    )


def rejection_dispute_due(f: SilenceFacts) -> bool:
    """Does the seller dispute a rejection of a result a re-run decides (a sandboxed or inference task)?

    A rejection is refunded to the creator once its dispute window ends; the seller's node ran the task
    by itself and nobody may be watching, so a creator that rejected every result would get the work
    unpaid. The arbiter's re-run pays an honest result, so the node takes it there itself."""
    return (
        f.seller
        and f.rerun_decides
        and f.result_state == ResultState.REJECTED
        and f.receipt_state == ReceiptState.PENDING
        and not f.disputed
        and f.now >= f.rejected_at + SILENCE_GRACE_S  # the creator may be disputing its rejection itself
        and f.now >= f.tried_at + SILENCE_RETRY_S
    )


# A no-show revoke the book refused is tried again after REVOKE_RETRY_MIN_S, the wait doubling on each
# refusal up to REVOKE_RETRY_MAX_S (the sweep runs every second: not a try and a log line each time).
REVOKE_RETRY_MIN_S = 5.0
REVOKE_RETRY_MAX_S = 300.0


def no_show_revoke_due(
    creator_side: bool, award_active: bool, delivered: bool, deadline: float, now: float, retry_at: float = 0.0
) -> bool:
    """Does the creator revoke an award whose seller delivered nothing by the task's deadline? Then its
    close-out queues the lock's refund (it lands after the lock's deadline + window): otherwise a seller
    that won and went silent kept the creator's price locked until the node restarted. ``retry_at``: a
    revoke the book refused is not tried again before it (:func:`next_revoke_wait`)."""
    return creator_side and award_active and not delivered and now >= deadline and now >= retry_at


def next_revoke_wait(wait_s: float) -> float:
    """The wait before a refused no-show revoke is tried again: ``REVOKE_RETRY_MIN_S`` after the first
    refusal, then doubling up to ``REVOKE_RETRY_MAX_S``."""
    return min(max(wait_s * 2, REVOKE_RETRY_MIN_S), REVOKE_RETRY_MAX_S)


# -- close-out ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CloseOutFacts:
    phase: str | None  # the lock's phase; None when the chain could not be read
    creator_side: bool
    refund_queued: bool
    receipt_state: ReceiptState | None
    to_creator: int | None
    not_before: float
    now: float
    backoff: float  # the current wait between looks at a settling lock


@dataclass(frozen=True)
class CloseOutStep:
    """``book``: the lock is closed, record it; ``queue_refund``: the creator's refund is due now;
    ``wait``: sleep ``wait_s`` (or until woken) and look again."""

    action: Literal["book", "queue_refund", "wait"]
    wait_s: float = 0.0


def close_out_step(f: CloseOutFacts) -> CloseOutStep:
    if f.phase == "closed":
        return CloseOutStep("book")
    if f.phase == "disputed":
        return CloseOutStep("wait", CLOSE_IDLE_POLL_S)
    refund_decided = (
        f.phase == "active" and f.receipt_state == ReceiptState.PENDING and bool(f.to_creator) and not f.refund_queued
    )
    if refund_decided and f.now < f.not_before:  # either side: nothing moves before the window ends
        return CloseOutStep("wait", min(f.not_before - f.now, CLOSE_IDLE_POLL_S))
    if refund_decided and f.creator_side:
        return CloseOutStep("queue_refund")
    return CloseOutStep("wait", f.backoff)


def next_backoff(backoff: float, quiet_s: float) -> float:
    """The next wait while a settlement lands: doubling up to ``CLOSE_POLL_MAX_S``, then, after
    ``CLOSE_FAST_FOR_S`` without news or progress, ``CLOSE_IDLE_POLL_S``."""
    if quiet_s >= CLOSE_FAST_FOR_S:
        return CLOSE_IDLE_POLL_S
    return min(max(backoff, CLOSE_POLL_MIN_S) * 2, CLOSE_POLL_MAX_S)


@dataclass(frozen=True)
class FinalizeStep:
    """``done``: nothing left (already settled or refunded); ``settle``/``refund``: apply it now;
    ``wait``: the decision is not here yet (a review or resolution on its way: sleep until woken,
    at most ``wait_s``) or the book's dispute window still runs (sleep ``wait_s``)."""

    action: Literal["done", "settle", "refund", "wait"]
    wait_s: float = 0.0


def finalize_step(
    receipt_state: ReceiptState | None, decided: bool, not_before: float, now: float, to_bidder: int
) -> FinalizeStep:
    if receipt_state is None or receipt_state in (ReceiptState.SETTLED, ReceiptState.REFUNDED):
        return FinalizeStep("done")
    if not decided:
        return FinalizeStep("wait", CLOSE_IDLE_POLL_S)
    if now < not_before:
        return FinalizeStep("wait", min(not_before - now, CLOSE_IDLE_POLL_S))
    return FinalizeStep("settle" if to_bidder > 0 else "refund")
