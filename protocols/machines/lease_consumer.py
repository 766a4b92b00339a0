"""The compute lease as its consumer sees it: its lifecycle table and the consumer's decisions.

The rule of the market wing (as h11 states it in ``_state.py``): every decision that can refuse is a
pure function or method in ``protocols.machines``, taking what was fetched (the provider's signed
replies, the units counted, the chain's escrow state, the clock) as plain data and answering with a
typed verdict (:class:`~protocols.machines.verdict.Refusal` or ``None``); the adapter
(``protocols.lease.consumer``) only fetches, asks and acts. The provider's side of the same lease is
``protocols.machines.lease`` (:class:`~protocols.machines.lease.LeaseSession`); the rules both sides
share a number with (the end frame's bound, the receipt's tolerance, a refusal that leaves the lease
worth keeping, whether a held lease fits one more call) live in ``protocols.machines.lease_calls``
and are used here, not copied.

Lifecycle (roles: ``consumer`` -- this node, ``provider`` -- what the provider told us, ``system`` --
our timers and chain reads)::

    lease_opening --lock--> lease_locked --grant--> lease_active      (escrowed)
    lease_opening --grant--> lease_active                              (post-paid)
    lease_opening|lease_locked --fail--> lease_ended                   (the open failed: refund)
    lease_active --pause--> lease_paused --resume--> lease_active      (a call refused ``paused``;
                                                                        our countersignature resumes)
    lease_active|lease_paused --countersign--> lease_active            (a receipt we signed)
    lease_ending|lease_ended --countersign--> same                     (the final receipt)
    lease_active --renew--> lease_active
    lease_active|lease_paused --close--> lease_ending --end--> lease_ended  (we revoke, then end)
    lease_active|lease_paused|lease_ending --revoke|expire|spend|freeze--> lease_ended
    lease_ended --settle--> lease_settled   (terminal: the escrow is closed, nothing more moves)

Choices:

* ``spend``: a call refused with a reason that leaves the lease spent (``ended``, ``expired``,
  ``over_budget``, an unknown lease; :func:`~protocols.machines.lease.lease_outlives` says which)
  ends the held lease; one refused ``paused`` pauses it; ``budget_busy``, ``rate_limit``,
  ``disk_full`` and transport failures change nothing (:func:`call_refused_event`).
* ``freeze``: the escrow read on chain no longer pays the provider (disputed, closed, gone): the held
  lease ends there, whether or not the provider's notice arrived (:func:`escrow_event`); a spent one
  whose end we have not done yet ends too. Its refund waits on a dispute and lands once the escrow
  is closed.
* A receipt is countersigned in every state that holds a grant but ``lease_settled``: the provider's
  final receipt comes while we end it, or just after.
* ``lease_settled`` is reached when the escrow is seen closed (refunded or resolved) with every
  claim booked (:func:`settled`); a post-paid lease stays ``lease_ended``. A disputed escrow is not
  closed: the arbiter's resolution still releases to the provider, which we book as spend then.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protocols.machines.escrow_lock import escrow_frozen, trusted_arbiter_verdict
from protocols.machines.history import History
from protocols.machines.lease import LEASE_HISTORY
from protocols.machines.lease_calls import (
    ProvedCounts,
    call_units_needed,
    end_frame_verdict,
    lease_outlives,
    proof_meter_verdict,
    receipt_claim_verdict,
)
from protocols.machines.table import Machine, Transition
from protocols.machines.verdict import Refusal
from runtime.errors import ClawnodeError, ErrorCode, Reason

PROVIDER = "provider"
CONSUMER = "consumer"
SYSTEM = "system"


class ConsumerState(StrEnum):
    OPENING = "lease_opening"
    LOCKED = "lease_locked"
    ACTIVE = "lease_active"
    PAUSED = "lease_paused"
    ENDING = "lease_ending"
    ENDED = "lease_ended"
    SETTLED = "lease_settled"


class ConsumerEvent(StrEnum):
    LOCK = "lock"  # our escrow lock is on chain
    GRANT = "grant"  # the provider's grant checked out
    FAIL = "fail"  # the open failed after the ledger row was written
    PAUSE = "pause"  # a call was refused ``paused``
    RESUME = "resume"  # a call went through again
    COUNTERSIGN = "countersign"  # we countersigned a receipt
    RENEW = "renew"
    CLOSE = "close"  # we revoke: asking the provider to end it
    END = "end"  # our revocation is done (acknowledged or not)
    REVOKE = "revoke"  # the provider ended it
    EXPIRE = "expire"
    SPEND = "spend"  # a call was refused with a reason that leaves the lease spent
    FREEZE = "freeze"  # the escrow, read on chain, no longer pays the provider
    SETTLE = "settle"


def _t(
    source: ConsumerState, event: ConsumerEvent, target: ConsumerState, *actors: str
) -> Transition[ConsumerState, ConsumerEvent]:
    return Transition(source, event, target, frozenset(actors))


_O, _L, _A, _P = ConsumerState.OPENING, ConsumerState.LOCKED, ConsumerState.ACTIVE, ConsumerState.PAUSED
_G, _E, _S = ConsumerState.ENDING, ConsumerState.ENDED, ConsumerState.SETTLED
_Ev = ConsumerEvent

CONSUMER_LEASE_MACHINE: Machine[ConsumerState, ConsumerEvent] = Machine(
    "consumer_lease",
    [
        _t(_O, _Ev.LOCK, _L, CONSUMER),
        _t(_O, _Ev.GRANT, _A, CONSUMER),
        _t(_L, _Ev.GRANT, _A, CONSUMER),
        _t(_O, _Ev.FAIL, _E, CONSUMER),
        _t(_L, _Ev.FAIL, _E, CONSUMER),
        _t(_A, _Ev.PAUSE, _P, PROVIDER),
        _t(_P, _Ev.RESUME, _A, PROVIDER),
        _t(_A, _Ev.COUNTERSIGN, _A, CONSUMER),
        _t(_P, _Ev.COUNTERSIGN, _A, CONSUMER),
        _t(_G, _Ev.COUNTERSIGN, _G, CONSUMER),
        _t(_E, _Ev.COUNTERSIGN, _E, CONSUMER),
        _t(_A, _Ev.RENEW, _A, CONSUMER),
        _t(_A, _Ev.CLOSE, _G, CONSUMER),
        _t(_P, _Ev.CLOSE, _G, CONSUMER),
        _t(_G, _Ev.END, _E, CONSUMER),
        *(_t(s, _Ev.REVOKE, _E, PROVIDER) for s in (_A, _P, _G)),
        *(_t(s, _Ev.EXPIRE, _E, SYSTEM, PROVIDER) for s in (_A, _P, _G)),
        *(_t(s, _Ev.SPEND, _E, PROVIDER) for s in (_A, _P, _G)),
        *(_t(s, _Ev.FREEZE, _E, SYSTEM) for s in (_A, _P, _G)),
        _t(_E, _Ev.SETTLE, _S, SYSTEM),
    ],
    initial=_O,
    terminal=[_S],
)

# States in which the lease serves calls (as far as we know; the provider has the last word).
USABLE = frozenset({ConsumerState.ACTIVE, ConsumerState.PAUSED})
# States after the lease was granted and before it ended.
LIVE = frozenset({ConsumerState.ACTIVE, ConsumerState.PAUSED, ConsumerState.ENDING})


class ConsumerLease:
    """The consumer's view of one lease's state; every change goes through :data:`CONSUMER_LEASE_MACHINE`
    and is logged in ``history`` as ``(previous, event, next)`` (the newest ``LEASE_HISTORY``)."""

    def __init__(self) -> None:
        self.state: ConsumerState = CONSUMER_LEASE_MACHINE.initial
        self.history: History[tuple[ConsumerState, ConsumerEvent, ConsumerState]] = History(LEASE_HISTORY)

    def apply(self, event: ConsumerEvent, actor: str) -> ConsumerState:
        """The one place the consumer's state changes: the new state, or the machine's refusal."""
        previous = self.state
        self.state = CONSUMER_LEASE_MACHINE.next_state(previous, event, actor)
        self.history.append((previous, event, self.state))
        return self.state

    def may(self, event: ConsumerEvent, actor: str) -> bool:
        """Whether ``actor`` may apply ``event`` now (no refusal raised)."""
        row = CONSUMER_LEASE_MACHINE.lookup(self.state, event)
        return row is not None and actor in row.actors

    @property
    def ended(self) -> bool:
        return self.state in (ConsumerState.ENDED, ConsumerState.SETTLED)


# -- the quote and the grant ---------------------------------------------------------------------


@dataclass(frozen=True)
class QuoteFacts:
    """The provider's signed quote as opened, and what we asked for."""

    signer: str  # who signed the envelope
    provider: str  # whom we asked
    me: str  # our peer id
    quote_provider: str
    quote_consumer: str
    quote_capability: str
    capability: str  # what we asked for
    escrowed: bool  # the quote names escrow terms
    budget: int
    postpaid_cap: int
    quote_arbiter: str  # the arbiter the quote's escrow terms name ("" when it names none)
    trusted_arbiter: str | None  # the arbiter our own escrow terms name; None when this node knows none


