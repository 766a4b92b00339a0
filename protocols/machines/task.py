"""The task market: six small state machines as data, and one pure book that applies them.

The rule of the market wing: every decision that can refuse is a pure function or method here, in
``task_checks`` (what the adapter fetched: envelopes, artifacts, the escrow lock, the close-out's
next step) or in ``escrow_lock``, taking facts as plain data and answering with a typed verdict or
typed effects; a refusal carries a stable code and reason. The adapters (``protocols/task/``) only
fetch, ask and act. The vocabulary (states, tables, events, effects, records) is ``task_model``.

Machines (anything not in a table is refused with ``E_CONFLICT``)::

    TaskOrder   task_open --award--> task_awarded --close--> task_closed
                task_open --cancel--> task_cancelled ; task_open --expire--> task_expired
                (task_open --place_bid--> task_open is the "only an open task takes bids" rule)
    TaskBid     bid_submitted --withdraw|accept|reject--> bid_withdrawn|bid_accepted|bid_rejected
    TaskAward   award_active --revoke--> award_revoked
                (award_active --deliver--> award_active: "only an active award takes a result")
    TaskResult  result_submitted --accept|reject--> result_accepted|result_rejected
    TaskReceipt receipt_pending --settle|refund|dispute--> receipt_settled|receipt_refunded|receipt_disputed
                receipt_disputed --settle|refund--> receipt_settled|receipt_refunded
    Dispute     dispute_open --resolve|reject--> dispute_resolved|dispute_rejected
                (dispute_open --add_evidence--> dispute_open: "evidence only while the dispute is open")

Actors in the tables are *roles relative to one task*: ``creator``,
``participant`` (any account that is neither creator, arbiter nor system),
``bidder`` (owner of the bid in question), ``awarded_bidder``, ``arbiter``
and ``system`` (the node's own adapter: timers and chain confirmations; pass
the account string :data:`SYSTEM`).

:class:`TaskBook` is the replicated, pure state of *many* tasks as one node
sees them: every node applies the same authenticated events in the same order
and reaches the same states; the book needs many tasks because the risk
limits (open tasks per account, bids and disputes per account) span tasks.

Order of checks in :meth:`TaskBook.apply`: unknown task/bid id ->
``E_NOT_FOUND``; the actor's roles may never perform the event ->
``E_FORBIDDEN``; the entity is missing or ``(state, event)`` is not in the
table -> ``E_CONFLICT``; then the event's guards (input ->
``E_INVALID_ARGUMENT``, asset allow-list -> ``E_FORBIDDEN``, data conditions ->
``E_CONFLICT``, deadline -> ``E_EXPIRED``, rate limits -> ``E_RATE_LIMITED``).

Money, and the choices made where the brief was silent:

* An award locks exactly the winning bid's price; its ``lock_ref`` (the
  escrow lock id) becomes the receipt's ``settlement_id``.  The receipt is
  created with the award, in ``receipt_pending``, with no decision yet.
* A decision (accept, reject, revoke, dispute resolution) records the split
  ``to_bidder + to_creator == price`` and emits :class:`ReleaseToBidder` /
  :class:`RefundCreator`.  The receipt only reaches ``receipt_settled``
  (``to_bidder > 0``) or ``receipt_refunded`` (``to_bidder == 0``) when the
  adapter confirms with ``Settle``/``Refund`` carrying that same
  settlement id; then the task goes ``task_awarded -> task_closed``.  So
  "accept closes the task" happens at settlement, and a dispute resolution
  also closes through ``Settle``/``Refund`` (not directly).
* A rejection's refund waits ``dispute_window_s`` (``not_before``) so the
  bidder can dispute; opening a dispute clears the pending decision.
* A dispute needs a rejected result, or a result unreviewed for the task's
  ``review_timeout_s``; one dispute per task.  The same party disputing again
  gets the existing id back (``DisputeOpened(merged=True)``, not counted
  against its rate); the other party gets ``E_CONFLICT``.
* Each party may add up to ``max_evidence_per_party`` pieces of evidence to an open dispute
  (``AddEvidence``, ids are content hashes: the same piece again is ``EvidenceAdded(merged=True)``,
  the same id with another hash ``E_CONFLICT``); the arbiter and the other party are notified.
* ``RejectDispute`` decides against whoever opened it (full refund if the
  bidder opened it, full release if the creator did).
* ``RevokeAward`` is only possible after the task deadline and before any
  result; the award is refunded in full.
* Cancel and expiry reject all still-submitted bids.  Bids and awards at or
  after the deadline are ``E_EXPIRED``.  "Open tasks" for the per-account
  limit are those in ``task_open`` or ``task_awarded``.
"""

