"""``/api/tasks``: the task market for the CLI and the dashboard.

Artifacts travel as base64 in the JSON body: the CLI reads a file and sends its bytes, so no
local path ever reaches the daemon (or a reply, or a log).
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Literal, Protocol

import trio
from fastapi import FastAPI
from libp2p.peer.id import ID
from pydantic import BaseModel, ConfigDict, Field

from dht.discovery import Discovery
from dht.records import CAPABILITY_NAME, CapabilityRecord
from protocols.machines.task_panel import MAX_PANEL
from protocols.task import TaskMarket
from protocols.task.inference import InferenceTerms
from protocols.task_wire import (
    MAX_EVIDENCE_ATTACHMENT,
    MAX_EVIDENCE_NOTE,
    MAX_MODULE,
    MAX_RUN_INPUT,
    BidView,
    PanelTerms,
    RunUsage,
    TaskView,
)
from runtime.errors import ClawnodeError, ErrorCode
from runtime.sandbox import Limits

ADDRESS = r"^0x[0-9a-fA-F]{40}$"

log = logging.getLogger(__name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PublishBody(_Body):
    capability: str = Field(pattern=CAPABILITY_NAME)
    budget: int = Field(ge=1, description="wei")
    deadline_s: int = Field(ge=1, le=30 * 86_400, description="seconds from now")
    summary: str = Field("", max_length=280)
    params: str = Field("{}", max_length=65_536, description="JSON text the winner receives")
    arbiter_peer: str | None = Field(None, min_length=32, max_length=128)
    arbiter_wallet: str | None = Field(None, pattern=ADDRESS)
    review_timeout_s: int = Field(600, ge=1, le=30 * 86_400)
    # A sandboxed task: the program (its sha256 goes in the params), its input and limits.
    kind: Literal["wasm", "native"] | None = Field(None, description="run by the seller's sandbox")
    module_b64: str = Field("", max_length=(MAX_MODULE + 2) * 4 // 3 + 4)
    input_b64: str = Field("", max_length=(MAX_RUN_INPUT + 2) * 4 // 3 + 4)
    limits: Limits | None = None
    arbitration: Literal["rerun", "person"] = "rerun"
    panel: PanelTerms | None = Field(None, description="k arbiters (peer, wallet) and m: m agreeing votes pay out")
    panel_from: list[str] | None = Field(
        None,
        max_length=2 * MAX_PANEL,
        description="instead of panel: arbiters' peer ids, in order of preference; the panel is the first "
        "panel_size whose capability record shows they can re-run the task",
    )
    panel_size: int = Field(3, ge=1, le=MAX_PANEL)
    panel_threshold: int | None = Field(None, ge=1, le=MAX_PANEL, description="default: a strict majority")
    inference: InferenceTerms | None = Field(None, description="a prompt batch run on the seller's served model")


class WatchBody(_Body):
    capability: str = Field(pattern=CAPABILITY_NAME)


class BidBody(_Body):
    price: int = Field(ge=1, description="wei")


class AwardBody(_Body):
    bid_id: str = Field(min_length=1, max_length=128)


class ResultBody(_Body):
    artifact_b64: str = Field(max_length=400_000)
    usage: RunUsage | None = Field(None, description="a sandboxed task run by hand: what the run used, signed with it")


class ReviewBody(_Body):
    accept: bool
    reason: str = Field("", max_length=500)


class DisputeBody(_Body):
    reason: str = Field("", max_length=500)


class EvidenceBody(_Body):
    note: str = Field("", max_length=MAX_EVIDENCE_NOTE)
    attachment_b64: str = Field("", max_length=(MAX_EVIDENCE_ATTACHMENT + 2) * 4 // 3 + 4)


class ResolveBody(_Body):
    to_bidder: int = Field(ge=0, description="wei to the bidder; the rest goes back to the creator")


class VoteBody(_Body):
    to_bidder: int | None = Field(None, ge=0, description="wei to the bidder; null abstains")


class TaskListReply(BaseModel):
    tasks: list[TaskView]


class ArtifactReply(BaseModel):
    task_id: str
    artifact_b64: str


class EvidenceAttachmentReply(BaseModel):
    task_id: str
    evidence_id: str
    attachment_b64: str


def _base64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"{field} is not base64") from None


class TaskNode(Protocol):
    @property
    def tasks(self) -> TaskMarket: ...

    @property
    def discovery(self) -> Discovery: ...


async def _records(node: TaskNode, peers: list[str]) -> list[CapabilityRecord]:
    """The peers' verified capability records, fetched live in parallel, in the peers' order; a peer
    that does not answer (or answers no valid record) is left out."""
    found: dict[int, CapabilityRecord] = {}

    async def fetch(index: int, peer: str) -> None:
        try:
            found[index], _ = await node.discovery.fetch_live(ID.from_base58(peer))
        except Exception as error:  # noqa: BLE001 - any peer that cannot be asked is not drawn
            log.info("panel candidate %s left out: %s", peer[:16], type(error).__name__)

    async with trio.open_nursery() as nursery:
        for index, peer in enumerate(peers):
            nursery.start_soon(fetch, index, peer)
    return [found[index] for index in sorted(found)]


def mount_tasks(app: FastAPI, node: TaskNode) -> None:
    @app.post("/api/tasks")
    async def publish(body: PublishBody) -> TaskView:
        if body.inference is not None:
            return await node.tasks.publish_inference(
                body.capability,
                body.budget,
                body.deadline_s,
                terms=body.inference,
                summary=body.summary,
                arbiter_peer=body.arbiter_peer,
                arbiter_wallet=body.arbiter_wallet,
                review_timeout_s=body.review_timeout_s,
            )
        if body.kind is not None:
            records: list[CapabilityRecord] | None = None
            if body.panel_from is not None:
                if body.panel is not None:
                    raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "name a panel or panel_from, not both")
                records = await _records(node, body.panel_from)
            return await node.tasks.publish_run(
                body.capability,
                body.budget,
                body.deadline_s,
                kind=body.kind,
                module=_base64(body.module_b64, "module_b64"),
                input=_base64(body.input_b64, "input_b64"),
                limits=body.limits,
                summary=body.summary,
                arbiter_peer=body.arbiter_peer,
                arbiter_wallet=body.arbiter_wallet,
                review_timeout_s=body.review_timeout_s,
                arbitration=body.arbitration,
                panel=body.panel,
                panel_from=records,
                panel_size=body.panel_size,
                panel_threshold=body.panel_threshold or body.panel_size // 2 + 1,
            )
        return await node.tasks.publish(
            body.capability,
            body.budget,
            body.deadline_s,
            summary=body.summary,
            params=body.params,
            arbiter_peer=body.arbiter_peer,
            arbiter_wallet=body.arbiter_wallet,
            review_timeout_s=body.review_timeout_s,
        )

    @app.get("/api/tasks")
    async def tasks() -> TaskListReply:
        return TaskListReply(tasks=node.tasks.tasks())

    @app.post("/api/tasks/watch")
    async def watch(body: WatchBody) -> TaskListReply:
        await node.tasks.watch(body.capability)
        return TaskListReply(tasks=node.tasks.tasks())

    @app.get("/api/tasks/{task_id}")
    async def task(task_id: str) -> TaskView:
        return node.tasks.view(task_id)

    @app.post("/api/tasks/{task_id}/bids")
    async def bid(task_id: str, body: BidBody) -> BidView:
        return await node.tasks.bid(task_id, body.price)

    @app.delete("/api/tasks/{task_id}/bids/{bid_id}")
    async def withdraw(task_id: str, bid_id: str) -> BidView:
        return await node.tasks.withdraw_bid(task_id, bid_id)

    @app.post("/api/tasks/{task_id}/award")
    async def award(task_id: str, body: AwardBody) -> TaskView:
        return await node.tasks.award(task_id, body.bid_id)

    @app.post("/api/tasks/{task_id}/result")
    async def submit(task_id: str, body: ResultBody) -> TaskView:
        return await node.tasks.submit(task_id, _base64(body.artifact_b64, "artifact_b64"), body.usage)

    @app.get("/api/tasks/{task_id}/result")
    async def result(task_id: str) -> ArtifactReply:
        return ArtifactReply(task_id=task_id, artifact_b64=base64.b64encode(node.tasks.artifact(task_id)).decode())

    @app.post("/api/tasks/{task_id}/review")
    async def review(task_id: str, body: ReviewBody) -> TaskView:
        return await node.tasks.review(task_id, body.accept, body.reason)

    @app.post("/api/tasks/{task_id}/dispute")
    async def dispute(task_id: str, body: DisputeBody) -> TaskView:
        return await node.tasks.dispute(task_id, body.reason)

    @app.post("/api/tasks/{task_id}/evidence")
    async def add_evidence(task_id: str, body: EvidenceBody) -> TaskView:
        return await node.tasks.add_evidence(task_id, body.note, _base64(body.attachment_b64, "attachment_b64"))

    @app.get("/api/tasks/{task_id}/evidence/{evidence_id}")
    async def evidence_attachment(task_id: str, evidence_id: str) -> EvidenceAttachmentReply:
        attachment = await node.tasks.evidence_attachment(task_id, evidence_id)
        return EvidenceAttachmentReply(
            task_id=task_id, evidence_id=evidence_id, attachment_b64=base64.b64encode(attachment).decode()
        )

    @app.post("/api/tasks/{task_id}/resolve")
    async def resolve(task_id: str, body: ResolveBody) -> TaskView:
        return await node.tasks.resolve(task_id, body.to_bidder)

    @app.post("/api/tasks/{task_id}/vote")
    async def vote(task_id: str, body: VoteBody) -> TaskView:
        """As a member of the task's panel, by hand (a task whose arbitration is ``person``)."""
        return await node.tasks.vote(task_id, body.to_bidder)

    @app.post("/api/tasks/{task_id}/cancel")
    async def cancel(task_id: str) -> TaskView:
        return await node.tasks.cancel(task_id)