def arbiter_verdict(quote_arbiter: str, trusted_arbiter: str | None) -> Refusal | None:
    """A lease's or a payment channel's lock only under the arbiter this node trusts."""
    return trusted_arbiter_verdict(quote_arbiter, trusted_arbiter)


def quote_verdict(f: QuoteFacts) -> Refusal | None:
    """The provider's quote: signed by the provider, made out to us for what we asked; an escrowed
    quote must name the arbiter we trust (:func:`arbiter_verdict`); a post-paid quote must cover our
    budget."""
    if f.signer != f.provider:
        return Refusal(
            ErrorCode.FORBIDDEN, "quote_wrong_signer", "the quote is signed by another peer than the provider"
        )
    if f.quote_consumer != f.me or f.quote_capability != f.capability or f.quote_provider != f.provider:
        return Refusal(ErrorCode.FORBIDDEN, "quote_not_asked", "the quote is not the one asked for")
    if f.escrowed and (refusal := arbiter_verdict(f.quote_arbiter, f.trusted_arbiter)) is not None:
        return refusal
    if not f.escrowed and f.budget > f.postpaid_cap:
        return Refusal(
            ErrorCode.INSUFFICIENT_FUNDS, "over_postpaid_cap", "the budget exceeds the provider's post-paid cap"
        )
    return None


