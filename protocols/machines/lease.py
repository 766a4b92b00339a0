"""The compute lease: its lifecycle table and the provider's metering rhythm.

The rule of the market wing: every decision that can refuse is a pure function or method in
``protocols.machines``, taking what the adapter fetched as plain data and answering with a typed
verdict; the adapters (``protocols/lease/``) only fetch, ask and act. The lease's rules are four
modules: this one (``LeaseSession``: grant, admission, metering, receipts, countersignatures, pause,
abandon, expiry, renewal, the escrow seen frozen), ``lease_calls`` (what a call may cost and what a
consumer accepts: both sides count with it), ``lease_provider`` (the provider's checks of a quote
request, an open, its payment and lock, a renewal, a voucher) and ``lease_consumer`` (the
consumer's machine and checks). The names of ``lease_calls`` and ``lease_provider`` are re-exported.

Everything here is pure: every method takes ``now`` (unix seconds) from the
caller and returns what the I/O adapter should do next.  That makes the whole
rhythm (meter -> receipt -> countersignature -> pause/abandon) replayable in
tests without a clock, a network or a chain.

Lifecycle (roles: ``provider``, ``consumer``, ``system``)::

    lease_quoted --grant--> lease_active --pause--> lease_paused --resume--> lease_active
    lease_active --renew--> lease_active
    quoted|active|paused --revoke|expire--> lease_ended
    active|paused --abandon|close--> lease_ended
    lease_ended --settle--> lease_settled   (terminal)

Choices where the brief was silent:

* "past ``expires_at``" means ``now >= expires_at``: ``expires_at`` is the
  first second at which the lease is no longer valid.
* Receipts are cumulative (``units_total``), so countersigning ``seq`` also
  clears every older outstanding receipt.
* Metering is a hard cap: ``meter`` refuses (``E_INSUFFICIENT_FUNDS``) units
  that would take ``units_metered * price`` over ``budget_cap`` and records
  nothing.  Work finishing after a pause or an end is still metered (it was
  authorized while active).
* Calls reserve: ``reserve`` holds ``max_tokens`` (or ``DEFAULT_COMPLETION_CAP``,
  or what is left) plus the prompt's estimate until ``finish_call`` turns the
  reservation into at most that many metered units, so metered + reserved never
  exceeds the budget however many calls run at once.  A call that would fit
  once the calls in flight are metered is ``E_RATE_LIMITED`` (busy), one that
  never can is ``E_INSUFFICIENT_FUNDS``.
* The consumer counts an end frame's units only within what arrived
  (``check_end_frame``); the provider counts a countersignature only with the
  escrow payer's voucher for exactly its amount (``check_countersignature``);
  the grant takes only the consumer's own, sufficient lock (``check_lock``);
  an escrow seen disputed or closed ends the lease (``escrow_observed``).
* A cut call (the consumer cancelled, reset or hung up before its end frame) is metered for the
  tokens of the chunks written and the prompt tokens the engine had decoded by the cut, within its
  reservation (``aborted_call_units``; an engine that failed after streaming: the chunks alone); the
  consumer counts the chunks it received, and accepts receipts up to ``ABORTED_CALL_TOLERANCE_UNITS``
  and the call's prompt estimate more per call it left without the provider's last frame, until a
  receipt bills past that call (``protocols.machines.left_calls``): what can still be in flight when
  a stream is cut, and the prompt it read.
* The lease id is the escrow id, and an escrow id is bound to its consumer: sha256 of a domain, the
  consumer's peer id and a salt the open carries (``lease_id_for``), so nobody can lock their own
  escrow under a buyer's id and open it first (``check_lock``).
* The abandon clock runs from the later of the oldest outstanding receipt and
  the last sign of life (``consumer_seen`` or a countersignature).
* ``tick`` performs at most one transition: expire beats abandon beats pause;
  "issue_receipt" is only emitted while active; while paused, "ask_again" every
  ``receipt_every_s`` (the outstanding receipt is pushed again, so a countersignature that
  comes late resumes the lease).
* Refusals carry a stable ``reason`` (``runtime.errors.Reason``) beside their code: ``paused``
  (serves again after the countersignature), ``ended``/``expired`` (never again),
  ``over_budget``, ``budget_busy``, ``request_limit``, ``rate_limit``; ``lease_outlives``
  says which of them leave a consumer's lease worth keeping.
* ``renew`` with an expiry that does not extend the lease is ``E_INVALID_ARGUMENT``.
"""

