"""The messages of ``/clawnode/task/1.0.0``: bids, awards, results, reviews, disputes, resolutions.

Like the lease protocol (``protocols.lease_wire``), every exchange is one request frame and one
reply frame. What a party may later have to prove to an arbiter travels as a libp2p signed
envelope (``wire.signed``, base64 in the JSON frame), each kind under its own domain:

* :class:`AwardNotice` — signed by the creator: who won, at what price, paid to which wallet, and
  the escrow lock that holds the price (the bidder checks that lock on chain before accepting).
* :class:`ResultNotice` — signed by the bidder: the artifact's sha256 and size. The artifact bytes
  ride beside it (base64, at most :data:`MAX_ARTIFACT`), never inside the signature.
* :class:`ReviewNotice` — signed by the creator: accepted or rejected, with a reason.
* :class:`EvidenceNotice` — signed by either party of an open dispute: a note and an attachment's
  sha256 and size (the bytes ride beside it, at most :data:`MAX_EVIDENCE_ATTACHMENT`). It goes to
  the arbiter and the other party; its id is a hash of what it says, so sending it again is harmless.

A :class:`DisputeCase` carries those envelopes (and the creator-signed announcement) to the
arbiter, so the arbiter can rebuild the task without having watched it. Everything else rides on
the Noise-secured stream, whose remote peer id already says who is speaking.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocols.lease_wire import ADDRESS, HEX32, SHA256_HEX, EscrowLock
from protocols.machines.task_panel import MAX_PANEL
from runtime.errors import REASON_PATTERN, ClawnodeError, ErrorCode
from runtime.jsonsafe import loads_bounded
from runtime.ledger.models import Evidence
from runtime.ledger.receipts import MAX_AMOUNT, PEER_ID_PATTERN
from runtime.sandbox import Limits

TASK_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MAX_ARTIFACT = 256 * 1024
MAX_ENVELOPE_B64 = 24 * 1024
MAX_PARAMS = 8 * 1024
MAX_REASON = 280
MAX_EVIDENCE_NOTE = 2000
MAX_EVIDENCE_ATTACHMENT = 64 * 1024
# base64 of the largest artifact, its envelope and the JSON around them.
MAX_TASK_FRAME = 512 * 1024
# A sandboxed task's module (or native program), fetched from whoever holds it; its input rides in the params.
MAX_MODULE = 256 * 1024
MAX_RUN_INPUT = 4096

AWARD_DOMAIN = "clawnode-task-award"
AWARD_TYPE = b"/clawnode/task-award/1"
RESULT_DOMAIN = "clawnode-task-result"
RESULT_TYPE = b"/clawnode/task-result/1"
REVIEW_DOMAIN = "clawnode-task-review"
REVIEW_TYPE = b"/clawnode/task-review/1"
EVIDENCE_DOMAIN = "clawnode-task-evidence"
EVIDENCE_TYPE = b"/clawnode/task-evidence/1"
VOTE_DOMAIN = "clawnode-task-vote"
VOTE_TYPE = b"/clawnode/task-vote/1"


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- sandboxed tasks --


class PanelMember(_Msg):
    peer: str = Field(pattern=PEER_ID_PATTERN)
    wallet: str = Field(pattern=ADDRESS, description="the wallet whose signed vote the escrow contract counts")


class PanelTerms(_Msg):
    """A panel of ``k`` arbiters and its threshold ``m`` (``protocols.machines.task_panel``): the escrow
    is locked with their wallets and pays out once ``m`` of their signed votes name the same split."""

    members: list[PanelMember] = Field(min_length=1, max_length=MAX_PANEL)
    threshold: int = Field(ge=1, le=MAX_PANEL)

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(member.peer for member in self.members)

    def wallet_of(self, peer: str) -> str | None:
        return next((member.wallet for member in self.members if member.peer == peer), None)


class SandboxTerms(_Msg):
    """What a ``wasm`` or ``native`` task names in its params (JSON): the program by hash, its input, its limits."""

    kind: Literal["wasm", "native"]
    module_sha256: str = Field(pattern=SHA256_HEX)
    module_size: int = Field(ge=1, le=MAX_MODULE)
    input_b64: str = Field("", max_length=(MAX_RUN_INPUT + 2) * 4 // 3 + 4)
    limits: Limits
    arbitration: Literal["rerun", "person"] = Field("rerun", description="rerun: the arbiter re-executes it")
    panel: PanelTerms | None = Field(None, description="k arbiters who each re-run and vote; m votes decide")


def sandbox_terms(params: str | None) -> SandboxTerms | None:
    """The sandbox terms in a task's params; None for a task whose params name no sandboxed kind
    (``"kind": "wasm"`` or ``"native"``): a person delivers it."""
    try:
        data = loads_bounded(params or "", what="the task's params")
    except (ValueError, ClawnodeError):
        return None
    if not isinstance(data, dict) or data.get("kind") not in ("wasm", "native"):
        return None
    try:
        return SandboxTerms.model_validate(data)
    except ValueError:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the task's sandbox terms are invalid", "bad_terms") from None


def panel_terms(params: str | None) -> PanelTerms | None:
    """The arbiter panel a task's params name: a sandboxed task's (``SandboxTerms.panel``) or an
    ``inference`` task's (its ``panel``, the same shape); None for a task decided by one arbiter."""
    terms = sandbox_terms(params)
    if terms is not None:
        return terms.panel
    try:
        data = loads_bounded(params or "", what="the task's params")
    except (ValueError, ClawnodeError):
        return None
    if not isinstance(data, dict) or data.get("kind") != "inference" or data.get("panel") is None:
        return None
    try:
        return PanelTerms.model_validate(data["panel"])
    except ValueError:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the task's panel is invalid", "bad_terms") from None