@dataclass(frozen=True)
class GrantFacts:
    """The provider's signed grant as opened, the token beside it, and the lease we opened."""

    signer: str
    provider: str
    me: str
    lease_id: str  # ours, from the open
    quote_id: str
    price_per_unit: int
    budget: int
    token: str  # the access token in the reply (never stored beyond the held lease)
    grant_lease_id: str
    grant_consumer: str
    grant_quote_id: str
    grant_price_per_unit: int
    grant_budget: int
    grant_token_sha256: str


def grant_verdict(f: GrantFacts, token_digest: str) -> Refusal | None:
    """The grant: the provider's, for exactly the lease we opened on the quote we took, and the access
    token the one it signed (``token_digest``: its sha256, computed by the caller)."""
    if f.signer != f.provider:
        return Refusal(
            ErrorCode.FORBIDDEN, "grant_wrong_signer", "the grant is signed by another peer than the provider"
        )
    if (
        f.grant_lease_id != f.lease_id
        or f.grant_consumer != f.me
        or f.grant_quote_id != f.quote_id
        or f.grant_price_per_unit != f.price_per_unit
        or f.grant_budget != f.budget
    ):
        return Refusal(ErrorCode.CONFLICT, "grant_mismatch", "the grant does not match the lease we opened")
    if not hmac.compare_digest(token_digest, f.grant_token_sha256):
        return Refusal(ErrorCode.FORBIDDEN, "grant_wrong_token", "the access token does not match the signed grant")
    return None


# -- calls and receipts --------------------------------------------------------------------------


def call_verdict(state: ConsumerState, ended_reason: str | None = None) -> Refusal | None:
    """Whether we send a call on a held lease: only one that may serve (a paused one is tried: the
    provider resumes it on our countersignature, which may be on its way)."""
    if state in USABLE:
        return None
    if state in (ConsumerState.OPENING, ConsumerState.LOCKED):
        return Refusal(ErrorCode.CONFLICT, "not_granted", "the lease is not granted yet")
    if ended_reason == "expired":
        return Refusal(ErrorCode.EXPIRED, Reason.EXPIRED, "the lease has ended (expired)")
    return Refusal(ErrorCode.CONFLICT, Reason.ENDED, f"the lease has ended ({ended_reason or state})")


def end_frame_units(
    claimed_units: int, tokens_received: int, body: dict[str, Any], proved: ProvedCounts | None = None
) -> int | Refusal:
    """The units a call's end frame adds to our count, or why it is refused (an inflated frame counts
    nothing): :func:`~protocols.machines.lease.end_frame_verdict`, then
    :func:`~protocols.machines.lease_calls.proof_meter_verdict` on the proof it carries (``proved``)."""
    verdict = end_frame_verdict(claimed_units, tokens_received, body) or proof_meter_verdict(
        claimed_units, tokens_received, proved
    )
    return claimed_units if verdict is None else verdict