from __future__ import annotations

from collections import deque
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from protocols.machines.escrow_lock import escrow_frozen
from protocols.machines.history import History
from protocols.machines.lease_calls import (  # the rules both sides count with; re-exported
    ABORTED_CALL_TOLERANCE_UNITS,
    DEFAULT_COMPLETION_CAP,
    END_FRAME_INFLATED,
    OVER_BUDGET_MESSAGE,
    PER_STRING_OVERHEAD_UNITS,
    PROMPT_OVERHEAD_UNITS,
    UNLIMITED_UNITS,
    CallPlan,
    LeaseFit,
    aborted_call_units,
    call_units_needed,
    check_end_frame,
    check_receipt_claim,
    chunk_tokens,
    declared_max_tokens,
    end_frame_verdict,
    lease_fits,
    lease_outlives,
    plan_call,
    prompt_units_estimate,
    receipt_claim_verdict,
    receipt_tolerance,
)
from protocols.machines.lease_provider import (  # the provider's checks of what a consumer sends; re-exported
    LEASE_ID_DOMAIN,
    LEASE_ID_NOT_BOUND,
    LEASE_SALT_BYTES,
    LockFacts,
    check_countersignature,
    check_lock,
    lease_id_for,
    quotes_to_forget,
)
from protocols.machines.table import Machine, Transition
from runtime.errors import ClawnodeError, ErrorCode, Reason
from runtime.ledger.vocabulary import LEASE_MOVES, LeaseState  # the names and moves the ledger stores

PROVIDER = "provider"
CONSUMER = "consumer"
SYSTEM = "system"
LEASE_ROLES = frozenset({PROVIDER, CONSUMER, SYSTEM})


class LeaseEvent(StrEnum):
    GRANT = "grant"
    PAUSE = "pause"
    RESUME = "resume"
    RENEW = "renew"
    REVOKE = "revoke"
    EXPIRE = "expire"
    ABANDON = "abandon"
    CLOSE = "close"
    SETTLE = "settle"
    FREEZE = "freeze"  # the escrow behind the lease was disputed or closed on chain


def _t(source: LeaseState, event: LeaseEvent, target: LeaseState, *actors: str) -> Transition[LeaseState, LeaseEvent]:
    return Transition(source, event, target, frozenset(actors))


_Q, _A, _P, _E, _S = LeaseState.QUOTED, LeaseState.ACTIVE, LeaseState.PAUSED, LeaseState.ENDED, LeaseState.SETTLED
_Ev = LeaseEvent

LEASE_MACHINE: Machine[LeaseState, LeaseEvent] = Machine(
    "lease",
    [
        _t(_Q, _Ev.GRANT, _A, PROVIDER),
        _t(_A, _Ev.PAUSE, _P, PROVIDER),
        _t(_P, _Ev.RESUME, _A, PROVIDER),
        _t(_A, _Ev.RENEW, _A, CONSUMER),
        *(_t(s, _Ev.REVOKE, _E, PROVIDER, CONSUMER) for s in (_Q, _A, _P)),
        *(_t(s, _Ev.EXPIRE, _E, SYSTEM) for s in (_Q, _A, _P)),
        *(_t(s, _Ev.ABANDON, _E, SYSTEM) for s in (_A, _P)),
        *(_t(s, _Ev.CLOSE, _E, CONSUMER) for s in (_A, _P)),
        *(_t(s, _Ev.FREEZE, _E, SYSTEM) for s in (_Q, _A, _P)),
        _t(_E, _Ev.SETTLE, _S, SYSTEM),
    ],
    initial=_Q,
    terminal=[_S],
)
# One source of truth with the ledger: the table makes exactly the state moves the ledger checks what it
# stores against (runtime/ledger/vocabulary.py), adding who may make each and by which event.
if {(t.source, t.target) for t in LEASE_MACHINE.transitions if t.source != t.target} != {
    (source, target) for source, targets in LEASE_MOVES.items() for target in targets
}:
    raise ValueError("lease: LEASE_MACHINE's moves differ from the ledger's LEASE_MOVES")

