"""The creator's side of the task market: publish, take bids, award (lock, then notify), take the
result, review, cancel. The rules: ``TaskBook`` and ``task_checks.publish_verdict``,
``funding_verdict``, ``result_verdict``."""

from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING

import trio

from protocols import task_wire as w
from protocols.gossip import ANNOUNCEMENT_DOMAIN, ANNOUNCEMENT_PAYLOAD_TYPE, TaskAnnouncement
from protocols.lease_wire import EscrowLock
from protocols.machines import task as m
from protocols.machines import task_checks as checks
from protocols.machines import task_panel as panel_rules
from protocols.machines.lease_provider import LEASE_SALT_BYTES, lease_id_for
from protocols.machines.verdict import enforce
from protocols.task.base import PUSH_ATTEMPTS, TaskCore, TaskLocal, log, peer_id_valid
from runtime.errors import ClawnodeError, ErrorCode
from runtime.ledger import EscrowRef, LeaseOpen
from wire.signed import from_base64, open_base64, seal, to_base64

if TYPE_CHECKING:
    from runtime.escrow import EscrowClient


class CreatorRole(TaskCore):
    async def publish(
        self,
        capability: str,
        budget: int,
        deadline_s: int,
        summary: str = "",
        params: str = "{}",
        arbiter_peer: str | None = None,
        arbiter_wallet: str | None = None,
        review_timeout_s: int = 600,
    ) -> w.TaskView:
        """Announce a task; ``deadline_s`` from now. The arbiter defaults to the node's configured one."""
        if arbiter_peer is None or arbiter_wallet is None:
            arbiter_peer, arbiter_wallet = self.default_arbiter() or (None, None)
        client = self.escrow()
        enforce(
            checks.publish_verdict(
                checks.PublishFacts(
                    arbiter_peer=arbiter_peer,
                    arbiter_wallet=arbiter_wallet,
                    arbiter_peer_valid=arbiter_peer is not None and peer_id_valid(arbiter_peer),
                    params_size=len(params.encode()),
                    own_wallet=client.account.address if client is not None else None,
                )
            )
        )
        assert arbiter_peer is not None and arbiter_wallet is not None
        now = self._now()
        ann = TaskAnnouncement(
            task_id=secrets.token_hex(16),
            creator=self.peer_id,
            capability=capability,
            budget=budget,
            deadline=int(now) + deadline_s,
            review_timeout_s=review_timeout_s,
            summary=summary,
            params_hash=hashlib.sha256(params.encode()).hexdigest(),
            arbiter=arbiter_peer,
            arbiter_wallet=arbiter_wallet,
        )
        self._apply(
            m.Publish(
                task_id=ann.task_id,
                budget=budget,
                deadline=ann.deadline,
                allowed_assets=frozenset({ann.asset}),
                arbiter=arbiter_peer,
                review_timeout_s=review_timeout_s,
            ),
            self.peer_id,
        )
        envelope = seal(ann, self.key, domain=ANNOUNCEMENT_DOMAIN, payload_type=ANNOUNCEMENT_PAYLOAD_TYPE)
        self.local[ann.task_id] = TaskLocal(ann, announcement_env=to_base64(envelope), params=params)
        await self.ledger.create_task(
            ann.task_id, role=m.CREATOR, counterparty=None, budget=budget, idempotency_key=f"task/{ann.task_id}"
        )
        await self.announcements.announce(ann, self.key)
        log.info("task %s published for %s", ann.task_id[:12], capability)
        return self._view(ann.task_id)

    async def _on_bid(self, message: w.BidRequest, remote: str) -> None:
        _, local = self._task(message.task_id)
        self._apply(
            m.PlaceBid(task_id=message.task_id, bid_id=message.bid_id, price=message.price, asset=message.asset),
            remote,
        )
        local.payees[message.bid_id] = message.payee

    async def _on_withdraw_bid(self, message: w.WithdrawBidRequest, remote: str) -> None:
        self._apply(m.WithdrawBid(task_id=message.task_id, bid_id=message.bid_id), remote)

    async def award(self, task_id: str, bid_id: str) -> w.TaskView:
        """Lock the bid's price in escrow, then award it; the bidder checks the lock before accepting."""
        record, local = self._task(task_id)
        self._dry_run(m.Award(task_id=task_id, bid_id=bid_id, lock_ref="0x" + "0" * 64), self.peer_id)
        bid = record.bids[bid_id]
        panel_named = self._panel_of(local)
        if panel_named is not None:  # a seller on the panel would vote on its own dispute
            seats = [(member.peer, member.wallet) for member in panel_named.members]
            enforce(panel_rules.panel_terms_verdict(seats, panel_named.threshold, (self.peer_id, bid.bidder)))
        payee, arbiter_wallet = local.payees.get(bid_id), local.announcement.arbiter_wallet
        client = self._client()
        balance, gas_cost = await client.chain.run(self._funds, client)
        enforce(
            checks.funding_verdict(
                checks.FundingFacts(
                    payee=payee,
                    arbiter_wallet=arbiter_wallet,
                    announced=local.announcement_env is not None,
                    balance=balance,
                    price=bid.price,
                    lock_gas_cost=gas_cost,
                )
            )
        )
        assert payee is not None and arbiter_wallet is not None
        # The lock's id is bound to our peer id by a salt the award carries: the seller takes no lock but ours.
        salt = secrets.token_bytes(LEASE_SALT_BYTES)
        escrow_id = lease_id_for(self.host.get_id().to_bytes(), salt)
        lease_id = escrow_id.hex()
        lock_ref = "0x" + lease_id
        # In the ledger before any money moves: a lock whose award fails is refunded from here.
        await self.ledger.open_lease(
            LeaseOpen(
                lease_id=lease_id,
                role="consumer",
                provider=bid.bidder,
                consumer=self.peer_id,
                price_per_unit=bid.price,
                budget=bid.price,
                escrow=EscrowRef(contract=client.address, payer=client.account.address, escrow_id=lock_ref),
            ),
            idempotency_key=f"award/{lease_id}",
        )
        window = self.limits.dispute_window_s
        try:
            chain_now = await client.chain.run(client.chain.next_timestamp)
            deadline = (
                checks.lock_lasts_until(chain_now, record.deadline, self._now(), record.review_timeout_s)
                + checks.DEADLINE_SLACK_S
            )
            panel = self._panel_of(local)
            if panel is not None:  # k arbiters, m of whose signed votes pay out (protocols/task/panel.py)
                wallets = [member.wallet for member in panel.members]
                result = await client.chain.run(
                    lambda: client.lock_panel(
                        escrow_id,
                        payee=payee,
                        panel=wallets,
                        threshold=panel.threshold,
                        amount=bid.price,
                        deadline=deadline,
                        window=window,
                    )
                )
            else:
                result = await client.chain.run(
                    lambda: client.lock(
                        escrow_id,
                        payee=payee,
                        arbiter=arbiter_wallet,
                        amount=bid.price,
                        deadline=deadline,
                        window=window,
                    )
                )
        except BaseException as error:
            with trio.CancelScope(shield=True):
                await self.ledger.end_lease(lease_id, idempotency_key=f"end/{lease_id}")
                if not isinstance(error, ClawnodeError) or error.code in (ErrorCode.TIMEOUT, ErrorCode.UNAVAILABLE):
                    # The lock's fate is unknown: a refund finds it if it landed, and fails harmlessly if not.
                    await self.ledger.enqueue_refund(lease_id)
                    self.wake_settlement()
            raise
        self._apply(m.Award(task_id=task_id, bid_id=bid_id, lock_ref=lock_ref), self.peer_id)
        notice = w.AwardNotice(
            task_id=task_id,
            bid_id=bid_id,
            creator=self.peer_id,
            bidder=bid.bidder,
            price=bid.price,
            payee=payee,
            arbiter_wallet=arbiter_wallet,
            chain_id=client.chain.chain_id,
            contract=client.address,
            lock=EscrowLock(payer=client.account.address, escrow_id=lock_ref, tx_hash=result.tx_hash),
            salt=salt.hex(),
            awarded_at=int(self._now()),
            announcement=local.announcement_env or "",
            params=local.params or "",
        )
        local.award = notice
        local.award_env = to_base64(seal(notice, self.key, domain=w.AWARD_DOMAIN, payload_type=w.AWARD_TYPE))
        await self.ledger.set_task_state(task_id, m.TaskState.AWARDED, idempotency_key=f"task/{task_id}/awarded")
        log.info("task %s awarded to %s", task_id[:12], bid.bidder[:16])
        try:
            await self._push(bid.bidder, w.AwardRequest(envelope=local.award_env), attempts=PUSH_ATTEMPTS)
        except ClawnodeError as error:
            # The award stands (the money is locked); the bidder cannot deliver without it, and the
            # book lets the creator revoke after the deadline.
            log.warning("the award of %s did not reach the bidder: %s", task_id[:12], error.code)
        return self._view(task_id)

    @staticmethod
    def _funds(client: EscrowClient) -> tuple[int, int]:
        """The wallet's balance and what the lock's gas costs (some chains refuse without a reason)."""
        from runtime.escrow.client import GAS_LIMITS  # here: web3 is slow to import, and only the chain needs it

        with client.chain.lock:
            w3 = client.chain.w3
            return int(w3.eth.get_balance(client.account.address)), GAS_LIMITS["lock"] * int(w3.eth.gas_price)

    async def _on_result(self, message: w.ResultRequest, remote: str) -> None:
        signer, payload = open_base64(message.envelope, domain=w.RESULT_DOMAIN, payload_type=w.RESULT_TYPE)
        notice = w.ResultNotice.model_validate_json(payload)
        artifact = from_base64(message.artifact)
        facts = checks.ResultFacts(
            signer=signer,
            remote=remote,
            bidder=notice.bidder,
            size=notice.size,
            content_hash=notice.content_hash,
            artifact_size=len(artifact),
            artifact_sha256=hashlib.sha256(artifact).hexdigest(),
        )
        verdict = checks.result_verdict(facts)
        if verdict is not None and verdict.code == ErrorCode.FORBIDDEN:
            raise verdict.error()  # a stranger learns nothing about the task
        _, local = self._task(notice.task_id)
        enforce(verdict)
        self._apply(m.SubmitResult(task_id=notice.task_id, content_hash=notice.content_hash, size=notice.size), remote)
        local.result_env, local.artifact, local.result_usage = message.envelope, artifact, notice.usage
        log.info("task %s: result of %d bytes received", notice.task_id[:12], notice.size)

    def artifact(self, task_id: str) -> bytes:
        """The delivered artifact (creator side), checked against its signed hash on receipt."""
        _, local = self._task(task_id)
        if local.artifact is None:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "no result has been delivered")
        return local.artifact

    async def review(self, task_id: str, accept: bool, reason: str = "") -> w.TaskView:
        """Accept (the price is released to the bidder) or reject (refunded after the dispute window)."""
        _, local = self._task(task_id)
        award = self._award_of(local)
        event: m.TaskEvent = m.Accept(task_id=task_id) if accept else m.Reject(task_id=task_id, reason=reason)
        effects = self._apply(event, self.peer_id)
        notice = w.ReviewNotice(
            task_id=task_id,
            creator=self.peer_id,
            verdict="accepted" if accept else "rejected",
            reason=reason[: w.MAX_REASON],
            reviewed_at=int(self._now()),
        )
        local.review_env = to_base64(seal(notice, self.key, domain=w.REVIEW_DOMAIN, payload_type=w.REVIEW_TYPE))
        for effect in effects:
            if isinstance(effect, m.ReleaseToBidder):
                await self.ledger.enqueue_release(self._lease_id(award), effect.amount)
                self.wake_settlement()
        self._spawn(self._push_quietly, award.bidder, w.ReviewRequest(envelope=local.review_env))
        self._start_close_out(task_id)
        return self._view(task_id)

    async def cancel(self, task_id: str) -> w.TaskView:
        record, _ = self._task(task_id)
        self._apply(m.Cancel(task_id=task_id), self.peer_id)
        await self.ledger.set_task_state(task_id, m.TaskState.CANCELLED, idempotency_key=f"task/{task_id}/cancelled")
        for bidder in {bid.bidder for bid in record.bids.values()}:
            self._spawn(self._push_quietly, bidder, w.CancelRequest(task_id=task_id))
        return self._view(task_id)
