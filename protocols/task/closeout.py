"""The close-out of an awarded task, for the creator and the awarded bidder (and the arbiter's
book): wait for the lock to close on chain, then book what it moved (ledger first, then the book,
then the task row); plus the sweep that expires open tasks and forgets finished ones.

No polling loop runs through a dispute window: each step asks ``task_checks.close_out_step`` /
``finalize_step`` what to do and sleeps until the next deadline it names (a refund's
``not_before``), until woken by news of the task (a review, a dispute, a resolution: anything the
book applies), or for a bounded backoff while a settlement lands.
"""

from __future__ import annotations

import functools
import math

import trio

from protocols import task_wire as w
from protocols.machines import task as m
from protocols.machines import task_checks as checks
from protocols.machines.verdict import enforce
from protocols.task.base import SWEEP_INTERVAL_S, TaskCore, TaskLocal, checked_evidence, log
from runtime.errors import ClawnodeError, ErrorCode


class CloseOutRole(TaskCore):
    async def _on_resolution(self, message: w.ResolutionRequest, remote: str) -> None:
        record, local = self._task(message.task_id)
        award = self._award_of(local)
        panel = self._panel_of(local)
        # A panel's decision is told by whichever member sent it on chain.
        arbiter = remote if panel is not None and remote in panel.peers else record.arbiter
        enforce(checks.resolution_verdict(remote, arbiter, "closed", message.to_bidder, message.to_bidder))
        state = await self._escrow_state(award)
        enforce(checks.resolution_verdict(remote, arbiter, state.phase, state.released, message.to_bidder))
        self._record_resolution(record, message.to_bidder, message.to_creator)
        local.run_verdict = message.verdict or local.run_verdict
        if message.evidence is not None:
            await self._keep_arbiter_evidence(message, remote, arbiter)
        self._start_close_out(message.task_id)

    async def _keep_arbiter_evidence(self, message: w.ResolutionRequest, remote: str, arbiter: str) -> None:
        """The arbiter's signed record of its re-run: checked like a party's evidence, kept in the ledger."""
        assert message.evidence is not None
        envelope = message.evidence
        notice, attachment = checked_evidence(envelope, message.attachment, remote)
        if notice.task_id != message.task_id:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the evidence is about another task", "case_mixes_tasks")
        enforce(checks.resolution_verdict(remote, arbiter, "closed", 0, 0))  # the task's arbiter, nobody else
        await self._keep_run_evidence(notice, envelope, attachment)

    @staticmethod
    async def _sleep_or_wake(local: TaskLocal, seconds: float) -> bool:
        """Sleep ``seconds`` or until the task's news wakes us; True when woken."""
        woken = False
        with trio.move_on_after(max(0.0, seconds)):
            await local.wake.wait()
            woken = True
        if local.wake.is_set():
            local.wake = trio.Event()
        return woken

    async def _close_out(self, task_id: str) -> None:
        """Wait for the lock to close on chain, then book it: ledger first, then the book, then the task row."""
        record, local = self._task(task_id)
        award = self._award_of(local)
        try:
            backoff, quiet_since = checks.CLOSE_POLL_MIN_S, self._now()
            while True:
                phase: str | None = None
                try:
                    state = await self._escrow_state(award)
                    phase = state.phase
                except ClawnodeError as error:
                    log.debug("task %s close-out waits: %s", task_id[:12], error.code)
                receipt = record.receipt
                step = checks.close_out_step(
                    checks.CloseOutFacts(
                        phase=phase,
                        creator_side=record.creator == self.peer_id,
                        refund_queued=local.refund_queued,
                        receipt_state=receipt.state if receipt else None,
                        to_creator=receipt.to_creator if receipt else None,
                        not_before=receipt.not_before if receipt else 0.0,
                        now=self._now(),
                        backoff=backoff,
                    )
                )
                if step.action == "book":
                    break
                if step.action == "queue_refund":
                    await self.ledger.enqueue_refund(self._lease_id(award))
                    local.refund_queued = True
                    self.wake_settlement()
                    backoff, quiet_since = checks.CLOSE_POLL_MIN_S, self._now()
                    continue
                if await self._sleep_or_wake(local, step.wait_s):
                    backoff, quiet_since = checks.CLOSE_POLL_MIN_S, self._now()
                else:  # a window's end is news too: the other party acts on it
                    last_news = max(quiet_since, receipt.not_before if receipt else 0.0)
                    backoff = checks.next_backoff(backoff, self._now() - last_news)
            await self._book_closed(record, local, award, state.released, state.amount - state.released)
        finally:
            local.closing = False

    async def _book_closed(
        self, record: m.TaskRecord, local: TaskLocal, award: w.AwardNotice, to_bidder: int, to_creator: int
    ) -> None:
        task_id, lease_id = record.task_id, self._lease_id(award)
        if record.dispute is not None:
            self._record_resolution(record, to_bidder, to_creator)
            if record.creator == self.peer_id or award.bidder == self.peer_id:
                try:  # normally recorded when the dispute opened; here in case that message was lost
                    await self.ledger.open_dispute(
                        lease_id,
                        opened_by=record.dispute.opened_by,
                        reason=local.dispute_reason or "",
                        idempotency_key=f"dispute/{task_id}",
                    )
                except ClawnodeError:
                    pass
                await self.ledger.resolve_dispute(
                    f"{lease_id}/dispute",
                    to_payee=to_bidder,
                    to_payer=to_creator,
                    idempotency_key=f"resolve/{task_id}",
                )
        if record.creator != self.peer_id and award.bidder != self.peer_id:
            local.closed, local.module = True, None  # the arbiter: no ledger rows, nothing to settle
            return
        # The settler sees the lock closed and books what the chain moved, without a transaction.
        await self.ledger.enqueue_refund(lease_id)
        self.wake_settlement()
        while True:
            receipt = record.receipt
            step = checks.finalize_step(
                receipt.state if receipt else None,
                receipt is not None and receipt.to_bidder is not None and receipt.to_creator is not None,
                receipt.not_before if receipt else 0.0,
                self._now(),
                to_bidder,
            )
            if step.action == "done":
                break
            if step.action == "wait":  # a review or resolution on its way, or the book's window still runs
                await self._sleep_or_wake(local, step.wait_s)
                continue
            event: m.TaskEvent = (
                m.Settle(task_id=task_id, settlement_id=award.lock.escrow_id)
                if step.action == "settle"
                else m.Refund(task_id=task_id, settlement_id=award.lock.escrow_id)
            )
            self._apply(event, m.SYSTEM)
            break
        await self.ledger.set_task_state(task_id, m.TaskState.CLOSED, idempotency_key=f"task/{task_id}/closed")
        local.closed, local.module = True, None  # nobody fetches a closed task's module
        log.info("task %s closed: %d to the bidder, %d back", task_id[:12], to_bidder, to_creator)

    async def _sweep(self) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL_S)
            now = self._now()
            self._forget_finished(now)
            for task_id, record in list(self.book.tasks.items()):
                if record.state == m.TaskState.OPEN and now >= record.deadline:
                    try:
                        self._apply(m.Expire(task_id=task_id), m.SYSTEM)
                    except ClawnodeError:
                        continue
                    if record.creator == self.peer_id:
                        key = f"task/{task_id}/expired"
                        self._spawn(
                            functools.partial(self.ledger.set_task_state, idempotency_key=key),
                            task_id,
                            m.TaskState.EXPIRED,
                        )
                self._dispute_if_silent(task_id, record, now)
                self._revoke_if_no_show(task_id, record, now)

    def _revoke_if_no_show(self, task_id: str, record: m.TaskRecord, now: float) -> None:
        """As the creator: an award with nothing delivered by the deadline is revoked, and its lock's refund
        queued by the close-out (``no_show_revoke_due``)."""
        award, local = record.award, self.local.get(task_id)
        if local is None:
            return
        due = checks.no_show_revoke_due(
            creator_side=record.creator == self.peer_id,
            award_active=award is not None and award.state == m.AwardState.ACTIVE,
            delivered=record.result is not None,
            deadline=record.deadline,
            now=now,
            retry_at=local.revoke_retry_at,
        )
        if not due:
            return
        try:
            self._apply(m.RevokeAward(task_id=task_id), self.peer_id)
        except ClawnodeError as error:  # tried again after a growing wait, not on every sweep
            local.revoke_wait_s = checks.next_revoke_wait(local.revoke_wait_s)
            local.revoke_retry_at = now + local.revoke_wait_s
            log.info(
                "task %s: the award could not be revoked (%s); tried again in %.0f s",
                task_id[:12],
                error.code,
                local.revoke_wait_s,
            )
            return
        log.info("task %s: nothing delivered by the deadline; the award is revoked and its lock refunded", task_id[:12])
        self._start_close_out(task_id)

    def _dispute_if_silent(self, task_id: str, record: m.TaskRecord, now: float) -> None:
        """As the awarded seller: a result the creator left unreviewed past the review timeout goes to the
        arbiter (``silence_dispute_due``), before the lock's deadline lets the creator take it back, and
        so does a rejected one a re-run decides (``rejection_dispute_due``), before the refund's window ends."""
        local = self.local.get(task_id)
        result, receipt = record.result, record.receipt
        if local is None or record.award is None or result is None or record.award.bidder != self.peer_id:
            return  # only the awarded seller disputes so: no params parsed each sweep for others' tasks
        facts = checks.SilenceFacts(
            seller=record.award.bidder == self.peer_id,
            result_state=result.state,
            receipt_state=receipt.state if receipt is not None else None,
            disputed=record.dispute is not None,
            submitted_at=result.submitted_at,
            review_timeout_s=record.review_timeout_s,
            now=now,
            tried_at=local.silence_tried_at,
            rerun_decides=self._rerun_decides(local),
            rejected_at=receipt.not_before - self.limits.dispute_window_s if receipt is not None else 0.0,
        )
        if checks.silence_dispute_due(facts):
            local.silence_tried_at = math.inf  # no second dispute transaction while this one is in flight
            self._spawn(self._dispute_silence, task_id, "the creator did not review the result in time")
        elif checks.rejection_dispute_due(facts):
            local.silence_tried_at = math.inf
            self._spawn(self._dispute_silence, task_id, "the re-run decides: the result is the program's")

    async def _dispute_silence(self, task_id: str, reason: str) -> None:
        try:
            await self.dispute(task_id, reason)
            log.info("task %s disputed by the seller: %s", task_id[:12], reason)
        except ClawnodeError as error:  # tried again after SILENCE_RETRY_S while it is still due
            log.info("task %s: the seller's dispute could not be sent yet: %s", task_id[:12], error.code)
        finally:
            if (local := self.local.get(task_id)) is not None:
                local.silence_tried_at = self._now()  # the retry interval counts from the attempt's end

    def _forget_finished(self, now: float) -> None:
        """Finished tasks leave memory after ``TASK_FINISHED_KEEP_S`` or beyond the newest
        ``TASK_FINISHED_KEEP`` (the book decides); a message about one later is ``E_NOT_FOUND``."""
        busy = frozenset(task_id for task_id, local in self.local.items() if local.closing)
        for task_id in self.book.forget_finished(now, busy):
            self.local.pop(task_id, None)