class RunUsage(_Msg):
    """What a sandboxed run used, signed with its result: fuel (wasm instructions; native CPU-ms), how it ended."""

    fuel_used: int = Field(ge=0)
    outcome: str = Field(pattern=REASON_PATTERN)
    exit_code: int | None = None


# -- signed payloads --


class AwardNotice(_Msg):
    """The creator's signed award: the bid it accepted and where the price is locked."""

    task_id: str = Field(pattern=TASK_ID_PATTERN)
    bid_id: str = Field(pattern=TASK_ID_PATTERN)
    creator: str = Field(pattern=PEER_ID_PATTERN)
    bidder: str = Field(pattern=PEER_ID_PATTERN)
    price: int = Field(ge=1, le=MAX_AMOUNT)
    payee: str = Field(pattern=ADDRESS, description="the bidder's wallet, as its bid named it")
    arbiter_wallet: str = Field(pattern=ADDRESS)
    chain_id: int = Field(ge=1)
    contract: str = Field(pattern=ADDRESS)
    lock: EscrowLock
    salt: str | None = Field(
        None,
        pattern=SHA256_HEX,
        description="the lock's id is lease_id_for(the creator's peer id, this salt): the creator's own lock, "
        "never a buyer's lease lock paying the same seller (an award without it is refused lock_not_bound)",
    )
    awarded_at: int = Field(ge=0, description="unix seconds, creator's clock")
    announcement: str = Field(max_length=MAX_ENVELOPE_B64, description="base64 of the signed announcement")
    params: str = Field(max_length=MAX_PARAMS, description="the task parameters; sha256 = params_hash")


class ResultNotice(_Msg):
    """The bidder's signed delivery: what it hands over, by hash."""

    task_id: str = Field(pattern=TASK_ID_PATTERN)
    bidder: str = Field(pattern=PEER_ID_PATTERN)
    content_hash: str = Field(pattern=SHA256_HEX)
    size: int = Field(ge=0, le=MAX_ARTIFACT)
    submitted_at: int = Field(ge=0)
    usage: RunUsage | None = None  # a sandboxed task's metered run


class ReviewNotice(_Msg):
    task_id: str = Field(pattern=TASK_ID_PATTERN)
    creator: str = Field(pattern=PEER_ID_PATTERN)
    verdict: Literal["accepted", "rejected"]
    reason: str = Field("", max_length=MAX_REASON)
    reviewed_at: int = Field(ge=0)


class EvidenceNotice(_Msg):
    """A party's signed piece of evidence for an open dispute."""

    task_id: str = Field(pattern=TASK_ID_PATTERN)
    party: str = Field(pattern=PEER_ID_PATTERN)
    note: str = Field("", max_length=MAX_EVIDENCE_NOTE)
    content_hash: str = Field(pattern=SHA256_HEX, description="sha256 of the attachment (of no bytes when none)")
    size: int = Field(ge=0, le=MAX_EVIDENCE_ATTACHMENT)
    submitted_at: int = Field(ge=0)

    @property
    def evidence_id(self) -> str:
        """What the piece says, hashed: the same note and attachment from the same party is the same piece."""
        digest = hashlib.sha256()
        for part in (self.task_id, self.party, self.note, self.content_hash):
            digest.update(part.encode() + b"\0")
        return digest.hexdigest()[:32]