def error_frame_units(claimed_units: int | None, tokens_received: int, body: dict[str, Any]) -> int:
    """The units a call's error frame adds to our count: what it bills (the chunks before it and the
    prompt the engine decoded before failing) when an end frame could claim as much
    (:func:`~protocols.machines.lease.end_frame_verdict`: what arrived plus the prompt's estimate),
    else the tokens received, all an older provider's frame (which names no units) bills, never more than
    the call could be reserved (``call_units_needed``: the chunks' ``tokens`` are the provider's word)."""
    if claimed_units is None or end_frame_verdict(claimed_units, tokens_received, body) is not None:
        return min(tokens_received, call_units_needed(body))
    return claimed_units


def error_frame_count(
    claimed_units: int | None, tokens_received: int, body: dict[str, Any], proved: ProvedCounts | None
) -> int | Refusal:
    """What an error frame adds to our count (:func:`error_frame_units`), or why it is refused: billing
    past the proof it carries (:func:`~protocols.machines.lease_calls.proof_meter_verdict`), which counts
    nothing, as :func:`end_frame_units` refuses an end frame."""
    units = error_frame_units(claimed_units, tokens_received, body)
    return proof_meter_verdict(units, tokens_received, proved) or units


class CallEnding(StrEnum):
    """How a call sent on a lease ended, as its spot check sees it (verified inference,
    :func:`ending_checked`; :func:`call_ending` tells which)."""

    END = "end"  # the provider's end frame, unasked: its proof (or its lack of one) is checked
    ERROR = "error"  # the provider's error frame, unasked (the call failed on its side)
    # The provider stopped before its end frame (silent ``stall_s``, its stream closed or cut, more
    # bytes than the call allows), so this side left and asked it to stop, and no end frame answered:
    # nothing in ``CANCEL_DRAIN_S``, or an error frame (whose proof, if any, is checked).
    STOPPED = "stopped"
    # The provider stopped so, this side asked it to stop, and its end frame answered the cancel: with
    # the proof of what it streamed (a provider of this release signs one; an older one sends none).
    CANCELLED = "cancelled"
    LEFT = "left"  # this side left on its own: its caller cancelled or its deadline passed, its sink failed


# The endings a provider may not be able to prove although it is honest: a failure after its text (an
# older provider's error frame carries no proof), a connection cut or a stall after it (a proof cannot
# cross a broken stream, nor come after the 1 s drain of a cancel). An end frame that answers
# this side's cancel after text is one too: a provider of this release proves it (the cancel's end frame
# carries the proof of the text written, the engine's last block included, built without waiting in
# the engine's queue), one of an older release may not (sent none, or lost its last block to the
# cancel). Their unproved calls are cuts (:func:`unproved_cut`, :func:`cut_forgiven`): let go once
# between passed checks, that compat allowance, and failed ``no_proof`` when drawn after.
CUT_ENDINGS = frozenset({CallEnding.ERROR, CallEnding.STOPPED, CallEnding.CANCELLED})
# The endings whose proof, if one came, came on an error frame (a stopped provider's answer to the cancel
# is nothing or an error frame): its signed text hash is compared only in a drawn check
# (``protocols.machines.verify.CallFacts.error_frame``).
ERROR_FRAME_ENDINGS = frozenset({CallEnding.ERROR, CallEnding.STOPPED})


def call_ending(last: str | None, *, left: bool, provider_stopped: bool) -> CallEnding:
    """How a call ended: ``last``, the provider's last frame (``"end"``, ``"error"``; None: none came),
    ``left``, whether this side left before it (sent its cancel), ``provider_stopped``, whether it
    left because of the provider (its next frame did not come, its stream broke, it sent too much)."""
    if not left:
        return CallEnding.END if last == "end" else CallEnding.ERROR
    if not provider_stopped:
        return CallEnding.LEFT
    return CallEnding.CANCELLED if last == "end" else CallEnding.STOPPED


