"""Either party's side of a dispute: freeze the lock on chain and take the case to the arbiter, hear
the other party's dispute, add and receive evidence. The rules: ``TaskBook`` (``OpenDispute``,
``AddEvidence``) and ``task_checks.dispute_ready_verdict``, ``dispute_notice_verdict``,
``evidence_piece_verdict``, ``evidence_verdict``."""

from __future__ import annotations

import hashlib

from protocols import task_wire as w
from protocols.machines import task as m
from protocols.machines import task_checks as checks
from protocols.machines.verdict import enforce
from protocols.task.base import PUSH_ATTEMPTS, TaskCore, checked_evidence, log
from runtime.ledger import Evidence
from wire.signed import seal, to_base64


class DisputeRole(TaskCore):
    async def dispute(self, task_id: str, reason: str = "") -> w.TaskView:
        """Freeze the escrow on chain and take the case to the task's arbiter (creator or awarded bidder)."""
        record, local = self._task(task_id)
        award = self._award_of(local)
        effects = self._dry_run(m.OpenDispute(task_id=task_id), self.peer_id)
        if any(isinstance(e, m.DisputeOpened) and e.merged for e in effects):
            return self._view(task_id)
        enforce(
            checks.dispute_ready_verdict(
                local.announcement_env is not None, local.award_env is not None, local.result_env is not None
            )
        )
        assert local.announcement_env is not None and local.award_env is not None and local.result_env is not None
        client = self._client()
        escrow_id = bytes.fromhex(award.lock.escrow_id[2:])
        state = await self._escrow_state(award)
        if state.phase != "disputed":
            await client.chain.run(client.dispute, award.lock.payer, escrow_id)
        self._apply(m.OpenDispute(task_id=task_id), self.peer_id)
        local.dispute_reason = reason
        await self.ledger.open_dispute(
            self._lease_id(award), opened_by=self.peer_id, reason=reason, idempotency_key=f"dispute/{task_id}"
        )
        other = award.bidder if self.peer_id == record.creator else record.creator
        case = w.DisputeCase(
            task_id=task_id,
            announcement=local.announcement_env,
            award=local.award_env,
            result=local.result_env,
            review=local.review_env,
            reason=reason[: w.MAX_REASON],
        )
        self._spawn(self._push_quietly, other, w.DisputeRequest(task_id=task_id, reason=reason[: w.MAX_REASON]))
        panel = self._panel_of(local)
        if panel is not None:  # every member judges it
            for member in panel.peers:
                if member != record.arbiter:
                    self._spawn(self._push_quietly, member, case)
        await self._push(record.arbiter, case, attempts=PUSH_ATTEMPTS)
        self._start_close_out(task_id)
        log.info("task %s disputed", task_id[:12])
        return self._view(task_id)

    async def _on_dispute(self, message: w.DisputeRequest, remote: str) -> None:
        record, local = self._task(message.task_id)
        award = self._award_of(local)
        parties = (remote, self.peer_id, record.creator, award.bidder)
        enforce(checks.dispute_notice_verdict(*parties, phase="disputed"))  # a stranger costs no chain read
        state = await self._escrow_state(award)
        enforce(checks.dispute_notice_verdict(*parties, phase=state.phase))
        if record.dispute is None:
            self._apply(m.OpenDispute(task_id=message.task_id), remote)
        local.dispute_reason = message.reason
        await self.ledger.open_dispute(
            self._lease_id(award), opened_by=remote, reason=message.reason, idempotency_key=f"dispute/{message.task_id}"
        )
        self._start_close_out(message.task_id)

    async def add_evidence(self, task_id: str, note: str, attachment: bytes = b"") -> w.TaskView:
        """As a party to an open dispute: sign a note (and an attachment) and send it to the arbiter.

        Kept here first, then pushed to the arbiter (retried) and the other party (best effort); when
        the arbiter cannot be reached the error says so and sending the same piece again retries.
        """
        enforce(checks.evidence_piece_verdict(note, len(attachment)))
        record, local = self._task(task_id)
        notice = w.EvidenceNotice(
            task_id=task_id,
            party=self.peer_id,
            note=note,
            content_hash=hashlib.sha256(attachment).hexdigest(),
            size=len(attachment),
            submitted_at=int(self._now()),
        )
        known = local.evidence.get(notice.evidence_id)
        if known is not None:  # sent before: same signed time, so the arbiter sees one piece
            notice = notice.model_copy(update={"submitted_at": known.submitted_at})
        envelope = to_base64(seal(notice, self.key, domain=w.EVIDENCE_DOMAIN, payload_type=w.EVIDENCE_TYPE))
        await self._keep_evidence(notice, envelope, attachment, self.peer_id)
        award = self._award_of(local)
        request = w.EvidenceRequest(envelope=envelope, attachment=to_base64(attachment))
        other = award.bidder if self.peer_id == record.creator else record.creator
        self._spawn(self._push_quietly, other, request)
        panel = self._panel_of(local)
        if panel is not None:  # every member of the panel judges it
            for member in panel.peers:
                if member != record.arbiter:
                    self._spawn(self._push_quietly, member, request)
        await self._push(record.arbiter, request, attempts=PUSH_ATTEMPTS)
        log.info("task %s: evidence %s sent to the arbiter", task_id[:12], notice.evidence_id[:12])
        return self._view(task_id)

    async def evidence_attachment(self, task_id: str, evidence_id: str) -> bytes:
        self._task(task_id)
        return await self.ledger.evidence_attachment(task_id, evidence_id)

    async def _on_evidence(self, message: w.EvidenceRequest, remote: str) -> None:
        """As the arbiter or the other party: check the signature and the attachment, then keep it."""
        notice, attachment = checked_evidence(message.envelope, message.attachment, remote)
        await self._keep_evidence(notice, message.envelope, attachment, remote)

    async def _keep_evidence(self, notice: w.EvidenceNotice, envelope: str, attachment: bytes, party: str) -> None:
        """The book decides whether the piece may join the dispute; the ledger keeps it across restarts."""
        _, local = self._task(notice.task_id)
        evidence_id = notice.evidence_id
        self._apply(
            m.AddEvidence(task_id=notice.task_id, evidence_id=evidence_id, content_hash=notice.content_hash), party
        )
        piece = Evidence(
            task_id=notice.task_id,
            evidence_id=evidence_id,
            submitted_by=party,
            note=notice.note,
            content_hash=notice.content_hash,
            size=notice.size,
            submitted_at=notice.submitted_at,
        )
        local.evidence.setdefault(evidence_id, piece)
        await self.ledger.add_evidence(piece, attachment=attachment, envelope=envelope)
