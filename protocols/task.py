"""``/clawnode/task/1.0.0`` and task announcements: the trio adapter of the task market.

The rules live in ``protocols.machines.task`` (the pure :class:`TaskBook`); money lives in the
ledger and the escrow contract. This module only moves messages between streams, gossip, the
book, the ledger and the chain. Every node keeps its own book and applies each event it learns of
with the actor the event is authenticated as: the stream's remote peer, or the signer of an
envelope; ``SYSTEM`` for its own timers and chain confirmations.

Flow (``C`` creator, ``B`` bidder, ``A`` arbiter)::

    C publish   -> gossip TaskAnnouncement (signed, names arbiter peer + wallet) -> B Publish
    B bid       -> C PlaceBid                      (B applies it too once C accepted it)
    C award     -> lock price on chain, C Award(lock_ref) -> signed AwardNotice -> B checks the
                   lock on chain (payee, arbiter, amount, window, phase) -> B Award
    B submit    -> signed ResultNotice + artifact -> C checks sha256/size -> C SubmitResult
    C review    -> C Accept|Reject -> signed ReviewNotice -> B Accept|Reject
                   accept: ledger release of the price (settlement queue); reject: the refund
                   is queued once the book's dispute window passed and the chain is not disputed
    B|C dispute -> chain dispute, ledger open_dispute, DisputeCase -> A, DisputeRequest -> other
    A resolve   -> chain resolve (arbiter wallet), ResolutionRequest -> C and B
    close-out   -> each party watches the lock until the chain says ``closed``, then records the
                   outcome (ledger dispute resolution, a reconciling refund settlement that books
                   what the chain moved), applies Settle/Refund and closes the task.

Choices where the design was silent:

* The escrow of a task uses the ledger's lease rows (lease id = escrow id hex; creator =
  ``consumer``, bidder = ``provider``, price = budget = price per unit), so releases, refunds
  and withdrawals go through the ordinary settlement queue. The ledger row is written before the
  lock is sent (as the lease market does); a failed lock ends that row again.
* Each party closes out with a ``refund`` settlement once the chain says the lock is closed: the
  settler then sees ``closed`` and books what the chain moved (income for the bidder, spend and
  refund for the creator) without a transaction.
* The arbiter keeps no ledger rows (no money of its own moves); its book is rebuilt from the
  signed :class:`~protocols.task_wire.DisputeCase`, replaying Publish/PlaceBid/Award at the
  award's signed time, then the result, the review and the dispute.
* A party that sees the lock closed by ``resolve`` without having received the arbiter's
  resolution applies ``ResolveDispute`` for the arbiter from the chain's split (the chain only
  lets the arbiter's wallet resolve), so a lost message never blocks the close-out.
* The losing bidders are not pushed anything on award (their books keep the bid submitted until
  the deadline expires it); cancellation is pushed to every bidder.
* Task parameters are a JSON string kept by the creator (its sha256 is the announcement's
  ``params_hash``); the winning bidder receives them inside the signed award.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import PrivateKey
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr
from pydantic import BaseModel, TypeAdapter

from protocols import task_wire as w
from protocols.background import spawn_guarded
from protocols.gossip import (
    ANNOUNCEMENT_DOMAIN,
    ANNOUNCEMENT_PAYLOAD_TYPE,
    TaskAnnouncement,
    TaskAnnouncements,
    VerifiedAnnouncement,
)
from protocols.lease_wire import EscrowLock
from protocols.machines import task as m
from protocols.rpc import request, serve_requests
from protocols.signed import from_base64, open_base64, seal, to_base64
from runtime.errors import ClawnodeError, ErrorCode
from runtime.ledger import EscrowRef, Evidence, LeaseOpen, Ledger

if TYPE_CHECKING:
    from runtime.escrow import EscrowClient

log = logging.getLogger(__name__)

TASK_PROTOCOL = TProtocol("/clawnode/task/1.0.0")
READ_TIMEOUT_S = 10.0
PUSH_TIMEOUT_S = 10.0
PUSH_ATTEMPTS = 3
SWEEP_INTERVAL_S = 1.0
CLOSE_POLL_S = 0.5
LOCATED_ADDR_TTL_S = 600
# Chain time and our clock differ by a block or two; the lock must outlive deadline + review.
DEADLINE_SLACK_S = 30

_REQUESTS: TypeAdapter[Any] = TypeAdapter(w.TaskRequest)
_ACK = TypeAdapter(w.Ack)

EscrowSource = Callable[[], "EscrowClient | None"]


def _peer(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception:  # noqa: BLE001 - base58 and multihash errors alike
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "not a peer id") from None


@dataclass
class TaskLocal:
    """What the adapter keeps beside the book's record: the signed evidence and the wire details."""

    announcement: TaskAnnouncement
    announcement_env: str | None = None  # base64 of the creator-signed announcement
    params: str | None = None
    payees: dict[str, str] = field(default_factory=dict)  # bid id -> payee wallet (creator side)
    award: w.AwardNotice | None = None
    award_env: str | None = None
    result_env: str | None = None
    artifact: bytes | None = None
    review_env: str | None = None
    dispute_reason: str | None = None
    evidence: dict[str, Evidence] = field(default_factory=dict)  # evidence id -> what the parties sent
    closing: bool = False
    closed: bool = False
    refund_queued: bool = False