def ending_checked(ending: CallEnding, text_tokens: int) -> bool:
    """Whether a call that ended so goes through the spot check (drawn by the usual rule, checked with
    the proof its last frame carries, a drawn one without a proof failing ``no_proof`` unless
    :func:`cut_forgiven` lets it go). The end frame always does (the check itself skips calls served
    without a commitment by design). An error frame, or a provider that stopped, after chunks of a
    reply (``text_tokens``: their tokens, text or not: ``lease_calls.reply_tokens``) does, whether or
    not an end frame then answered this side's cancel: the caller was handed that reply, and a provider
    that streamed it and then failed the call, or went silent, would else be paid the chunks, never
    checked (a cheat that stalls at the end of every reply and answers the cancel with an end frame
    only paid ``stall_s`` in time). Before any of a reply's tokens nothing was served (a refusal, a
    failure before the first token; an embedding call's chunks are no reply). A call this side left on
    its own is not: it gave its caller this side's own error, and whatever the provider answers then is
    the cancel's doing."""
    if ending is CallEnding.END:
        return True
    return ending in CUT_ENDINGS and text_tokens > 0


# A provider's calls ended after their text without a proof (:data:`CUT_ENDINGS`), since its last passed
# check, that go unchecked: paid their chunks like any cut call (an honest provider whose relay dropped,
# whose connection broke or that restarted mid-reply cannot prove the reply its stream lost; one of a
# release before error-frame proofs sends a failed call's error frame without one).
UNPROVED_CUTS_FORGIVEN = 1


def unproved_cut(ending: CallEnding, text_tokens: int, proof_sent: bool, *, committed: bool = True) -> bool:
    """Whether a call that ended so counts as an unproved cut of its provider's (``Verifying.unproved_cut``
    counts them since its last passed check): a checked ending of :data:`CUT_ENDINGS` (after text)
    whose last frame carried no proof, an end frame answering this side's cancel included. Not a call
    served without a commitment by design (``committed`` False: tools, a grammar, ``n`` > 1, penalties;
    ``runtime.verify.provider.verifiable``): it never carries a proof, so counting it would use up an
    honest provider's forgiven cut, and fail its next verifiable one that it could not prove."""
    return committed and ending in CUT_ENDINGS and not proof_sent and ending_checked(ending, text_tokens)


def cut_forgiven(ending: CallEnding, proof_sent: bool, earlier_cuts: int) -> bool:
    """Whether a call that ended so is let go unchecked although :func:`ending_checked` says it is
    checked: an ``ERROR``, ``STOPPED`` or ``CANCELLED`` call without a proof, while its provider has
    ended fewer than :data:`UNPROVED_CUTS_FORGIVEN` such calls since its last passed check
    (``earlier_cuts``). Later ones go through the check (drawn by the usual rule; a drawn one fails
    ``no_proof``), on whatever lease: a provider that cuts its calls (or fails them after their text,
    or stalls at their end and answers the cancel without a proof) to dodge their checks gains one
    unchecked call between passed checks, and an honest one is not failed for one broken connection,
    one failure after its text, one stall answered by an older release without a proof."""
    return ending in CUT_ENDINGS and not proof_sent and earlier_cuts < UNPROVED_CUTS_FORGIVEN


def error_frame_checked(text_tokens: int, *, left: bool) -> bool:
    """Whether a call's error frame goes through the spot check an end frame gets: one the provider sent
    unasked after text chunks (:func:`ending_checked`), not one that answers this side's own cancel."""
    return ending_checked(CallEnding.LEFT if left else CallEnding.ERROR, text_tokens)


def call_refused_event(code: ErrorCode, reason: str | None) -> ConsumerEvent | None:
    """What a call the provider refused does to the held lease: ``paused`` pauses it, ``expired``
    expires it, ``ended`` or ``request_limit`` (nothing more can be served) ends it, the rest
    nothing. ``over_budget`` refuses this call only: a smaller one may still fit the rest of the
    budget, so the lease stays open for its holder (a router retires it anyway: ``should_abandon``).
    ``code`` is kept for callers that judge by it; the reason alone decides here."""
    if reason == Reason.PAUSED:
        return ConsumerEvent.PAUSE
    if reason == Reason.EXPIRED:
        return ConsumerEvent.EXPIRE
    if reason in (Reason.ENDED, Reason.REQUEST_LIMIT):
        return ConsumerEvent.SPEND
    return None  # a refusal without a reason (an older peer) leaves the lease as it is


def should_abandon(code: ErrorCode, reason: str | None) -> bool:
    """Whether a router drops a held lease after a failed call (and opens another), rather than
    keeping it: the lease is spent. A paused, busy or rate-limited one serves again by itself."""
    return not lease_outlives(code, reason)


