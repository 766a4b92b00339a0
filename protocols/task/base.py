"""What every role of the task market shares: the book, the local evidence, the chain, pushes, views.

:class:`TaskCore` holds the state; the role mixins (``creator``, ``bidder``, ``dispute``, ``arbiter``,
``closeout``) add what each role does, and ``handler.TaskMarket`` joins them and dispatches the
protocol's requests. Nothing here decides: the rules are in ``protocols.machines.task`` (the book)
and ``protocols.machines.task_checks`` (what the adapter fetched).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
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
from protocols.escrow_claims import EscrowClaims
from protocols.gossip import TaskAnnouncement, TaskAnnouncements
from protocols.lease_wire import EscrowTerms
from protocols.machines import task as m
from protocols.machines import task_checks as checks
from protocols.machines.escrow_lock import LockState
from protocols.machines.verdict import enforce
from runtime.errors import ClawnodeError, ErrorCode
from runtime.ledger import Evidence, Ledger
from runtime.sandbox import Sandboxes
from wire.rpc import request
from wire.signed import from_base64, open_base64

if TYPE_CHECKING:
    from runtime.escrow import EscrowClient

log = logging.getLogger("protocols.task")

TASK_PROTOCOL = TProtocol("/clawnode/task/1.0.0")
READ_TIMEOUT_S = 10.0
PUSH_TIMEOUT_S = 10.0
PUSH_ATTEMPTS = 3
SWEEP_INTERVAL_S = 1.0
LOCATED_ADDR_TTL_S = 600

_ACK = TypeAdapter(w.Ack)

EscrowSource = Callable[[], "EscrowClient | None"]


def parse_peer(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except Exception:  # noqa: BLE001 - base58 and multihash errors alike
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "not a peer id") from None


def peer_id_valid(peer_id: str) -> bool:
    try:
        parse_peer(peer_id)
    except ClawnodeError:
        return False
    return True


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
    module: bytes | None = None  # a sandboxed task's module, held to serve its seller and arbiter
    result_usage: w.RunUsage | None = None  # the seller's signed usage of a sandboxed run
    run_verdict: str | None = None  # the arbiter's automatic decision, or why a person must decide
    run_evidence: tuple[str, bytes] | None = None  # the arbiter's signed re-run record and its output
    rerunning: bool = False  # the arbiter's re-run is under way (a case sent again starts no second one)
    votes: dict[str, tuple[w.VoteNotice, str]] = field(default_factory=dict)  # panel member -> its vote, envelope
    panel_sent: bool = False  # this panel member sent the decided split on chain (or saw it there)
    closing: bool = False
    closed: bool = False
    refund_queued: bool = False
    silence_tried_at: float = 0.0  # the seller last disputed the creator's silence past the review timeout
    revoke_retry_at: float = 0.0  # a no-show revoke the book refused is not tried again before this
    revoke_wait_s: float = 0.0  # the wait after its last refusal (``task_checks.next_revoke_wait``)
    wake: trio.Event = field(default_factory=trio.Event)  # set when news may move the close-out


class TaskCore:
    """The shared state and plumbing of the task market's roles."""

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
        escrow_terms: Callable[[], EscrowTerms | None] = lambda: None,
        trusted_arbiters: Sequence[tuple[str, str]] = (),
        wake_settlement: Callable[[], None] = lambda: None,
        locate: Callable[[ID], Awaitable[list[str]]] | None = None,
        clock: Callable[[], float] = time.time,
        sandbox: Sandboxes | None = None,
        models: Any = None,
        escrow_claims: EscrowClaims | None = None,
    ) -> None:
        self.host = host
        self.key = key
        self.peer_id = str(host.get_id())
        self.ledger = ledger
        self.announcements = announcements
        self.book = m.TaskBook(limits)
        self.escrow = escrow
        self.default_arbiter = arbiter
        # This node's own escrow terms (the daemon's ``_escrow_terms``): as a seller, their arbiter is the
        # only single arbiter an award's lock may name; None trusts no arbiter and refuses every award.
        self.escrow_terms = escrow_terms
        # More arbiters than our own this node trusts on a panel, as (peer id, wallet) pairs
        # (``escrow.trusted_arbiters``): an award whose panel fewer than m trusted members decide, or m untrusted
        # ones could, is refused (``task_checks.panel_trust_verdict``).
        self.trusted_arbiters = tuple(trusted_arbiters)
        self.wake_settlement = wake_settlement
        self.locate = locate
        self.clock = clock
        self.sandbox = sandbox if sandbox is not None else Sandboxes()
        self.task_models = models  # a runtime.inference.models.ModelHost: the models inference tasks run on
        self.local: dict[str, TaskLocal] = {}
        self._watched: set[str] = set()
        # The node's one claim table on escrow ids, shared with its lease market (``protocols.escrow_claims``):
        # a seller claims an award's lock there before reading the chain or the ledger.
        self.escrow_claims = escrow_claims if escrow_claims is not None else EscrowClaims()
        self._nursery: trio.Nursery | None = None

    @property
    def limits(self) -> m.RiskLimits:
        return self.book.limits

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        spawn_guarded(self._nursery, log, fn, *args)

    def _now(self) -> float:
        return self.clock()

    def _apply(self, event: m.TaskEvent, actor: str) -> list[m.Effect]:
        effects = self.book.apply(event, actor, self._now())
        self._wake(event.task_id)
        return effects

    def _dry_run(self, event: m.TaskEvent, actor: str) -> list[m.Effect]:
        """Would the book take ``event``? Raises its error without changing anything."""
        return self.book.dry_run(event, actor, self._now())

    def _wake(self, task_id: str) -> None:
        """Something happened to ``task_id``: a waiting close-out looks again now."""
        local = self.local.get(task_id)
        if local is not None:
            local.wake.set()

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

    @staticmethod
    def _lock_state(state: Any) -> LockState:
        return LockState(
            state.phase, state.payee, state.arbiter, state.amount, state.released, state.deadline, state.window
        )

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
        await self._reachable(parse_peer(peer))
        for attempt in range(attempts):
            try:
                await request(
                    self.host,
                    parse_peer(peer),
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

    # -- shared by the roles (defined where they belong) --

    def _start_close_out(self, task_id: str) -> None:
        local = self.local.get(task_id)
        if local is None or local.closing or local.closed:
            return
        local.closing = True
        self._spawn(self._close_out, task_id)

    async def _close_out(self, task_id: str) -> None:
        raise NotImplementedError  # closeout.CloseOutRole

    async def dispute(self, task_id: str, reason: str = "") -> w.TaskView:
        raise NotImplementedError  # dispute.DisputeRole

    async def _keep_run_evidence(self, notice: w.EvidenceNotice, envelope: str, attachment: bytes) -> None:
        """The arbiter's re-run record: beside the parties' evidence in the view and the ledger (the book
        takes evidence from the parties only, so it is not applied there)."""
        local = self.local.get(notice.task_id)
        piece = Evidence(
            task_id=notice.task_id,
            evidence_id=notice.evidence_id,
            submitted_by=notice.party,
            note=notice.note,
            content_hash=notice.content_hash,
            size=notice.size,
            submitted_at=notice.submitted_at,
        )
        kept = await self.ledger.list_evidence(notice.task_id)
        from_sender = sum(1 for e in kept if e.submitted_by == notice.party)
        enforce(checks.run_evidence_verdict(from_sender, any(e.evidence_id == piece.evidence_id for e in kept)))
        if local is not None:
            local.evidence.setdefault(piece.evidence_id, piece)
        await self.ledger.add_evidence(piece, attachment=attachment, envelope=envelope)

    async def _check_panel_lock(self, notice: w.AwardNotice, panel: w.PanelTerms, creator: str) -> None:
        raise NotImplementedError  # panel.PanelRole

    def _after_award(self, task_id: str) -> None:
        """The award was accepted here (runner.RunnerRole runs a sandboxed task)."""

    def _after_case(self, task_id: str) -> None:
        """A dispute case reached this arbiter (runner.RunnerRole re-runs a sandboxed task)."""

    def _record_resolution(self, record: m.TaskRecord, to_bidder: int, to_creator: int) -> None:
        if record.dispute is not None and record.dispute.state == m.DisputeState.OPEN:
            self._apply(
                m.ResolveDispute(task_id=record.task_id, to_bidder=to_bidder, to_creator=to_creator), record.arbiter
            )

    # -- views --

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
        terms = self._terms_of(local)
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
            kind=terms.kind if terms is not None else self._kind_of(local),
            limits=terms.limits if terms is not None else None,
            run=local.result_usage,
            run_verdict=local.run_verdict,
            **self._panel_view(local),
        )

    def _rerun_decides(self, local: TaskLocal) -> bool:
        """Does a re-run decide this task's dispute (runner.RunnerRole, inference.InferenceRole say)?"""
        return False

    def _kind_of(self, local: TaskLocal) -> str | None:
        """The kind of a task that is not sandboxed (inference.InferenceRole names ``inference``)."""
        return None

    def _panel_view(self, local: TaskLocal) -> dict[str, Any]:
        """The panel's part of the view (panel.PanelRole fills it in)."""
        return {}

    @staticmethod
    def _panel_of(local: TaskLocal) -> w.PanelTerms | None:
        params = local.params if local.params is not None else (local.award.params if local.award else None)
        try:
            return w.panel_terms(params)
        except ClawnodeError:
            return None

    @staticmethod
    def _terms_of(local: TaskLocal) -> w.SandboxTerms | None:
        params = local.params if local.params is not None else (local.award.params if local.award else None)
        try:
            return w.sandbox_terms(params)
        except ClawnodeError:
            return None

    def view(self, task_id: str) -> w.TaskView:
        return self._view(task_id)

    def tasks(self) -> list[w.TaskView]:
        """Every task this node knows: its own, the announced ones it watches, the ones it arbitrates
        (live ones and those finished lately; the ledger keeps our own for good)."""
        return sorted((self._view(t) for t in self.book.tasks if t in self.local), key=lambda v: v.task_id)


def checked_evidence(envelope: str, attachment_b64: str | None, remote: str) -> tuple[w.EvidenceNotice, bytes]:
    """A signed piece of evidence and its attachment as a party or the arbiter sent them, checked by
    ``task_checks.evidence_verdict`` (signer, party, the attachment's hash and size)."""
    signer, payload = open_base64(envelope, domain=w.EVIDENCE_DOMAIN, payload_type=w.EVIDENCE_TYPE)
    notice = w.EvidenceNotice.model_validate_json(payload)
    attachment = from_base64(attachment_b64) if attachment_b64 else b""
    facts = checks.EvidenceFacts(
        signer=signer,
        remote=remote,
        party=notice.party,
        content_hash=notice.content_hash,
        size=notice.size,
        attachment_sha256=hashlib.sha256(attachment).hexdigest(),
        attachment_size=len(attachment),
    )
    enforce(checks.evidence_verdict(facts))
    return notice, attachment
