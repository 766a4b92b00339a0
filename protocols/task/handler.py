"""``/clawnode/task/1.0.0``: the market that joins the roles, mounts the protocol and dispatches
each request to the role that handles it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from libp2p.peer.id import ID
from pydantic import BaseModel, TypeAdapter

from protocols import task_wire as w
from protocols.task.base import READ_TIMEOUT_S, TASK_PROTOCOL
from protocols.task.closeout import CloseOutRole
from protocols.task.dispute import DisputeRole
from protocols.task.inference import InferenceRole
from wire.rpc import serve_requests

_REQUESTS: TypeAdapter[Any] = TypeAdapter(w.TaskRequest)


class TaskMarket(InferenceRole, DisputeRole, CloseOutRole):
    """Every role of the task market for one node; mount with ``await nursery.start(market.run)``."""

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            handler = serve_requests(self._handle, max_frame=w.MAX_TASK_FRAME, read_timeout_s=READ_TIMEOUT_S)
            self.host.set_stream_handler(TASK_PROTOCOL, handler)
            nursery.start_soon(self._sweep)
            task_status.started(self)

    async def _handle(self, frame: bytes, remote: ID) -> BaseModel:
        message = _REQUESTS.validate_json(frame)
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
            w.VoteRequest: self._on_vote,
            w.CancelRequest: self._on_cancel,
            w.ModuleRequest: self._on_module,
            w.TermsRequest: self._on_terms,
        }
        reply = await handlers[type(message)](message, str(remote))
        return reply if isinstance(reply, BaseModel) else w.Ack()