class VoteNotice(_Msg):
    """A panel member's signed vote: ``to_bidder`` of the price to the seller (``None``: it abstains, it
    could not decide). ``signature`` is its wallet's signature of the escrow contract's panel vote
    digest for that split (what ``resolve_by_panel`` counts); an abstention has none."""

    task_id: str = Field(pattern=TASK_ID_PATTERN)
    voter: str = Field(pattern=PEER_ID_PATTERN)
    wallet: str = Field(pattern=ADDRESS)
    to_bidder: int | None = Field(None, ge=0, le=MAX_AMOUNT)
    reason: str = Field(pattern=REASON_PATTERN, description="why: rerun_matches, output_differs, not_reproducible...")
    signature: str = Field("", pattern=r"^(0x[0-9a-f]{130})?$")
    voted_at: int = Field(ge=0)


# -- requests --


class BidRequest(_Msg):
    """Bidder → creator."""

    type: Literal["bid"] = "bid"
    task_id: str = Field(pattern=TASK_ID_PATTERN)
    bid_id: str = Field(pattern=TASK_ID_PATTERN)
    price: int = Field(ge=1, le=MAX_AMOUNT)
    asset: str = Field("ETH", max_length=16)
    payee: str = Field(pattern=ADDRESS)


class WithdrawBidRequest(_Msg):
    type: Literal["withdraw_bid"] = "withdraw_bid"
    task_id: str = Field(pattern=TASK_ID_PATTERN)
    bid_id: str = Field(pattern=TASK_ID_PATTERN)


class AwardRequest(_Msg):
    """Creator → winning bidder."""

    type: Literal["award"] = "award"
    envelope: str = Field(max_length=2 * MAX_ENVELOPE_B64)


