"""The arbiter's side of the task market: take a dispute case (rebuilding the task from its signed
envelopes), resolve it on chain, tell both parties. The arbiter keeps no ledger rows of its own.
The rules: ``TaskBook`` (``ResolveDispute``) and ``task_checks.case_verdict``, ``case_lock_verdict``,
``resolve_verdict``."""

from __future__ import annotations

import trio

from protocols import task_wire as w
from protocols.gossip import ANNOUNCEMENT_DOMAIN, ANNOUNCEMENT_PAYLOAD_TYPE, TaskAnnouncement
from protocols.machines import task as m
from protocols.machines import task_checks as checks
from protocols.machines import task_panel as panel_rules
from protocols.machines.verdict import Refusal, enforce
from protocols.task.base import TaskCore, TaskLocal, log
from runtime.errors import ClawnodeError, ErrorCode
from wire.signed import open_base64, to_base64


class ArbiterRole(TaskCore):
    async def _on_dispute_case(self, case: w.DisputeCase, remote: str) -> None:
        """As the arbiter: rebuild the task from the signed evidence and record the dispute."""
        ann_signer, ann_payload = open_base64(
            case.announcement, domain=ANNOUNCEMENT_DOMAIN, payload_type=ANNOUNCEMENT_PAYLOAD_TYPE
        )
        ann = TaskAnnouncement.model_validate_json(ann_payload)
        award_signer, award_payload = open_base64(case.award, domain=w.AWARD_DOMAIN, payload_type=w.AWARD_TYPE)
        award = w.AwardNotice.model_validate_json(award_payload)
        result_signer, result_payload = open_base64(case.result, domain=w.RESULT_DOMAIN, payload_type=w.RESULT_TYPE)
        result = w.ResultNotice.model_validate_json(result_payload)
        review: w.ReviewNotice | None = None
        review_signer: str | None = None
        task_ids = [ann.task_id, award.task_id, result.task_id, case.task_id]
        if case.review is not None:
            review_signer, review_payload = open_base64(case.review, domain=w.REVIEW_DOMAIN, payload_type=w.REVIEW_TYPE)
            review = w.ReviewNotice.model_validate_json(review_payload)
            task_ids.append(review.task_id)
        client = self._client()
        our_wallet: str = client.account.address
        arbiter = ann.arbiter or ""
        panel = w.panel_terms(award.params)
        if panel is not None:  # a member of the task's panel: judged as its arbiter, with its panel wallet
            named = panel.wallet_of(self.peer_id)
            if named is None or named.lower() != our_wallet.lower():
                raise ClawnodeError(ErrorCode.FORBIDDEN, "this node is not on the task's panel", "not_on_panel")
            our_wallet, arbiter = award.arbiter_wallet, self.peer_id
        enforce(
            checks.case_verdict(
                checks.CaseFacts(
                    me=self.peer_id,
                    remote=remote,
                    creator=ann.creator,
                    arbiter=arbiter,
                    announcement_signer=ann_signer,
                    announcement_arbiter_wallet=ann.arbiter_wallet,
                    award_signer=award_signer,
                    award_creator=award.creator,
                    award_bidder=award.bidder,
                    award_arbiter_wallet=award.arbiter_wallet,
                    result_signer=result_signer,
                    result_bidder=result.bidder,
                    review_signer=review_signer,
                    task_ids=tuple(task_ids),
                    our_wallet=our_wallet,
                    tasks_in_book=len(self.book.tasks),
                    known_task=ann.task_id in self.book.tasks,
                )
            )
        )
        raw = await self._escrow_state(award)
        enforce(checks.case_lock_verdict(self._lock_state(raw), our_wallet, award.payee, award.price))
        if panel is not None:
            payer, escrow_id = award.lock.payer, bytes.fromhex(award.lock.escrow_id[2:])
            on_chain = await client.chain.run(client.panel_of, payer, escrow_id)
            wallets = [member.wallet for member in panel.members]
            enforce(panel_rules.panel_lock_verdict(wallets, panel.threshold, raw.arbiter, raw.threshold, on_chain))
        self._replay_case(ann, award, result, review, case, remote)
        self.local[ann.task_id].result_usage = result.usage
        self._after_case(ann.task_id)

    def _replay_case(
        self,
        ann: TaskAnnouncement,
        award: w.AwardNotice,
        result: w.ResultNotice,
        review: w.ReviewNotice | None,
        case: w.DisputeCase,
        remote: str,
    ) -> None:
        task_id, book = ann.task_id, self.book
        at = float(award.awarded_at)
        if task_id not in book.tasks:
            book.apply(
                m.Publish(
                    task_id=task_id,
                    budget=ann.budget,
                    deadline=ann.deadline,
                    allowed_assets=frozenset({ann.asset}),
                    arbiter=self.peer_id,
                    review_timeout_s=ann.review_timeout_s,
                ),
                ann.creator,
                min(at, ann.deadline - 1),
            )
        local = self.local.setdefault(task_id, TaskLocal(ann))
        local.announcement_env, local.award, local.award_env = case.announcement, award, case.award
        local.result_env, local.review_env, local.dispute_reason = case.result, case.review, case.reason
        record = book.get(task_id)
        if record.award is None:
            if award.bid_id not in record.bids:
                book.apply(
                    m.PlaceBid(task_id=task_id, bid_id=award.bid_id, price=award.price, asset=ann.asset),
                    award.bidder,
                    at,
                )
            book.apply(m.Award(task_id=task_id, bid_id=award.bid_id, lock_ref=award.lock.escrow_id), ann.creator, at)
        if record.result is None:
            book.apply(
                m.SubmitResult(task_id=task_id, content_hash=result.content_hash, size=result.size),
                award.bidder,
                float(result.submitted_at),
            )
        if review is not None and record.result is not None and record.result.state == m.ResultState.SUBMITTED:
            event: m.TaskEvent = (
                m.Accept(task_id=task_id)
                if review.verdict == "accepted"
                else m.Reject(task_id=task_id, reason=review.reason or "rejected")
            )
            book.apply(event, ann.creator, float(review.reviewed_at))
        if record.dispute is None:
            self._apply(m.OpenDispute(task_id=task_id), remote)
        log.info("task %s: dispute case received from %s", task_id[:12], remote[:16])

    async def resolve(self, task_id: str, to_bidder: int, verdict: str | None = None) -> w.TaskView:
        """As the arbiter: split the disputed price on chain, ``to_bidder`` to the bidder, the rest back."""
        record, local = self._task(task_id)
        price = record.award.price if record.award is not None else 0
        event = m.ResolveDispute(task_id=task_id, to_bidder=to_bidder, to_creator=price - to_bidder)
        self._dry_run(event, self.peer_id)
        award = self._award_of(local)
        client = self._client()
        wallet_check = checks.resolve_verdict(client.account.address, award.arbiter_wallet, "disputed", 0, to_bidder)
        if isinstance(wallet_check, Refusal):  # not ours to resolve: no chain read
            raise wallet_check.error()
        state = await self._escrow_state(award)
        action = checks.resolve_verdict(
            client.account.address, award.arbiter_wallet, state.phase, state.released, to_bidder
        )
        if isinstance(action, Refusal):
            raise action.error()
        tx_hash: str | None = None
        if action == "send":
            escrow_id = bytes.fromhex(award.lock.escrow_id[2:])
            sent = await client.chain.run(client.resolve, award.lock.payer, escrow_id, to_bidder)
            tx_hash = sent.tx_hash
        self._apply(event, self.peer_id)
        evidence, attachment = local.run_evidence or (None, b"")
        message = w.ResolutionRequest(
            task_id=task_id,
            to_bidder=to_bidder,
            to_creator=price - to_bidder,
            tx_hash=tx_hash,
            verdict=verdict,
            evidence=evidence,
            attachment=to_base64(attachment) if attachment else "",
        )
        async with trio.open_nursery() as nursery:
            for party in (record.creator, award.bidder):
                nursery.start_soon(self._push_quietly, party, message)
        log.info("task %s resolved: %d to the bidder, %d back", task_id[:12], to_bidder, price - to_bidder)
        return self._view(task_id)
