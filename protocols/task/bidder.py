"""The bidder's side of the task market: watch announcements, bid, take an award (after checking its
lock on chain), deliver, hear the review. The rules: ``TaskBook`` and ``task_checks.announcement_verdict``,
``award_verdict``, ``award_lock_verdict`` (the escrow-lock check the lease market shares),
``review_verdict``; an award's lock is claimed first in the node's one escrow claim table
(``protocols.escrow_claims``, shared with the lease market)."""

from __future__ import annotations

import hashlib
import secrets

import trio
from libp2p.peer.id import ID

from protocols import task_wire as w
from protocols.confirmed import confirmed_lock
from protocols.gossip import ANNOUNCEMENT_DOMAIN, ANNOUNCEMENT_PAYLOAD_TYPE, TaskAnnouncement, VerifiedAnnouncement
from protocols.machines import task as m
from protocols.machines import task_checks as checks
from protocols.machines.verdict import enforce
from protocols.task.base import TaskCore, TaskLocal, log
from runtime.errors import ClawnodeError
from runtime.ledger import EscrowRef, LeaseOpen
from runtime.ledger.channels import escrow_recorded
from wire.signed import open_base64, seal, to_base64


class BidderRole(TaskCore):
    async def watch(self, capability: str) -> None:
        """Receive (and relay) announcements of tasks needing ``capability``; each one is published in the book."""
        if capability in self._watched:
            return
        channel = await self.announcements.subscribe(capability)
        self._watched.add(capability)
        self._spawn(self._pump, channel)

    async def _pump(self, channel: trio.MemoryReceiveChannel[VerifiedAnnouncement]) -> None:
        async for item in channel:
            try:
                self._on_announcement(item.signer, item.announcement)
            except ClawnodeError as error:
                log.debug("announcement %s ignored: %s", item.announcement.task_id[:12], error.code)

    def _on_announcement(self, signer: str, ann: TaskAnnouncement, envelope: str | None = None) -> None:
        if signer == self.peer_id or ann.task_id in self.book.tasks:
            return
        enforce(
            checks.announcement_verdict(
                ann.arbiter is not None and ann.arbiter_wallet is not None, len(self.book.tasks)
            )
        )
        assert ann.arbiter is not None
        self._apply(
            m.Publish(
                task_id=ann.task_id,
                budget=ann.budget,
                deadline=ann.deadline,
                allowed_assets=frozenset({ann.asset}),
                arbiter=ann.arbiter,
                review_timeout_s=ann.review_timeout_s,
            ),
            signer,
        )
        self.local[ann.task_id] = TaskLocal(ann, announcement_env=envelope)

    async def bid(self, task_id: str, price: int) -> w.BidView:
        """Bid ``price`` (wei) on an announced task; the payee is this node's wallet. A task whose announced
        single arbiter this node's award check would refuse is refused first (``bid_arbiter_verdict``)."""
        record, _ = self._task(task_id)
        self._check_bid_arbiter(task_id)
        bid_id = secrets.token_hex(8)
        event = m.PlaceBid(task_id=task_id, bid_id=bid_id, price=price, asset="ETH")
        self._dry_run(event, self.peer_id)
        client = self._client()
        await self._push(
            record.creator,
            w.BidRequest(task_id=task_id, bid_id=bid_id, price=price, payee=client.account.address),
        )
        self._apply(event, self.peer_id)
        return self._bid_view(task_id, record.bids[bid_id])

    def _check_bid_arbiter(self, task_id: str) -> None:
        """Refuse to bid on a task announced under a single arbiter whose award this node would refuse."""
        _, local = self._task(task_id)
        ann = local.announcement
        own_wallet, trusted = self._arbiter_trust()
        enforce(checks.bid_arbiter_verdict(ann.arbiter or "", ann.arbiter_wallet or "", own_wallet, trusted))

    def _arbiter_trust(self) -> tuple[str | None, tuple[tuple[str, str], ...]]:
        """This node's own arbiter wallet (None: none known) and the (peer id, wallet) pairs it trusts to
        arbitrate a task, alone or on a panel: its own arbiter's (escrow.arbiter_peer with escrow.arbiter,
        when both are known; on mode auto, the network profile's pair) and those of escrow.trusted_arbiters."""
        own_terms = self.escrow_terms()
        own_arbiter = () if (pair := self.default_arbiter()) is None else (pair,)
        return (None if own_terms is None else own_terms.arbiter), (*own_arbiter, *self.trusted_arbiters)

    async def withdraw_bid(self, task_id: str, bid_id: str) -> w.BidView:
        record, _ = self._task(task_id)
        event = m.WithdrawBid(task_id=task_id, bid_id=bid_id)
        self._dry_run(event, self.peer_id)
        await self._push(record.creator, w.WithdrawBidRequest(task_id=task_id, bid_id=bid_id))
        self._apply(event, self.peer_id)
        return self._bid_view(task_id, record.bids[bid_id])

    async def _on_award(self, message: w.AwardRequest, remote: str) -> None:
        signer, payload = open_base64(message.envelope, domain=w.AWARD_DOMAIN, payload_type=w.AWARD_TYPE)
        notice = w.AwardNotice.model_validate_json(payload)
        ann_signer, ann_payload = open_base64(
            notice.announcement, domain=ANNOUNCEMENT_DOMAIN, payload_type=ANNOUNCEMENT_PAYLOAD_TYPE
        )
        ann = TaskAnnouncement.model_validate_json(ann_payload)
        facts = checks.AwardFacts(
            remote=remote,
            me=self.peer_id,
            signer=signer,
            creator=notice.creator,
            bidder=notice.bidder,
            task_id=notice.task_id,
            arbiter_wallet=notice.arbiter_wallet,
            price=notice.price,
            announcement_signer=ann_signer,
            announcement_task_id=ann.task_id,
            announcement_arbiter_wallet=ann.arbiter_wallet,
        )
        enforce(checks.award_verdict(facts))  # the envelopes first: a stranger learns nothing of our tasks
        # The lock must be the creator's own (its id derived from the creator's peer id and the award's salt),
        # asked before the claim and any read: a lock of someone else's paying us (a buyer's lease lock) is
        # refused at once, holding no claim that would refuse that buyer's own open.
        creator_bytes = ID.from_base58(notice.creator).to_bytes()
        enforce(checks.award_lock_bound_verdict(creator_bytes, notice.salt, notice.lock.escrow_id))
        record, local = self._task(notice.task_id)
        bid = record.bids.get(notice.bid_id)
        enforce(
            checks.award_bid_verdict(
                self.peer_id, notice.price, bid.bidder if bid else None, bid.price if bid else None
            )
        )
        enforce(checks.award_params_verdict(local.announcement.params_hash, notice.params))
        local.announcement_env = notice.announcement
        lease_id, escrow_id = self._lease_id(notice), notice.lock.escrow_id
        ours = record.award is not None and record.award.lock_ref == escrow_id  # sent again: the book says
        # Claimed before any read, in the node's one claim table: two awards naming one lock at once, or an
        # award and a lease or channel open of the lease market naming it, each read the ledger before the
        # other's row was written, and one lock paid twice. A second one naming it waits for none: refused
        # ``lock_of_another_task`` (``lease_provider.escrow_claim_verdict``).
        self.escrow_claims.claim(escrow_id, "task", notice.task_id)
        try:
            enforce(checks.award_lock_free_verdict(not ours and await self._lease_known(lease_id)))
            await self._accept_award(notice, message.envelope, record, local, remote, lease_id)
        finally:
            # Checked: refused, or the task's lease row is written under the escrow (the ledger refuses the rest).
            self.escrow_claims.dropped(escrow_id, notice.task_id, checking_only=True)
        self._after_award(notice.task_id)

    async def _lease_known(self, lease_id: str) -> bool:
        """Does our ledger hold a lease (a task's, or the lease market's) or a payment channel under this escrow?"""
        escrow_id = "0x" + lease_id
        return await escrow_recorded(self.ledger, escrow_id, "lease") or await escrow_recorded(
            self.ledger, escrow_id, "channel"
        )

    async def _accept_award(
        self,
        notice: w.AwardNotice,
        envelope: str,
        record: m.TaskRecord,
        local: TaskLocal,
        remote: str,
        lease_id: str,
    ) -> None:
        await self._check_award_lock(notice, record)
        self._apply(m.Award(task_id=notice.task_id, bid_id=notice.bid_id, lock_ref=notice.lock.escrow_id), remote)
        local.award, local.award_env, local.params = notice, envelope, notice.params
        await self.ledger.create_task(
            notice.task_id,
            role=m.BIDDER,
            counterparty=remote,
            budget=notice.price,
            idempotency_key=f"task/{notice.task_id}",
        )
        await self.ledger.open_lease(
            LeaseOpen(
                lease_id=lease_id,
                role="provider",
                provider=self.peer_id,
                consumer=remote,
                price_per_unit=notice.price,
                budget=notice.price,
                escrow=EscrowRef(contract=notice.contract, payer=notice.lock.payer, escrow_id=notice.lock.escrow_id),
            ),
            idempotency_key=f"award/{lease_id}",
        )
        await self.ledger.set_task_state(
            notice.task_id, m.TaskState.AWARDED, idempotency_key=f"task/{notice.task_id}/awarded"
        )
        log.info("task %s: award accepted, %d wei locked", notice.task_id[:12], notice.price)

    async def _check_award_lock(self, notice: w.AwardNotice, record: m.TaskRecord) -> None:
        """Fetch the lock and the chain's clock, then ask ``task_checks.award_lock_verdict``."""
        client = self._client()
        ours = client.chain.chain_id == notice.chain_id and client.address.lower() == notice.contract.lower()
        lock, chain_now, threshold = None, 0, 0
        if ours:
            raw = await confirmed_lock(client, notice.lock.payer, bytes.fromhex(notice.lock.escrow_id[2:]))
            lock, threshold = self._lock_state(raw), raw.threshold
            chain_now = await client.chain.run(client.chain.now)
        panel = w.panel_terms(notice.params)
        own_wallet, trusted = self._arbiter_trust()
        enforce(
            checks.award_lock_verdict(
                checks.AwardLockFacts(
                    our_chain_id=client.chain.chain_id,
                    award_chain_id=notice.chain_id,
                    our_contract=client.address,
                    award_contract=notice.contract,
                    our_wallet=client.account.address,
                    payee=notice.payee,
                    arbiter_wallet=notice.arbiter_wallet,
                    price=notice.price,
                    window=self.limits.dispute_window_s,
                    lasts_until=checks.lock_lasts_until(
                        chain_now, record.deadline, self._now(), record.review_timeout_s
                    ),
                    lock=lock,
                    trusted_arbiter=own_wallet,
                    lock_threshold=threshold,
                    panel_named=panel is not None,
                    panel_members=() if panel is None else tuple((seat.peer, seat.wallet) for seat in panel.members),
                    panel_threshold=0 if panel is None else panel.threshold,
                    trusted_members=trusted,
                    arbiter_peer=record.arbiter,  # the announcement's: a dispute's case goes to this peer
                )
            )
        )
        if panel is not None:
            await self._check_panel_lock(notice, panel, record.creator)

    async def submit(self, task_id: str, artifact: bytes, usage: w.RunUsage | None = None) -> w.TaskView:
        """Deliver the result of an awarded task; the creator's book refuses anyone but the awarded bidder."""
        enforce(checks.artifact_verdict(len(artifact)))
        record, local = self._task(task_id)
        notice = w.ResultNotice(
            task_id=task_id,
            bidder=self.peer_id,
            content_hash=hashlib.sha256(artifact).hexdigest(),
            size=len(artifact),
            submitted_at=int(self._now()),
            usage=usage,
        )
        envelope = to_base64(seal(notice, self.key, domain=w.RESULT_DOMAIN, payload_type=w.RESULT_TYPE))
        await self._push(record.creator, w.ResultRequest(envelope=envelope, artifact=to_base64(artifact)))
        self._apply(m.SubmitResult(task_id=task_id, content_hash=notice.content_hash, size=notice.size), self.peer_id)
        local.result_env, local.result_usage = envelope, usage
        return self._view(task_id)

    async def _on_review(self, message: w.ReviewRequest, remote: str) -> None:
        signer, payload = open_base64(message.envelope, domain=w.REVIEW_DOMAIN, payload_type=w.REVIEW_TYPE)
        notice = w.ReviewNotice.model_validate_json(payload)
        enforce(checks.review_verdict(signer, remote, notice.creator))
        _, local = self._task(notice.task_id)
        event: m.TaskEvent = (
            m.Accept(task_id=notice.task_id)
            if notice.verdict == "accepted"
            else m.Reject(task_id=notice.task_id, reason=notice.reason)
        )
        self._apply(event, remote)
        local.review_env = message.envelope
        self._start_close_out(notice.task_id)

    async def _on_cancel(self, message: w.CancelRequest, remote: str) -> None:
        self._apply(m.Cancel(task_id=message.task_id), remote)