@dataclass(frozen=True)
class ReceiptFacts:
    """A receipt the provider pushed, and what we counted on the lease."""

    state: ConsumerState
    units: int  # the receipt's cumulative units
    amount: int
    seen_units: int  # what we counted from end frames and chunks
    # What the calls we left without the provider's last frame allow beyond that count: the open
    # calls' allowances and the credit of those billed past (``left_calls.LeftCalls.tolerance``).
    left_units: int
    price_per_unit: int


def countersign_verdict(f: ReceiptFacts) -> Refusal | None:
    """Whether to countersign a receipt (and sign a voucher for its amount): the lease holds a grant and
    is not settled, and the receipt claims no more than we counted plus the tolerance of the calls we
    left (``left_units``: what was in flight, and their prompts, while their bill may still come), at
    units times the agreed price."""
    if CONSUMER_LEASE_MACHINE.lookup(f.state, ConsumerEvent.COUNTERSIGN) is None:
        return Refusal(ErrorCode.CONFLICT, "not_countersignable", f"no receipt is signed while the lease is {f.state}")
    return receipt_claim_verdict(f.units, f.amount, f.seen_units, f.price_per_unit, tolerance_units=f.left_units)


def receipt_counted(f: ReceiptFacts) -> bool:
    """Whether our count has caught up with the receipt (else we wait a moment for end frames in flight)."""
    return f.seen_units + max(0, f.left_units) >= f.units


# -- renew, settle -------------------------------------------------------------------------------


def renew_verdict(state: ConsumerState, expires_at: int, new_expires_at: int) -> Refusal | None:
    """Whether to ask for a renewal: only an active lease, and only to push its expiry later."""
    if CONSUMER_LEASE_MACHINE.lookup(state, ConsumerEvent.RENEW) is None:
        return Refusal(ErrorCode.CONFLICT, "not_renewable", f"a lease is not renewed while it is {state}")
    if new_expires_at <= expires_at:
        return Refusal(ErrorCode.INVALID_ARGUMENT, "renew_not_later", "a renewal must extend the expiry")
    return None


def escrow_closed(phase: str) -> bool:
    """Whether nothing more moves out of an escrow: closed (refunded or resolved) or gone. A disputed
    one is frozen but not closed: the arbiter's resolution still releases to the provider."""
    return phase in ("closed", "none")


@dataclass(frozen=True)
class EscrowSeen:
    """What one read of a held lease's escrow means for it (:func:`escrow_seen`)."""

    end: bool  # the held lease ends now: its ledger row is closed and the rest of the lock refunded
    event: ConsumerEvent | None  # the machine's event for that end (``freeze``), None if it has ended
    book: int  # the released amount to book as spend (more than booked so far), else 0
    committed: int  # what may still be released to the provider: the newest voucher, or the booked
    # amount once the escrow is closed
    settle: bool  # the lease is settled (:func:`settled`) after this read


def escrow_seen(
    *, state: ConsumerState, ended: bool, phase: str, released: int, booked: int, committed: int
) -> EscrowSeen:
    """What the escrow read on chain (``phase``, ``released``) does to a held escrowed lease in ``state``
    whose end work is done (``ended``) or not: a frozen escrow ends it (the provider's notice may
    have been lost: the chain has the last word); a release beyond what we booked is booked as spend;
    a closed escrow releases nothing more, so what we committed beyond the release is not owed."""
    if released < 0 or booked < 0 or committed < 0:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "amounts must be >= 0")
    end = escrow_frozen(phase) and not ended
    row = CONSUMER_LEASE_MACHINE.lookup(state, ConsumerEvent.FREEZE) if end else None
    event = None if row is None else row.event
    after = state if row is None else row.target
    book = released if released > booked else 0
    now_booked = max(booked, released)
    now_committed = now_booked if escrow_closed(phase) else committed
    return EscrowSeen(
        end=end,
        event=event,
        book=book,
        committed=now_committed,
        settle=settled(state=after, escrowed=True, phase=phase, booked=now_booked, committed=now_committed),
    )


def settled(*, state: ConsumerState, escrowed: bool, phase: str, booked: int, committed: int) -> bool:
    """Whether an ended escrowed lease is settled: its escrow closed (refunded or resolved) with every
    voucher we signed booked as spend."""
    if booked < 0 or committed < 0:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "amounts must be >= 0")
    return state == ConsumerState.ENDED and escrowed and escrow_closed(phase) and booked >= committed