class TaskMarket:
    """Every role of the task market for one node; mount with ``await nursery.start(market.run)``."""

    def __init__(
        self,
        host: IHost,
        key: PrivateKey,
        ledger: Ledger,
        *,
        announcements: TaskAnnouncements,
        limits: m.RiskLimits | None = None,
        escrow: EscrowSource,
        arbiter: Callable[[], tuple[str, str] | None] = lambda: None,
        wake_settlement: Callable[[], None] = lambda: None,
        locate: Callable[[ID], Awaitable[list[str]]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.key = key
        self.peer_id = str(host.get_id())
        self.ledger = ledger
        self.announcements = announcements
        self.book = m.TaskBook(limits)
        self.escrow = escrow
        self.default_arbiter = arbiter
        self.wake_settlement = wake_settlement
        self.locate = locate
        self.clock = clock
        self.local: dict[str, TaskLocal] = {}
        self._watched: set[str] = set()
        self._nursery: trio.Nursery | None = None

    @property
    def limits(self) -> m.RiskLimits:
        return self.book.limits

    # -- mounting --

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            handler = serve_requests(self._handle, max_frame=w.MAX_TASK_FRAME, read_timeout_s=READ_TIMEOUT_S)
            self.host.set_stream_handler(TASK_PROTOCOL, handler)
            nursery.start_soon(self._sweep)
            task_status.started(self)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        spawn_guarded(self._nursery, log, fn, *args)

    async def _handle(self, frame: bytes, remote: ID) -> BaseModel:
        message = _REQUESTS.validate_json(frame)
        sender = str(remote)
        handlers: dict[type[BaseModel], Callable[[Any, str], Any]] = {
            w.BidRequest: self._on_bid,
            w.WithdrawBidRequest: self._on_withdraw_bid,
            w.AwardRequest: self._on_award,
            w.ResultRequest: self._on_result,
            w.ReviewRequest: self._on_review,
            w.DisputeCase: self._on_dispute_case,
            w.DisputeRequest: self._on_dispute,
            w.EvidenceRequest: self._on_evidence,
            w.ResolutionRequest: self._on_resolution,
            w.CancelRequest: self._on_cancel,
        }
        await handlers[type(message)](message, sender)
        return w.Ack()

    # -- helpers --

    def _now(self) -> float:
        return self.clock()

    def _apply(self, event: m.TaskEvent, actor: str) -> list[m.Effect]:
        return self.book.apply(event, actor, self._now())

    def _dry_run(self, event: m.TaskEvent, actor: str) -> list[m.Effect]:
        """Would the book take ``event``? Raises its error without changing anything."""
        return copy.deepcopy(self.book).apply(event, actor, self._now())

    def _task(self, task_id: str) -> tuple[m.TaskRecord, TaskLocal]:
        record = self.book.get(task_id)
        local = self.local.get(task_id)
        if local is None:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "unknown task")
        return record, local

    def _client(self) -> EscrowClient:
        client = self.escrow()
        if client is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "this node's escrow chain is not connected")
        return client

    def _award_of(self, local: TaskLocal) -> w.AwardNotice:
        if local.award is None:
            raise ClawnodeError(ErrorCode.CONFLICT, "the task has no award")
        return local.award

    @staticmethod
    def _lease_id(award: w.AwardNotice) -> str:
        return award.lock.escrow_id[2:]

    async def _escrow_state(self, award: w.AwardNotice) -> Any:
        client = self._client()
        return await client.chain.run(client.get, award.lock.payer, bytes.fromhex(award.lock.escrow_id[2:]))

    async def _reachable(self, peer: ID) -> None:
        """Look up the addresses of a peer we never met (the arbiter, usually) through the DHT."""
        if self.locate is None or self.host.get_network().connections.get(peer):
            return
        try:
            if self.host.get_peerstore().addrs(peer):
                return
        except Exception:  # noqa: BLE001 - py-libp2p raises its own error for an unknown peer
            pass
        addrs: list[str] = []
        with trio.move_on_after(PUSH_TIMEOUT_S):
            try:
                addrs = await self.locate(peer)
            except Exception as error:  # noqa: BLE001 - a failed lookup just leaves the dial to fail
                log.debug("could not look up %s: %s", str(peer)[:16], type(error).__name__)
        if addrs:
            self.host.get_peerstore().add_addrs(peer, [Multiaddr(a) for a in addrs], LOCATED_ADDR_TTL_S)

    async def _push(self, peer: str, message: BaseModel, *, attempts: int = 1) -> None:
        await self._reachable(_peer(peer))
        for attempt in range(attempts):
            try:
                await request(
                    self.host,
                    _peer(peer),
                    TASK_PROTOCOL,
                    message,
                    _ACK,
                    timeout_s=PUSH_TIMEOUT_S,
                    max_frame=w.MAX_TASK_FRAME,
                )
                return
            except ClawnodeError as error:
                if attempt + 1 >= attempts or error.code not in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT):
                    raise
                await trio.sleep(1.0 * (attempt + 1))

    async def _push_quietly(self, peer: str, message: BaseModel) -> None:
        try:
            await self._push(peer, message, attempts=PUSH_ATTEMPTS)
        except ClawnodeError as error:
            log.info("task message %s to %s not delivered: %s", message.__class__.__name__, peer[:16], error.code)

    # ================= announcements =================

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
        if ann.arbiter is None or ann.arbiter_wallet is None:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the announcement names no arbiter")
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

    # ================= creator =================

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
            default = self.default_arbiter()
            if default is None:
                raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "a task needs an arbiter (peer id and wallet)")
            arbiter_peer, arbiter_wallet = default
        if len(params.encode()) > w.MAX_PARAMS:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"task parameters over {w.MAX_PARAMS} bytes")
        _peer(arbiter_peer)
        client = self.escrow()
        if client is not None and client.account.address.lower() == arbiter_wallet.lower():
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the arbiter wallet cannot be this node's own wallet")
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
            ann.task_id, role="creator", counterparty=None, budget=budget, idempotency_key=f"task/{ann.task_id}"
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
        payee, arbiter_wallet = local.payees.get(bid_id), local.announcement.arbiter_wallet
        if payee is None or arbiter_wallet is None or local.announcement_env is None:
            raise ClawnodeError(ErrorCode.CONFLICT, "the bid's payee or the task's arbiter is unknown")
        client = self._client()
        if not await client.chain.run(self._can_pay, client, bid.price):
            raise ClawnodeError(ErrorCode.INSUFFICIENT_FUNDS, "this node's wallet cannot lock the price and gas")
        escrow_id = secrets.token_bytes(32)
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
            remaining = max(0, record.deadline - int(self._now()))
            deadline = chain_now + remaining + record.review_timeout_s + DEADLINE_SLACK_S
            result = await client.chain.run(
                lambda: client.lock(
                    escrow_id, payee=payee, arbiter=arbiter_wallet, amount=bid.price, deadline=deadline, window=window
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
            awarded_at=int(self._now()),
            announcement=local.announcement_env,
            params=local.params or "",
        )
        local.award = notice
        local.award_env = to_base64(seal(notice, self.key, domain=w.AWARD_DOMAIN, payload_type=w.AWARD_TYPE))
        await self.ledger.set_task_state(task_id, "task_awarded", idempotency_key=f"task/{task_id}/awarded")
        log.info("task %s awarded to %s", task_id[:12], bid.bidder[:16])
        try:
            await self._push(bid.bidder, w.AwardRequest(envelope=local.award_env), attempts=PUSH_ATTEMPTS)
        except ClawnodeError as error:
            # The award stands (the money is locked); the bidder cannot deliver without it, and the
            # book lets the creator revoke after the deadline.
            log.warning("the award of %s did not reach the bidder: %s", task_id[:12], error.code)
        return self._view(task_id)

    @staticmethod
    def _can_pay(client: EscrowClient, amount: int) -> bool:
        """Whether the wallet holds the price and the lock's gas (some chains refuse without a reason)."""
        from runtime.escrow.client import GAS_LIMITS  # here: web3 is slow to import, and only the chain needs it

        with client.chain.lock:
            w3 = client.chain.w3
            balance = int(w3.eth.get_balance(client.account.address))
            return balance >= amount + GAS_LIMITS["lock"] * int(w3.eth.gas_price)

    async def _on_result(self, message: w.ResultRequest, remote: str) -> None:
        signer, payload = open_base64(message.envelope, domain=w.RESULT_DOMAIN, payload_type=w.RESULT_TYPE)
        if signer != remote:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the result is signed by another peer than the sender")
        notice = w.ResultNotice.model_validate_json(payload)
        if notice.bidder != remote:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the result names another bidder")
        _, local = self._task(notice.task_id)
        artifact = from_base64(message.artifact)
        if len(artifact) > w.MAX_ARTIFACT:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"artifacts are at most {w.MAX_ARTIFACT} bytes")
        if len(artifact) != notice.size or hashlib.sha256(artifact).hexdigest() != notice.content_hash:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the artifact does not match its signed hash and size")
        self._apply(m.SubmitResult(task_id=notice.task_id, content_hash=notice.content_hash, size=notice.size), remote)
        local.result_env, local.artifact = message.envelope, artifact
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
        await self.ledger.set_task_state(task_id, "task_cancelled", idempotency_key=f"task/{task_id}/cancelled")
        for bidder in {bid.bidder for bid in record.bids.values()}:
            self._spawn(self._push_quietly, bidder, w.CancelRequest(task_id=task_id))
        return self._view(task_id)

    # ================= bidder =================

    async def bid(self, task_id: str, price: int) -> w.BidView:
        """Bid ``price`` (wei) on an announced task; the payee is this node's wallet."""
        record, _ = self._task(task_id)
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
        if signer != remote or notice.creator != remote:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the award is not signed by its sender")
        if notice.bidder != self.peer_id:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the award is made out to another bidder")
        ann_signer, ann_payload = open_base64(
            notice.announcement, domain=ANNOUNCEMENT_DOMAIN, payload_type=ANNOUNCEMENT_PAYLOAD_TYPE
        )
        ann = TaskAnnouncement.model_validate_json(ann_payload)
        if ann_signer != remote or ann.task_id != notice.task_id or ann.arbiter_wallet != notice.arbiter_wallet:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the award does not match the creator's announcement")
        record, local = self._task(notice.task_id)
        local.announcement_env = notice.announcement
        bid = record.bids.get(notice.bid_id)
        if bid is None or bid.bidder != self.peer_id or bid.price != notice.price:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "no such bid of ours")
        await self._check_lock(notice, record)
        self._apply(m.Award(task_id=notice.task_id, bid_id=notice.bid_id, lock_ref=notice.lock.escrow_id), remote)
        local.award, local.award_env, local.params = notice, message.envelope, notice.params
        lease_id = self._lease_id(notice)
        await self.ledger.create_task(
            notice.task_id,
            role="worker",
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
            notice.task_id, "task_awarded", idempotency_key=f"task/{notice.task_id}/awarded"
        )
        log.info("task %s: award accepted, %d wei locked", notice.task_id[:12], notice.price)

    async def _check_lock(self, notice: w.AwardNotice, record: m.TaskRecord) -> None:
        client = self._client()
        if client.chain.chain_id != notice.chain_id or client.address.lower() != notice.contract.lower():
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "the award's escrow is on another chain or contract")
        if notice.payee.lower() != client.account.address.lower():
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the award pays another wallet than ours")
        state = await self._escrow_state(notice)
        if state.phase != "active":
            raise ClawnodeError(ErrorCode.INSUFFICIENT_FUNDS, "no active escrow lock was found for this award")
        if state.payee.lower() != notice.payee.lower() or state.arbiter.lower() != notice.arbiter_wallet.lower():
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the escrow lock names another payee or arbiter")
        if state.amount - state.released < notice.price:
            raise ClawnodeError(ErrorCode.INSUFFICIENT_FUNDS, "the escrow lock holds less than the price")
        if state.window != self.limits.dispute_window_s:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the escrow lock's dispute window is not ours")
        chain_now = await client.chain.run(client.chain.now)
        if state.deadline < chain_now + max(0, record.deadline - int(self._now())) + record.review_timeout_s:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the escrow lock ends before the review would")

    async def submit(self, task_id: str, artifact: bytes) -> w.TaskView:
        """Deliver the result of an awarded task; the creator's book refuses anyone but the awarded bidder."""
        if len(artifact) > w.MAX_ARTIFACT:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"artifacts are at most {w.MAX_ARTIFACT} bytes")
        record, local = self._task(task_id)
        notice = w.ResultNotice(
            task_id=task_id,
            bidder=self.peer_id,
            content_hash=hashlib.sha256(artifact).hexdigest(),
            size=len(artifact),
            submitted_at=int(self._now()),
        )
        envelope = to_base64(seal(notice, self.key, domain=w.RESULT_DOMAIN, payload_type=w.RESULT_TYPE))
        await self._push(record.creator, w.ResultRequest(envelope=envelope, artifact=to_base64(artifact)))
        self._apply(m.SubmitResult(task_id=task_id, content_hash=notice.content_hash, size=notice.size), self.peer_id)
        local.result_env = envelope
        return self._view(task_id)

    async def _on_review(self, message: w.ReviewRequest, remote: str) -> None:
        signer, payload = open_base64(message.envelope, domain=w.REVIEW_DOMAIN, payload_type=w.REVIEW_TYPE)
        notice = w.ReviewNotice.model_validate_json(payload)
        if signer != remote or notice.creator != remote:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the review is not signed by its sender")
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

    # ================= disputes =================

    async def dispute(self, task_id: str, reason: str = "") -> w.TaskView:
        """Freeze the escrow on chain and take the case to the task's arbiter (creator or awarded bidder)."""
        record, local = self._task(task_id)
        award = self._award_of(local)
        effects = self._dry_run(m.OpenDispute(task_id=task_id), self.peer_id)
        if any(isinstance(e, m.DisputeOpened) and e.merged for e in effects):
            return self._view(task_id)
        if local.announcement_env is None or local.award_env is None or local.result_env is None:
            raise ClawnodeError(ErrorCode.CONFLICT, "the signed evidence for this task is incomplete")
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
        await self._push(record.arbiter, case, attempts=PUSH_ATTEMPTS)
        self._start_close_out(task_id)
        log.info("task %s disputed", task_id[:12])
        return self._view(task_id)

    async def _on_dispute(self, message: w.DisputeRequest, remote: str) -> None:
        record, local = self._task(message.task_id)
        award = self._award_of(local)
        if remote not in (record.creator, award.bidder) or remote == self.peer_id:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "only the other party may dispute this task")
        state = await self._escrow_state(award)
        if state.phase != "disputed":
            raise ClawnodeError(ErrorCode.CONFLICT, "the escrow is not disputed on chain")
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
        if len(attachment) > w.MAX_EVIDENCE_ATTACHMENT:
            raise ClawnodeError(
                ErrorCode.INVALID_ARGUMENT, f"evidence attachments are at most {w.MAX_EVIDENCE_ATTACHMENT} bytes"
            )
        if len(note) > w.MAX_EVIDENCE_NOTE:
            raise ClawnodeError(
                ErrorCode.INVALID_ARGUMENT, f"evidence notes are at most {w.MAX_EVIDENCE_NOTE} characters"
            )
        if not note.strip() and not attachment:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "evidence needs a note or an attachment")
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
        await self._push(record.arbiter, request, attempts=PUSH_ATTEMPTS)
        log.info("task %s: evidence %s sent to the arbiter", task_id[:12], notice.evidence_id[:12])
        return self._view(task_id)

    async def evidence_attachment(self, task_id: str, evidence_id: str) -> bytes:
        self._task(task_id)
        return await self.ledger.evidence_attachment(task_id, evidence_id)

    async def _on_evidence(self, message: w.EvidenceRequest, remote: str) -> None:
        """As the arbiter or the other party: check the signature and the attachment, then keep it."""
        signer, payload = open_base64(message.envelope, domain=w.EVIDENCE_DOMAIN, payload_type=w.EVIDENCE_TYPE)
        notice = w.EvidenceNotice.model_validate_json(payload)
        if signer != remote or notice.party != remote:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the evidence is not signed by its sender")
        attachment = from_base64(message.attachment) if message.attachment else b""
        if hashlib.sha256(attachment).hexdigest() != notice.content_hash or len(attachment) != notice.size:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the attachment does not match the signed hash")
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
        if case.review is not None:
            review_signer, review_payload = open_base64(case.review, domain=w.REVIEW_DOMAIN, payload_type=w.REVIEW_TYPE)
            review = w.ReviewNotice.model_validate_json(review_payload)
            if review_signer != ann.creator or review.task_id != ann.task_id:
                raise ClawnodeError(ErrorCode.FORBIDDEN, "the review is not the creator's")
        if ann_signer != ann.creator or award_signer != ann.creator or award.creator != ann.creator:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the announcement and award must be signed by the creator")
        if result_signer != award.bidder or result.bidder != award.bidder:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the result must be signed by the awarded bidder")
        if not (ann.task_id == award.task_id == result.task_id == case.task_id):
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the evidence is about different tasks")
        if ann.arbiter != self.peer_id or ann.arbiter_wallet != award.arbiter_wallet:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "this node is not the task's arbiter")
        if remote not in (ann.creator, award.bidder):
            raise ClawnodeError(ErrorCode.FORBIDDEN, "only a party to the task may bring a dispute")
        client = self._client()
        if client.account.address.lower() != award.arbiter_wallet.lower():
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the task names another arbiter wallet than this node's")
        state = await self._escrow_state(award)
        if state.phase != "disputed" or state.arbiter.lower() != client.account.address.lower():
            raise ClawnodeError(ErrorCode.CONFLICT, "the escrow is not disputed on chain with this arbiter")
        if state.payee.lower() != award.payee.lower() or state.amount != award.price:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the escrow lock does not match the award")
        self._replay_case(ann, award, result, review, case, remote)

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

    async def resolve(self, task_id: str, to_bidder: int) -> w.TaskView:
        """As the arbiter: split the disputed price on chain, ``to_bidder`` to the bidder, the rest back."""
        record, local = self._task(task_id)
        price = record.award.price if record.award is not None else 0
        event = m.ResolveDispute(task_id=task_id, to_bidder=to_bidder, to_creator=price - to_bidder)
        self._dry_run(event, self.peer_id)
        award = self._award_of(local)
        client = self._client()
        if client.account.address.lower() != award.arbiter_wallet.lower():
            raise ClawnodeError(ErrorCode.FORBIDDEN, "this node's wallet is not the task's arbiter wallet")
        escrow_id = bytes.fromhex(award.lock.escrow_id[2:])
        state = await self._escrow_state(award)
        tx_hash: str | None = None
        if state.phase == "disputed":
            result = await client.chain.run(client.resolve, award.lock.payer, escrow_id, to_bidder)
            tx_hash = result.tx_hash
        elif state.phase != "closed" or state.released != to_bidder:
            raise ClawnodeError(ErrorCode.CONFLICT, "the escrow is not disputed on chain")
        self._apply(event, self.peer_id)
        message = w.ResolutionRequest(
            task_id=task_id, to_bidder=to_bidder, to_creator=price - to_bidder, tx_hash=tx_hash
        )
        async with trio.open_nursery() as nursery:
            for party in (record.creator, award.bidder):
                nursery.start_soon(self._push_quietly, party, message)
        log.info("task %s resolved: %d to the bidder, %d back", task_id[:12], to_bidder, price - to_bidder)
        return self._view(task_id)

    async def _on_resolution(self, message: w.ResolutionRequest, remote: str) -> None:
        record, local = self._task(message.task_id)
        award = self._award_of(local)
        if remote != record.arbiter:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "only the task's arbiter resolves its dispute")
        state = await self._escrow_state(award)
        if state.phase != "closed" or state.released != message.to_bidder:
            raise ClawnodeError(ErrorCode.CONFLICT, "the chain does not show this resolution")
        self._record_resolution(record, message.to_bidder, message.to_creator)
        self._start_close_out(message.task_id)

    def _record_resolution(self, record: m.TaskRecord, to_bidder: int, to_creator: int) -> None:
        if record.dispute is not None and record.dispute.state == m.DisputeState.OPEN:
            self._apply(
                m.ResolveDispute(task_id=record.task_id, to_bidder=to_bidder, to_creator=to_creator), record.arbiter
            )

    # ================= close-out =================

    def _start_close_out(self, task_id: str) -> None:
        local = self.local.get(task_id)
        if local is None or local.closing or local.closed:
            return
        local.closing = True
        self._spawn(self._close_out, task_id)

    async def _close_out(self, task_id: str) -> None:
        """Wait for the lock to close on chain, then book it: ledger first, then the book, then the task row."""
        record, local = self._task(task_id)
        award = self._award_of(local)
        try:
            while True:
                try:
                    state = await self._escrow_state(award)
                    if state.phase == "closed":
                        break
                    if state.phase == "active":
                        await self._maybe_queue_refund(record, local)
                except ClawnodeError as error:
                    log.debug("task %s close-out waits: %s", task_id[:12], error.code)
                await trio.sleep(CLOSE_POLL_S)
            lease_id = self._lease_id(award)
            to_bidder, to_creator = state.released, state.amount - state.released
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
                local.closed = True  # the arbiter: no ledger rows, nothing to settle
                return
            # The settler sees the lock closed and books what the chain moved, without a transaction.
            await self.ledger.enqueue_refund(lease_id)
            self.wake_settlement()
            while True:
                receipt = record.receipt
                if receipt is None or receipt.state in (m.ReceiptState.SETTLED, m.ReceiptState.REFUNDED):
                    break
                ev: m.TaskEvent = (
                    m.Settle(task_id=task_id, settlement_id=award.lock.escrow_id)
                    if to_bidder > 0
                    else m.Refund(task_id=task_id, settlement_id=award.lock.escrow_id)
                )
                try:
                    self._apply(ev, m.SYSTEM)
                    break
                except ClawnodeError as error:
                    # Not decided yet (a resolution on its way) or the book's dispute window still runs.
                    log.debug("task %s settle waits: %s", task_id[:12], error.message)
                await trio.sleep(CLOSE_POLL_S)
            await self.ledger.set_task_state(task_id, "task_closed", idempotency_key=f"task/{task_id}/closed")
            local.closed = True
            log.info("task %s closed: %d to the bidder, %d back", task_id[:12], to_bidder, to_creator)
        finally:
            local.closing = False

    async def _maybe_queue_refund(self, record: m.TaskRecord, local: TaskLocal) -> None:
        """As the creator: queue a decided refund once the book's dispute window has passed."""
        receipt = record.receipt
        if (
            record.creator != self.peer_id
            or local.refund_queued
            or receipt is None
            or receipt.state != m.ReceiptState.PENDING
            or receipt.to_creator is None
            or receipt.to_creator == 0
            or self._now() < receipt.not_before
        ):
            return
        award = self._award_of(local)
        await self.ledger.enqueue_refund(self._lease_id(award))
        local.refund_queued = True
        self.wake_settlement()

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
                            functools.partial(self.ledger.set_task_state, idempotency_key=key), task_id, "task_expired"
                        )

    def _forget_finished(self, now: float) -> None:
        """Finished tasks leave memory after ``TASK_FINISHED_KEEP_S`` or beyond the newest
        ``TASK_FINISHED_KEEP`` (the book decides); a message about one later is ``E_NOT_FOUND``."""
        busy = frozenset(task_id for task_id, local in self.local.items() if local.closing)
        for task_id in self.book.forget_finished(now, busy):
            self.local.pop(task_id, None)

    # ================= views =================

    def _bid_view(self, task_id: str, bid: m.BidRecord) -> w.BidView:
        return w.BidView(
            task_id=task_id,
            bid_id=bid.bid_id,
            bidder=bid.bidder,
            price=bid.price,
            asset=bid.asset,
            state=str(bid.state),
        )

    def _view(self, task_id: str) -> w.TaskView:
        record, local = self._task(task_id)
        ann = local.announcement
        me = self.peer_id
        role: Any = "observer"
        if me == record.creator:
            role = "creator"
        elif me == record.arbiter:
            role = "arbiter"
        elif record.award is not None and record.award.bidder == me:
            role = "awarded_bidder"
        elif any(bid.bidder == me for bid in record.bids.values()):
            role = "bidder"
        receipt, result, dispute = record.receipt, record.result, record.dispute
        return w.TaskView(
            task_id=task_id,
            role=role,
            creator=record.creator,
            capability=ann.capability,
            summary=ann.summary,
            budget=record.budget,
            deadline=record.deadline,
            review_timeout_s=record.review_timeout_s,
            arbiter=record.arbiter,
            arbiter_wallet=ann.arbiter_wallet,
            state=str(record.state),
            bids=[self._bid_view(task_id, bid) for bid in record.bids.values()],
            awarded_bid=record.award.bid_id if record.award else None,
            awarded_bidder=record.award.bidder if record.award else None,
            price=record.award.price if record.award else None,
            escrow_id=record.award.lock_ref if record.award else None,
            result_hash=result.content_hash if result else None,
            result_size=result.size if result else None,
            result_state=str(result.state) if result else None,
            receipt_state=str(receipt.state) if receipt else None,
            dispute_state=str(dispute.state) if dispute else None,
            evidence=sorted(local.evidence.values(), key=lambda e: (e.submitted_at, e.evidence_id)),
            to_bidder=receipt.to_bidder if receipt else None,
            to_creator=receipt.to_creator if receipt else None,
        )

    def view(self, task_id: str) -> w.TaskView:
        return self._view(task_id)

    def tasks(self) -> list[w.TaskView]:
        """Every task this node knows: its own, the announced ones it watches, the ones it arbitrates
        (live ones and those finished lately; the ledger keeps our own for good)."""
        return sorted((self._view(t) for t in self.book.tasks if t in self.local), key=lambda v: v.task_id)