class ResultRequest(_Msg):
    """Awarded bidder → creator."""

    type: Literal["result"] = "result"
    envelope: str = Field(max_length=MAX_ENVELOPE_B64)
    artifact: str = Field(max_length=(MAX_ARTIFACT + 2) * 4 // 3 + 4, description="base64")


class ReviewRequest(_Msg):
    """Creator → awarded bidder."""

    type: Literal["review"] = "review"
    envelope: str = Field(max_length=MAX_ENVELOPE_B64)


class DisputeCase(_Msg):
    """The disputing party → the arbiter: everything signed that the arbiter needs to judge."""

    type: Literal["dispute_case"] = "dispute_case"
    task_id: str = Field(pattern=TASK_ID_PATTERN)
    announcement: str = Field(max_length=MAX_ENVELOPE_B64)
    award: str = Field(max_length=2 * MAX_ENVELOPE_B64)
    result: str = Field(max_length=MAX_ENVELOPE_B64)
    review: str | None = Field(None, max_length=MAX_ENVELOPE_B64)
    reason: str = Field("", max_length=MAX_REASON)


class DisputeRequest(_Msg):
    """The disputing party → the other party (the chain already says the escrow is disputed)."""

    type: Literal["dispute"] = "dispute"
    task_id: str = Field(pattern=TASK_ID_PATTERN)
    reason: str = Field("", max_length=MAX_REASON)


class EvidenceRequest(_Msg):
    """A party → the arbiter and the other party."""

    type: Literal["evidence"] = "evidence"
    envelope: str = Field(max_length=MAX_ENVELOPE_B64)
    attachment: str = Field("", max_length=(MAX_EVIDENCE_ATTACHMENT + 2) * 4 // 3 + 4, description="base64")


class ResolutionRequest(_Msg):
    """Arbiter → both parties; each checks it against the closed escrow on chain."""

    type: Literal["resolution"] = "resolution"
    task_id: str = Field(pattern=TASK_ID_PATTERN)
    to_bidder: int = Field(ge=0, le=MAX_AMOUNT)
    to_creator: int = Field(ge=0, le=MAX_AMOUNT)
    tx_hash: str | None = Field(None, pattern=HEX32)
    verdict: str | None = Field(None, pattern=REASON_PATTERN, description="an automatic decision's reason")
    # The arbiter's re-run as a signed EvidenceNotice (party = the arbiter) and its output as attachment.
    evidence: str | None = Field(None, max_length=MAX_ENVELOPE_B64)
    attachment: str = Field("", max_length=(MAX_EVIDENCE_ATTACHMENT + 2) * 4 // 3 + 4, description="base64")


class VoteRequest(_Msg):
    """A panel member → the other members and both parties: its signed vote."""

    type: Literal["vote"] = "vote"
    envelope: str = Field(max_length=MAX_ENVELOPE_B64)
    # The member's signed record of its re-run (an EvidenceNotice, party = the member) and its output.
    evidence: str | None = Field(None, max_length=MAX_ENVELOPE_B64)
    attachment: str = Field("", max_length=(MAX_EVIDENCE_ATTACHMENT + 2) * 4 // 3 + 4, description="base64")


class ModuleRequest(_Msg):
    """The awarded seller or the arbiter → whoever holds a sandboxed task's module."""

    type: Literal["module"] = "module"
    task_id: str = Field(pattern=TASK_ID_PATTERN)
    sha256: str = Field(pattern=SHA256_HEX)


class TermsRequest(_Msg):
    """A would-be bidder → the creator: the sandbox terms of a task, before bidding."""

    type: Literal["terms"] = "terms"
    task_id: str = Field(pattern=TASK_ID_PATTERN)


class CancelRequest(_Msg):
    """Creator → its bidders."""

    type: Literal["cancel"] = "cancel"
    task_id: str = Field(pattern=TASK_ID_PATTERN)


TaskRequest = Annotated[
    BidRequest
    | WithdrawBidRequest
    | AwardRequest
    | ResultRequest
    | ReviewRequest
    | DisputeCase
    | DisputeRequest
    | EvidenceRequest
    | ResolutionRequest
    | VoteRequest
    | ModuleRequest
    | TermsRequest
    | CancelRequest,
    Field(discriminator="type"),
]


# -- replies --


class Ack(_Msg):
    type: Literal["ack"] = "ack"


class TermsReply(_Msg):
    """A sandboxed task's terms without its input (the award carries all of them, signed); a task
    with no sandboxed kind answers ``E_NOT_FOUND``/``no_sandbox_terms``."""

    type: Literal["terms_reply"] = "terms_reply"
    kind: Literal["wasm", "native"]
    module_sha256: str = Field(pattern=SHA256_HEX)
    module_size: int = Field(ge=1, le=MAX_MODULE)
    limits: Limits
    arbitration: Literal["rerun", "person"]


class ModuleReply(_Msg):
    type: Literal["module_reply"] = "module_reply"
    module: str = Field(max_length=(MAX_MODULE + 2) * 4 // 3 + 4, description="base64")


# -- what the API and CLI show --


class BidView(BaseModel):
    task_id: str
    bid_id: str
    bidder: str
    price: int
    asset: str
    state: str


class TaskView(BaseModel):
    """A task as this node sees it; ``role`` is this node's part in it."""

    task_id: str
    role: Literal["creator", "bidder", "awarded_bidder", "arbiter", "observer"]
    creator: str
    capability: str | None
    summary: str
    budget: int
    deadline: int
    review_timeout_s: int
    arbiter: str
    arbiter_wallet: str | None
    state: str
    bids: list[BidView]
    awarded_bid: str | None = None
    awarded_bidder: str | None = None
    price: int | None = None
    escrow_id: str | None = None
    result_hash: str | None = None
    result_size: int | None = None
    result_state: str | None = None
    receipt_state: str | None = None
    dispute_state: str | None = None
    evidence: list[Evidence] = Field(default_factory=list)  # the dispute's, as the ledger keeps them
    to_bidder: int | None = None
    to_creator: int | None = None
    kind: str | None = None  # wasm / native: a sandboxed task
    limits: Limits | None = None  # the sandboxed task's limits
    run: RunUsage | None = None  # the seller's metered run, as signed with its result
    run_verdict: str | None = None  # the arbiter's automatic decision (or why it left it to a person)
    panel: PanelTerms | None = None  # the task's arbiter panel, when it names one
    panel_votes: dict[str, int | None] = Field(default_factory=dict)  # member -> its counted vote (None: abstained)
    panel_state: Literal["open", "decided", "needs_person", "deadlocked"] | None = None