# Actions tick() hands to the I/O adapter.
ISSUE_RECEIPT = "issue_receipt"
PAUSE = "pause"
END_ABANDONED = "end_abandoned"
EXPIRE = "expire"
END_FROZEN = "end_frozen"
ASK_AGAIN = "ask_again"  # paused: push the outstanding receipt to the consumer again

PAUSED_MESSAGE = "paused: a usage receipt is waiting for the countersignature"
BUDGET_BUSY_MESSAGE = "the lease's budget is held by calls in flight; retry when they finish"

# A session's transition log keeps its newest entries only (a long lease pauses and resumes often).
LEASE_HISTORY = 256
# Finished leases (ended, their final receipt and claim or refund queued) stay in memory for the API
# and a late message at most this long and at most this many; the ledger keeps the history.
FINISHED_KEEP = 256
FINISHED_KEEP_S = 600.0
# Quotes used to open a lease are remembered until their validity ends (an expired quote is refused
# anyway); at most this many at once: a node that granted this many in one validity window refuses
# more opens until some expire.
USED_QUOTES_MAX = 65536


class LeasePolicy(BaseModel):
    """What the consumer bought; integers only so both sides compute the same numbers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_requests: int = Field(ge=0)
    budget_cap: int = Field(ge=0, description="wei")
    rate_per_minute: int = Field(ge=1, description="requests per rolling 60 s")
    expires_at: int = Field(description="unix seconds; the lease is invalid from this second on")


class _Receipt:
    __slots__ = ("issued_at", "seq", "units_total")

    def __init__(self, seq: int, units_total: int, issued_at: float) -> None:
        self.seq = seq
        self.units_total = units_total
        self.issued_at = issued_at


class LeaseSession:
    """The provider's view of one lease: state, usage, receipts, and the metering rhythm.

    The adapter calls ``authorize`` before serving a request, ``meter`` after,
    ``receipt_issued`` once it has signed and sent a receipt, ``countersigned``
    when the consumer's signature arrives, and ``tick`` on a timer.  Every
    state change goes through :data:`LEASE_MACHINE` and is appended to
    ``history`` as ``(previous, event, next)`` (the newest ``LEASE_HISTORY`` entries).
    """

    def __init__(
        self,
        policy: LeasePolicy,
        price_per_unit: int,
        *,
        receipt_every_units: int,
        receipt_every_s: int,
        countersign_timeout_s: int,
        abandon_after_s: int,
    ) -> None:
        if price_per_unit < 0 or receipt_every_units < 1 or receipt_every_s < 1:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "price must be >= 0 and receipt intervals >= 1")
        if countersign_timeout_s < 1 or abandon_after_s < 1:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "timeouts must be >= 1 second")
        self.policy = policy
        self.price_per_unit = price_per_unit
        self.receipt_every_units = receipt_every_units
        self.receipt_every_s = receipt_every_s
        self.countersign_timeout_s = countersign_timeout_s
        self.abandon_after_s = abandon_after_s
        self.state: LeaseState = LEASE_MACHINE.initial
        self.history: History[tuple[LeaseState, LeaseEvent, LeaseState]] = History(LEASE_HISTORY)
        self.requests_served = 0
        self.units_metered = 0
        self.units_reserved = 0  # held by calls in flight: metered + reserved never exceeds the budget
        self.units_receipted = 0  # units_total of the newest issued receipt
        self.units_countersigned = 0  # units_total of the newest countersigned receipt
        self.last_seq = 0  # newest issued receipt
        self.countersigned_seq = 0  # newest countersigned receipt
        self.outstanding: dict[int, _Receipt] = {}
        self.last_receipt_at: float | None = None
        self.last_contact_at: float | None = None
        self.last_asked_at: float | None = None  # the outstanding receipt was last pushed (issued or asked again)
        self._recent_requests: deque[float] = deque()

    # -- the one place state changes -----------------------------------------------------
    def _apply(self, event: LeaseEvent, actor: str) -> None:
        previous = self.state
        self.state = LEASE_MACHINE.next_state(previous, event, actor)
        self.history.append((previous, event, self.state))

    def _require(self, *states: LeaseState, what: str) -> None:
        if self.state not in states:
            raise ClawnodeError(ErrorCode.CONFLICT, f"cannot {what} while the lease is {self.state}")

    # -- lifecycle ---------------------------------------------------------------------
    def grant(self, now: float) -> None:
        """Provider accepts the quote; the receipt and contact clocks start now."""
        if self.state == LeaseState.QUOTED and now >= self.policy.expires_at:
            self._apply(LeaseEvent.EXPIRE, SYSTEM)
            raise ClawnodeError(ErrorCode.EXPIRED, "the lease has expired", Reason.EXPIRED)
        self._apply(LeaseEvent.GRANT, PROVIDER)
        self.last_receipt_at = now
        self.last_contact_at = now

    def restore(
        self,
        *,
        units_metered: int,
        last_seq: int,
        units_receipted: int,
        countersigned_seq: int,
        units_countersigned: int,
        now: float,
    ) -> None:
        """Pick a granted lease up after a restart from what the ledger kept.

        A receipt that was issued but not countersigned is outstanding again, its clock restarted.
        """
        if not 0 <= units_countersigned <= units_receipted <= units_metered or countersigned_seq > last_seq:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "inconsistent metering to restore")
        self.units_metered = units_metered
        self.last_seq, self.units_receipted = last_seq, units_receipted
        self.countersigned_seq, self.units_countersigned = countersigned_seq, units_countersigned
        self.outstanding = {last_seq: _Receipt(last_seq, units_receipted, now)} if last_seq > countersigned_seq else {}

    def revoke(self, actor: str) -> None:
        self._apply(LeaseEvent.REVOKE, actor)

    def close(self) -> None:
        """The consumer is done early."""
        self._apply(LeaseEvent.CLOSE, CONSUMER)

    def renew(self, new_expires_at: int, actor: str) -> None:
        """Extend an active lease; renewing must actually push the expiry later."""
        LEASE_MACHINE.check(self.state, LeaseEvent.RENEW, actor)
        if new_expires_at <= self.policy.expires_at:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "a renewal must extend the expiry")
        self._apply(LeaseEvent.RENEW, actor)
        self.policy = self.policy.model_copy(update={"expires_at": new_expires_at})

    def settle(self) -> None:
        self._apply(LeaseEvent.SETTLE, SYSTEM)

    def consumer_seen(self, now: float) -> None:
        """Any sign of life from the consumer postpones abandonment."""
        self.last_contact_at = now if self.last_contact_at is None else max(self.last_contact_at, now)

    # -- serving -----------------------------------------------------------------------
    def authorize(self, now: float, units_estimate: int = 0) -> None:
        """Admit one request or refuse it with the reason the consumer should see; counts it."""
        self._check_admissible(now, units_estimate)
        self.requests_served += 1
        self._recent_requests.append(now)

    def _check_admissible(self, now: float, units_estimate: int) -> None:
        if units_estimate < 0:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "units_estimate must be >= 0")
        if self.state in (LeaseState.QUOTED, LeaseState.ACTIVE, LeaseState.PAUSED) and now >= self.policy.expires_at:
            self._apply(LeaseEvent.EXPIRE, SYSTEM)
            raise ClawnodeError(ErrorCode.EXPIRED, "the lease has expired", Reason.EXPIRED)
        if self.state == LeaseState.PAUSED:
            raise ClawnodeError(ErrorCode.CONFLICT, PAUSED_MESSAGE, Reason.PAUSED)
        if self.state != LeaseState.ACTIVE:
            raise ClawnodeError(ErrorCode.CONFLICT, f"the lease is not active ({self.state})", Reason.ENDED)
        if self.requests_served >= self.policy.max_requests:
            raise ClawnodeError(ErrorCode.RATE_LIMITED, "the lease's request limit is reached", Reason.REQUEST_LIMIT)
        while self._recent_requests and self._recent_requests[0] <= now - 60:
            self._recent_requests.popleft()
        if len(self._recent_requests) >= self.policy.rate_per_minute:
            raise ClawnodeError(
                ErrorCode.RATE_LIMITED, "too many requests per minute for this lease", Reason.RATE_LIMIT
            )
        if (self.units_metered + self.units_reserved + units_estimate) * self.price_per_unit > self.policy.budget_cap:
            raise ClawnodeError(ErrorCode.INSUFFICIENT_FUNDS, OVER_BUDGET_MESSAGE, Reason.OVER_BUDGET)

    @property
    def units_left(self) -> int:
        """Units the budget still covers beyond what is metered and reserved by calls in flight."""
        if self.price_per_unit == 0:
            return UNLIMITED_UNITS
        return max(0, self.policy.budget_cap // self.price_per_unit - self.units_metered - self.units_reserved)

    def reserve(self, now: float, body: dict[str, Any]) -> CallPlan:
        """Admit one call and hold the most units it may use until ``finish_call``.

        The plan's ``max_tokens`` is what the engine must be told, so the call cannot outgrow its
        reservation; concurrent calls together never reserve more than the budget covers.
        """
        self._check_admissible(now, 0)  # expiry, pause and limits come before the budget
        try:
            plan = plan_call(body, self.units_left)
        except ClawnodeError as error:
            if error.code != ErrorCode.INSUFFICIENT_FUNDS or self.units_reserved == 0:
                raise
            # It would fit once the calls in flight are metered: busy, not broke (the lease stays usable).
            plan_call(body, self.units_left + self.units_reserved)
            raise ClawnodeError(ErrorCode.RATE_LIMITED, BUDGET_BUSY_MESSAGE, Reason.BUDGET_BUSY) from None
        self.authorize(now, plan.reserve)
        self.units_reserved += plan.reserve
        return plan

    def billable(self, reserved: int, units: int) -> int:
        """What a call that reserved ``reserved`` units may be billed for the ``units`` its engine counted."""
        if reserved < 0 or units < 0:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "units must be >= 0")
        return min(units, reserved)

    def finish_call(self, reserved: int, units: int, now: float) -> bool:
        """A call ended: its reservation is released and its billable units metered (0 for a failed call).

        True when the adapter should issue a receipt now.
        """
        if not 0 <= reserved <= self.units_reserved:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "releasing more units than are reserved")
        billed = self.billable(reserved, units)
        self.units_reserved -= reserved
        if billed == 0:
            return False
        return self.meter(billed, now)

    def countersignature_refused(self, now: float) -> list[str]:
        """The consumer's answer to a receipt did not hold (no voucher, a forged one): serve no more."""
        if self.state == LeaseState.ACTIVE:
            self._apply(LeaseEvent.PAUSE, PROVIDER)
            return [PAUSE]
        return []

    def escrow_observed(self, phase: str) -> list[str]:
        """The adapter read the lease's escrow on chain: a frozen (disputed) or closed one ends the lease."""
        if escrow_frozen(phase) and self.state in (LeaseState.QUOTED, LeaseState.ACTIVE, LeaseState.PAUSED):
            self._apply(LeaseEvent.FREEZE, SYSTEM)
            return [END_FROZEN]
        return []

    def _receipt_due(self, now: float) -> bool:
        unreceipted = self.units_metered - self.units_receipted
        if unreceipted <= 0:
            return False
        if unreceipted >= self.receipt_every_units:
            return True
        return self.last_receipt_at is not None and now - self.last_receipt_at >= self.receipt_every_s

    def meter(self, units: int, now: float) -> bool:
        """Record delivered units; True when the adapter should issue a receipt now."""
        if units < 0:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "units must be >= 0")
        self._require(LeaseState.ACTIVE, LeaseState.PAUSED, LeaseState.ENDED, what="meter usage")
        if (self.units_metered + self.units_reserved + units) * self.price_per_unit > self.policy.budget_cap:
            raise ClawnodeError(ErrorCode.INSUFFICIENT_FUNDS, OVER_BUDGET_MESSAGE, Reason.OVER_BUDGET)
        self.units_metered += units
        return self._receipt_due(now)

    def receipt_issued(self, seq: int, units_total: int, now: float) -> None:
        """The adapter signed and sent receipt ``seq`` covering ``units_total`` cumulative units."""
        self._require(LeaseState.ACTIVE, LeaseState.PAUSED, LeaseState.ENDED, what="issue a receipt")
        if seq <= self.last_seq:
            raise ClawnodeError(ErrorCode.CONFLICT, "receipt sequence numbers must increase")
        if units_total < self.units_receipted or units_total > self.units_metered:
            raise ClawnodeError(
                ErrorCode.INVALID_ARGUMENT, "a receipt must cover from the last receipt up to the metered units"
            )
        self.last_seq = seq
        self.units_receipted = units_total
        self.last_receipt_at = now
        self.last_asked_at = now
        self.outstanding[seq] = _Receipt(seq, units_total, now)

    def countersigned(self, seq: int, now: float) -> None:
        """The consumer countersigned ``seq`` (and so every older receipt); may resume a pause."""
        self._require(LeaseState.ACTIVE, LeaseState.PAUSED, LeaseState.ENDED, what="take a countersignature")
        if seq not in self.outstanding:
            raise ClawnodeError(ErrorCode.CONFLICT, "unknown or already countersigned receipt")
        self.countersigned_seq = seq
        self.units_countersigned = self.outstanding[seq].units_total
        for old in [s for s in self.outstanding if s <= seq]:
            del self.outstanding[old]
        self.consumer_seen(now)
        if self.state == LeaseState.PAUSED and not self.outstanding:
            self._apply(LeaseEvent.RESUME, PROVIDER)

    def tick(self, now: float) -> list[str]:
        """Timer step: apply what time alone decides and tell the adapter what to do."""
        live = (LeaseState.QUOTED, LeaseState.ACTIVE, LeaseState.PAUSED)
        if self.state in live and now >= self.policy.expires_at:
            self._apply(LeaseEvent.EXPIRE, SYSTEM)
            return [EXPIRE]
        if self.state in (LeaseState.ACTIVE, LeaseState.PAUSED) and self.outstanding:
            oldest = min(r.issued_at for r in self.outstanding.values())
            alive = max(oldest, self.last_contact_at if self.last_contact_at is not None else oldest)
            if now - alive >= self.abandon_after_s:
                self._apply(LeaseEvent.ABANDON, SYSTEM)
                return [END_ABANDONED]
            if self.state == LeaseState.ACTIVE and now - oldest >= self.countersign_timeout_s:
                self._apply(LeaseEvent.PAUSE, PROVIDER)
                return [PAUSE]
            asked = self.last_asked_at if self.last_asked_at is not None else oldest
            if self.state == LeaseState.PAUSED and now - asked >= self.receipt_every_s:
                # A pause lasts until the countersignature arrives: the receipt is asked for again
                # every ``receipt_every_s`` (the consumer may have been busy or unreachable), so a
                # lease that is only paused resumes instead of waiting to be abandoned.
                self.last_asked_at = now
                return [ASK_AGAIN]
        if self.state == LeaseState.ACTIVE and self._receipt_due(now):
            return [ISSUE_RECEIPT]
        return []

    @property
    def amount_metered(self) -> int:
        return self.units_metered * self.price_per_unit


__all__ = [  # the names moved to ``lease_calls`` and ``lease_provider`` stay importable from here
    "ABORTED_CALL_TOLERANCE_UNITS",
    "DEFAULT_COMPLETION_CAP",
    "END_FRAME_INFLATED",
    "LEASE_ID_DOMAIN",
    "LEASE_ID_NOT_BOUND",
    "LEASE_SALT_BYTES",
    "OVER_BUDGET_MESSAGE",
    "PER_STRING_OVERHEAD_UNITS",
    "PROMPT_OVERHEAD_UNITS",
    "UNLIMITED_UNITS",
    "CallPlan",
    "LeaseFit",
    "LockFacts",
    "aborted_call_units",
    "call_units_needed",
    "check_countersignature",
    "check_end_frame",
    "check_lock",
    "check_receipt_claim",
    "chunk_tokens",
    "declared_max_tokens",
    "end_frame_verdict",
    "lease_fits",
    "lease_id_for",
    "lease_outlives",
    "plan_call",
    "prompt_units_estimate",
    "quotes_to_forget",
    "receipt_claim_verdict",
    "receipt_tolerance",
]