# ruff: noqa: F403, F405 - the vocabulary comes from task_model by name
from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable
from typing import Any

from protocols.machines.history import History, finished_to_evict
from protocols.machines.table import Machine
from protocols.machines.task_model import *  # the vocabulary, re-exported
from protocols.machines.task_model import __all__ as _VOCABULARY
from protocols.machines.task_model import _Event
from runtime.errors import ClawnodeError, ErrorCode

__all__ = [*_VOCABULARY, "TaskBook"]


def _err(code: ErrorCode, message: str, reason: str) -> ClawnodeError:
    """A refusal of the book: its code, a message for people and a stable reason for programs."""
    return ClawnodeError(code, message, reason)


class TaskBook:
    """Pure state of many tasks; :meth:`apply` is the only entry point that changes it.

    Every state change goes through a machine's ``next_state`` and is logged in
    ``history`` as ``(machine, entity_id, previous, event, next)`` (the newest ``TASK_HISTORY``
    entries).
    """

    def __init__(self, limits: RiskLimits | None = None) -> None:
        self.limits = limits or RiskLimits()
        self.tasks: dict[str, TaskRecord] = {}
        self.history: History[tuple[str, str, str, str, str]] = History(TASK_HISTORY)
        self._finished_at: dict[str, float] = {}  # task id -> when the book first saw it finished
        self._forgotten: dict[str, float] = {}  # task id -> deadline: ids that stay taken
        self._bid_times: dict[str, deque[float]] = {}
        self._dispute_times: dict[str, deque[float]] = {}
        self._handlers: dict[type[_Event], Callable[[Any, str, float], list[Effect]]] = {
            Publish: self._publish,
            PlaceBid: self._place_bid,
            WithdrawBid: self._withdraw_bid,
            Award: self._award,
            RevokeAward: self._revoke_award,
            SubmitResult: self._submit_result,
            Accept: self._review,
            Reject: self._review,
            Cancel: self._cancel_or_expire,
            Expire: self._cancel_or_expire,
            OpenDispute: self._open_dispute,
            ResolveDispute: self._decide_dispute,
            RejectDispute: self._decide_dispute,
            AddEvidence: self._add_evidence,
            Settle: self._finalize,
            Refund: self._finalize,
        }

    def apply(self, event: TaskEvent, actor: str, now: float) -> list[Effect]:
        """Apply one authenticated event by ``actor`` at ``now``; return what the adapter must do."""
        handler = self._handlers.get(type(event))
        if handler is None:
            raise _err(ErrorCode.INVALID_ARGUMENT, "unknown task event", "unknown_event")
        return handler(event, actor, now)

    def dry_run(self, event: TaskEvent, actor: str, now: float) -> list[Effect]:
        """What :meth:`apply` would return (or raise), changing nothing.

        Every event but ``Publish`` touches one task and the actor's rate-limit window, so it runs on
        a probe book holding copies of just those; ``Publish`` (which counts the creator's open
        tasks) runs on a copy of the whole book.
        """
        if isinstance(event, Publish):
            return copy.deepcopy(self).apply(event, actor, now)
        probe = TaskBook(self.limits)
        task = self.tasks.get(event.task_id)
        if task is not None:
            probe.tasks[event.task_id] = copy.deepcopy(task)
        for mine, theirs in ((self._bid_times, probe._bid_times), (self._dispute_times, probe._dispute_times)):
            if actor in mine:
                theirs[actor] = deque(mine[actor])
        return probe.apply(event, actor, now)

    def get(self, task_id: str) -> TaskRecord:
        task = self.tasks.get(task_id)
        if task is None:
            raise _err(ErrorCode.NOT_FOUND, "unknown task", "unknown_task")
        return task

    def forget_finished(
        self,
        now: float,
        busy: frozenset[str] = frozenset(),
        *,
        keep: int = TASK_FINISHED_KEEP,
        keep_s: float = TASK_FINISHED_KEEP_S,
    ) -> list[str]:
        """Drop finished tasks past their retention and idle rate-limit entries; return the ids dropped.

        ``busy`` are tasks whose close-out is still running: they wait out the time limit, not the count.
        """
        finished = (TS.CLOSED, TS.CANCELLED, TS.EXPIRED)
        for task_id, task in self.tasks.items():
            if task.state in finished and task_id not in self._finished_at:
                self._finished_at[task_id] = now
        entries = [(task_id, at, task_id not in busy) for task_id, at in self._finished_at.items()]
        gone = finished_to_evict(entries, now, keep=keep, keep_s=keep_s)
        for task_id in gone:
            del self._finished_at[task_id]
            self._forgotten[task_id] = self.tasks.pop(task_id).deadline
        for task_id in [t for t, deadline in self._forgotten.items() if deadline <= now]:
            del self._forgotten[task_id]
        while len(self._forgotten) > TASK_TOMBSTONES_MAX:
            del self._forgotten[next(iter(self._forgotten))]
        for times, window in ((self._bid_times, 60.0), (self._dispute_times, 3600.0)):
            for actor in [a for a, t in times.items() if not t or t[-1] <= now - window]:
                del times[actor]
        return gone

    def open_tasks_of(self, account: str) -> int:
        return sum(1 for t in self.tasks.values() if t.creator == account and t.state in (TS.OPEN, TS.AWARDED))

    # -- table plumbing -------------------------------------------------------------------
    @staticmethod
    def _gate(machine: Machine[Any, Ev], state: str | None, event: Ev, roles: frozenset[str], missing: str) -> str:
        """Permission, then table; returns the role to act as.  Guards come after this."""
        if not roles & machine.actors_for(event):
            raise _err(ErrorCode.FORBIDDEN, f"{machine.name}: this account may not {event}", "not_permitted")
        if state is None:
            raise _err(ErrorCode.CONFLICT, missing, "missing_stage")
        row = machine.lookup(state, event)
        if row is None:
            raise _err(ErrorCode.CONFLICT, f"{machine.name}: cannot {event} in state {state}", "wrong_state")
        usable = sorted(roles & row.actors)
        if not usable:
            raise _err(
                ErrorCode.FORBIDDEN, f"{machine.name}: this account may not {event} in state {state}", "not_permitted"
            )
        return usable[0]

    def _move(self, machine: Machine[Any, Ev], record: Any, entity_id: str, event: Ev, role: str) -> None:
        previous = record.state
        record.state = machine.next_state(previous, event, role)
        self.history.append((machine.name, entity_id, str(previous), str(event), str(record.state)))

    @staticmethod
    def _within_rate(times: deque[float], now: float, window: float, limit: int, what: str) -> None:
        while times and times[0] <= now - window:
            times.popleft()
        if len(times) >= limit:
            raise _err(ErrorCode.RATE_LIMITED, f"too many {what}; try again later", "too_many_" + what.split()[0])

    @staticmethod
    def _decide(receipt: ReceiptRecord, to_bidder: int, to_creator: int, not_before: float) -> None:
        receipt.to_bidder, receipt.to_creator, receipt.not_before = to_bidder, to_creator, not_before

    def _payouts(self, task: TaskRecord) -> list[Effect]:
        assert task.award is not None and task.receipt is not None
        r = task.receipt
        out: list[Effect] = []
        if r.to_bidder:
            out.append(ReleaseToBidder(task.task_id, task.award.bidder, r.to_bidder, r.settlement_id))
        if r.to_creator:
            out.append(RefundCreator(task.task_id, task.creator, r.to_creator, r.settlement_id, r.not_before))
        return out

    # -- handlers ---------------------------------------------------------------------------
    def _publish(self, ev: Publish, actor: str, now: float) -> list[Effect]:
        if actor == SYSTEM:
            raise _err(ErrorCode.FORBIDDEN, "the system account cannot publish tasks", "system_account")
        if ev.task_id in self.tasks or ev.task_id in self._forgotten:
            raise _err(ErrorCode.CONFLICT, "the task id is already taken", "task_id_taken")
        if not ev.task_id or not ev.arbiter or ev.arbiter in (actor, SYSTEM):
            raise _err(
                ErrorCode.INVALID_ARGUMENT, "a task needs an id and an arbiter other than its creator", "no_arbiter"
            )
        if ev.budget < 1 or ev.budget > self.limits.max_task_budget:
            raise _err(
                ErrorCode.INVALID_ARGUMENT, "the task budget is outside the allowed range", "budget_out_of_range"
            )
        if ev.deadline <= now or ev.review_timeout_s < 1 or not ev.allowed_assets:
            raise _err(
                ErrorCode.INVALID_ARGUMENT, "a task needs a future deadline, a review timeout and assets", "bad_terms"
            )
        if self.open_tasks_of(actor) >= self.limits.max_open_tasks_per_account:
            raise _err(ErrorCode.RATE_LIMITED, "too many open tasks for this account", "too_many_open_tasks")
        self.tasks[ev.task_id] = TaskRecord(
            task_id=ev.task_id,
            creator=actor,
            budget=ev.budget,
            deadline=ev.deadline,
            allowed_assets=ev.allowed_assets,
            arbiter=ev.arbiter,
            review_timeout_s=ev.review_timeout_s,
            created_at=now,
            state=TASK_MACHINE.initial,
        )
        return []

    def _place_bid(self, ev: PlaceBid, actor: str, now: float) -> list[Effect]:
        task = self.get(ev.task_id)
        role = self._gate(TASK_MACHINE, task.state, Ev.PLACE_BID, roles_of(task, actor), "")
        if not ev.bid_id or ev.price < 1:
            raise _err(ErrorCode.INVALID_ARGUMENT, "a bid needs an id and a positive price", "bad_bid")
        if ev.asset not in task.allowed_assets:
            raise _err(ErrorCode.FORBIDDEN, "this task does not accept that asset", "asset_not_accepted")
        if ev.bid_id in task.bids:
            raise _err(ErrorCode.CONFLICT, "the bid id is already taken", "bid_id_taken")
        if ev.price > task.budget:
            raise _err(ErrorCode.CONFLICT, "the bid exceeds the task budget", "over_budget")
        if now >= task.deadline:
            raise _err(ErrorCode.EXPIRED, "the task deadline has passed", "deadline_passed")
        # A task keeps every bid until it ends (up to 30 days): the per-minute window alone let one
        # account add one every two seconds for the task's whole life.
        if sum(1 for bid in task.bids.values() if bid.bidder == actor) >= self.limits.max_bids_per_bidder:
            raise _err(ErrorCode.RATE_LIMITED, "too many bids of this account on this task", "too_many_bids_on_task")
        if len(task.bids) >= self.limits.max_bids_per_task:
            raise _err(ErrorCode.RATE_LIMITED, "this task holds as many bids as it takes", "task_bids_full")
        times = self._bid_times.setdefault(actor, deque())
        self._within_rate(times, now, 60, self.limits.max_bids_per_minute, "bids per minute")
        self._move(TASK_MACHINE, task, task.task_id, Ev.PLACE_BID, role)
        times.append(now)
        task.bids[ev.bid_id] = BidRecord(ev.bid_id, actor, ev.price, ev.asset, now, BID_MACHINE.initial)
        return [Notify(task.task_id, task.creator, "bid_placed")]

    def _withdraw_bid(self, ev: WithdrawBid, actor: str, now: float) -> list[Effect]:
        task = self.get(ev.task_id)
        bid = task.bids.get(ev.bid_id)
        if bid is None:
            raise _err(ErrorCode.NOT_FOUND, "unknown bid", "unknown_bid")
        role = self._gate(BID_MACHINE, bid.state, Ev.WITHDRAW, roles_of(task, actor, bid), "")
        self._move(BID_MACHINE, bid, bid.bid_id, Ev.WITHDRAW, role)
        return [Notify(task.task_id, task.creator, "bid_withdrawn")]

    def _award(self, ev: Award, actor: str, now: float) -> list[Effect]:
        task = self.get(ev.task_id)
        bid = task.bids.get(ev.bid_id)
        if bid is None:
            raise _err(ErrorCode.NOT_FOUND, "unknown bid", "unknown_bid")
        role = self._gate(TASK_MACHINE, task.state, Ev.AWARD, roles_of(task, actor), "")
        if bid.state != BS.SUBMITTED:
            raise _err(ErrorCode.CONFLICT, "the bid is no longer open", "bid_closed")
        if not ev.lock_ref:
            raise _err(ErrorCode.CONFLICT, "the budget is not locked", "not_locked")
        if now >= task.deadline:
            raise _err(ErrorCode.EXPIRED, "the task deadline has passed", "deadline_passed")
        self._move(TASK_MACHINE, task, task.task_id, Ev.AWARD, role)
        effects: list[Effect] = []
        for other in task.bids.values():
            if other.state == BS.SUBMITTED:
                won = other is bid
                self._move(BID_MACHINE, other, other.bid_id, Ev.ACCEPT if won else Ev.REJECT, role)
                effects.append(Notify(task.task_id, other.bidder, "bid_accepted" if won else "bid_rejected"))
        task.award = AwardRecord(bid.bid_id, bid.bidder, bid.price, ev.lock_ref, now, AWARD_MACHINE.initial)
        task.receipt = ReceiptRecord(ev.lock_ref, bid.price, state=RECEIPT_MACHINE.initial)
        return effects

    def _revoke_award(self, ev: RevokeAward, actor: str, now: float) -> list[Effect]:
        task = self.get(ev.task_id)
        award = task.award
        state = award.state if award is not None else None
        role = self._gate(AWARD_MACHINE, state, Ev.REVOKE, roles_of(task, actor), "the task has no award")
        assert award is not None and task.receipt is not None
        if task.result is not None:
            raise _err(ErrorCode.CONFLICT, "a result was already delivered", "result_delivered")
        if now < task.deadline:
            raise _err(ErrorCode.CONFLICT, "the delivery deadline has not passed", "deadline_not_passed")
        self._move(AWARD_MACHINE, award, task.task_id, Ev.REVOKE, role)
        self._decide(task.receipt, 0, award.price, now)
        return [Notify(task.task_id, award.bidder, "award_revoked"), *self._payouts(task)]

    def _submit_result(self, ev: SubmitResult, actor: str, now: float) -> list[Effect]:
        task = self.get(ev.task_id)
        award = task.award
        state = award.state if award is not None else None
        role = self._gate(AWARD_MACHINE, state, Ev.DELIVER, roles_of(task, actor), "the task has no award")
        assert award is not None
        if not ev.content_hash or ev.size < 0:
            raise _err(ErrorCode.INVALID_ARGUMENT, "a result needs a content hash and a size >= 0", "bad_result")
        if task.result is not None:
            raise _err(ErrorCode.CONFLICT, "a result was already delivered", "result_delivered")
        self._move(AWARD_MACHINE, award, task.task_id, Ev.DELIVER, role)
        task.result = ResultRecord(ev.content_hash, ev.size, now, state=RESULT_MACHINE.initial)
        return [Notify(task.task_id, task.creator, "result_submitted")]

    def _review(self, ev: Accept | Reject, actor: str, now: float) -> list[Effect]:
        task = self.get(ev.task_id)
        event = Ev.ACCEPT if isinstance(ev, Accept) else Ev.REJECT
        result = task.result
        state = result.state if result is not None else None
        role = self._gate(RESULT_MACHINE, state, event, roles_of(task, actor), "no result has been delivered")
        assert result is not None and task.award is not None and task.receipt is not None
        if task.receipt.state != CS.PENDING:
            raise _err(ErrorCode.CONFLICT, "the result is under dispute", "under_dispute")
        if isinstance(ev, Reject) and not ev.reason.strip():
            raise _err(ErrorCode.INVALID_ARGUMENT, "a rejection needs a reason", "no_reason")
        self._move(RESULT_MACHINE, result, task.task_id, event, role)
        price = task.award.price
        if isinstance(ev, Accept):
            self._decide(task.receipt, price, 0, now)
            topic: NotifyTopic = "result_accepted"
        else:
            result.reject_reason = ev.reason
            self._decide(task.receipt, 0, price, now + self.limits.dispute_window_s)
            topic = "result_rejected"
        return [Notify(task.task_id, task.award.bidder, topic), *self._payouts(task)]

    def _cancel_or_expire(self, ev: Cancel | Expire, actor: str, now: float) -> list[Effect]:
        task = self.get(ev.task_id)
        event = Ev.CANCEL if isinstance(ev, Cancel) else Ev.EXPIRE
        role = self._gate(TASK_MACHINE, task.state, event, roles_of(task, actor), "")
        if event == Ev.EXPIRE and now < task.deadline:
            raise _err(ErrorCode.CONFLICT, "the task deadline has not passed", "deadline_not_passed")
        self._move(TASK_MACHINE, task, task.task_id, event, role)
        topic: NotifyTopic = "task_cancelled" if event == Ev.CANCEL else "task_expired"
        effects: list[Effect] = [] if event == Ev.CANCEL else [Notify(task.task_id, task.creator, topic)]
        for bid in task.bids.values():
            if bid.state == BS.SUBMITTED:
                self._move(BID_MACHINE, bid, bid.bid_id, Ev.REJECT, role)
                effects.append(Notify(task.task_id, bid.bidder, topic))
        return effects

    def _open_dispute(self, ev: OpenDispute, actor: str, now: float) -> list[Effect]:
        task = self.get(ev.task_id)
        roles = roles_of(task, actor)
        if not roles & RECEIPT_MACHINE.actors_for(Ev.DISPUTE):
            raise _err(ErrorCode.FORBIDDEN, "only the creator or the awarded bidder may dispute", "not_permitted")
        if task.dispute is not None and task.dispute.opened_by == actor:
            return [DisputeOpened(task.task_id, task.dispute.dispute_id, actor, merged=True)]
        receipt = task.receipt
        state = receipt.state if receipt is not None else None
        role = self._gate(RECEIPT_MACHINE, state, Ev.DISPUTE, roles, "nothing to dispute: the task has no award")
        assert receipt is not None and task.award is not None
        result = task.result
        timed_out = (
            result is not None and result.state == RS.SUBMITTED and now >= result.submitted_at + task.review_timeout_s
        )
        if not (timed_out or (result is not None and result.state == RS.REJECTED)):
            raise _err(
                ErrorCode.CONFLICT, "a dispute needs a rejected result or a review timeout", "nothing_to_dispute"
            )
        times = self._dispute_times.setdefault(actor, deque())
        self._within_rate(times, now, 3600, self.limits.max_disputes_per_hour, "disputes per hour")
        self._move(RECEIPT_MACHINE, receipt, task.task_id, Ev.DISPUTE, role)
        times.append(now)
        receipt.to_bidder = receipt.to_creator = None
        dispute_id = f"{task.task_id}/dispute"
        task.dispute = DisputeRecord(dispute_id, actor, now, DISPUTE_MACHINE.initial)
        other = task.award.bidder if actor == task.creator else task.creator
        return [
            DisputeOpened(task.task_id, dispute_id, actor, merged=False),
            Notify(task.task_id, task.arbiter, "dispute_opened"),
            Notify(task.task_id, other, "dispute_opened"),
        ]

    def _decide_dispute(self, ev: ResolveDispute | RejectDispute, actor: str, now: float) -> list[Effect]:
        task = self.get(ev.task_id)
        event = Ev.RESOLVE if isinstance(ev, ResolveDispute) else Ev.REJECT
        dispute = task.dispute
        state = dispute.state if dispute is not None else None
        role = self._gate(DISPUTE_MACHINE, state, event, roles_of(task, actor), "the task has no dispute")
        assert dispute is not None and task.award is not None and task.receipt is not None
        price = task.award.price
        if isinstance(ev, ResolveDispute):
            if ev.to_bidder < 0 or ev.to_creator < 0 or ev.to_bidder + ev.to_creator != price:
                raise _err(
                    ErrorCode.INVALID_ARGUMENT, "the split must be >= 0 and add up to the award price", "bad_split"
                )
            split = (ev.to_bidder, ev.to_creator)
        else:
            split = (price, 0) if dispute.opened_by == task.creator else (0, price)
        self._move(DISPUTE_MACHINE, dispute, dispute.dispute_id, event, role)
        self._decide(task.receipt, *split, now)
        return [
            Notify(task.task_id, task.creator, "dispute_decided"),
            Notify(task.task_id, task.award.bidder, "dispute_decided"),
            *self._payouts(task),
        ]

    def _add_evidence(self, ev: AddEvidence, actor: str, now: float) -> list[Effect]:
        task = self.get(ev.task_id)
        dispute = task.dispute
        state = dispute.state if dispute is not None else None
        role = self._gate(DISPUTE_MACHINE, state, Ev.ADD_EVIDENCE, roles_of(task, actor), "the task has no dispute")
        assert dispute is not None and task.award is not None
        if not ev.evidence_id or not ev.content_hash:
            raise _err(ErrorCode.INVALID_ARGUMENT, "evidence needs an id and a content hash", "bad_evidence")
        known = dispute.evidence.get(ev.evidence_id)
        if known is not None:
            if known.submitted_by != actor or known.content_hash != ev.content_hash:
                raise _err(ErrorCode.CONFLICT, "another piece of evidence has this id", "evidence_id_taken")
            return [EvidenceAdded(task.task_id, ev.evidence_id, actor, merged=True)]
        if sum(1 for e in dispute.evidence.values() if e.submitted_by == actor) >= self.limits.max_evidence_per_party:
            raise _err(ErrorCode.RATE_LIMITED, "too many pieces of evidence from this party", "too_much_evidence")
        self._move(DISPUTE_MACHINE, dispute, dispute.dispute_id, Ev.ADD_EVIDENCE, role)
        dispute.evidence[ev.evidence_id] = EvidenceRecord(ev.evidence_id, actor, ev.content_hash, now)
        other = task.award.bidder if actor == task.creator else task.creator
        return [
            EvidenceAdded(task.task_id, ev.evidence_id, actor, merged=False),
            Notify(task.task_id, task.arbiter, "evidence_added"),
            Notify(task.task_id, other, "evidence_added"),
        ]

    def _finalize(self, ev: Settle | Refund, actor: str, now: float) -> list[Effect]:
        task = self.get(ev.task_id)
        event = Ev.SETTLE if isinstance(ev, Settle) else Ev.REFUND
        receipt = task.receipt
        state = receipt.state if receipt is not None else None
        role = self._gate(RECEIPT_MACHINE, state, event, roles_of(task, actor), "the task has no receipt")
        assert receipt is not None and task.award is not None
        if not ev.settlement_id:
            raise _err(ErrorCode.INVALID_ARGUMENT, "a settlement id is required", "no_settlement_id")
        if ev.settlement_id != receipt.settlement_id:
            raise _err(ErrorCode.CONFLICT, "the settlement id does not match the locked budget", "wrong_settlement")
        if receipt.to_bidder is None or receipt.to_creator is None:
            raise _err(ErrorCode.CONFLICT, "nothing has been decided for this receipt yet", "undecided")
        if event == Ev.SETTLE and receipt.to_bidder == 0:
            raise _err(ErrorCode.CONFLICT, "the decision is a refund, not a settlement", "decided_refund")
        if event == Ev.REFUND and receipt.to_bidder > 0:
            raise _err(ErrorCode.CONFLICT, "the decision pays the bidder; settle it instead", "decided_settle")
        if now < receipt.not_before:
            raise _err(ErrorCode.CONFLICT, "the dispute window is still open", "dispute_window_open")
        self._move(RECEIPT_MACHINE, receipt, task.task_id, event, role)
        task.released += receipt.to_bidder
        task.refunded += receipt.to_creator
        self._move(TASK_MACHINE, task, task.task_id, Ev.CLOSE, SYSTEM)
        return [
            Notify(task.task_id, task.creator, "task_closed"),
            Notify(task.task_id, task.award.bidder, "task_closed"),
        ]
