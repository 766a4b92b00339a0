"""``/clawnode/capability/1.0.0``: ask a peer for its signed capability record.

One request frame, one reply frame. The reply carries the sealed envelope as it
was published, so the asker verifies exactly what the DHT would hold.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from runtime.errors import ClawnodeError, ErrorCode
from wire.framing import FrameReader, write_frame
from wire.signed import from_base64
from wire.streams import open_stream

CAPABILITY_PROTOCOL = TProtocol("/clawnode/capability/1.0.0")
# Room for an oversized record to arrive and be rejected (and counted) as oversized;
# a frame beyond this is a protocol violation and costs only the stream.
MAX_MESSAGE = 64 * 1024
REQUEST_TIMEOUT_S = 5.0

log = logging.getLogger(__name__)


class GetRecord(BaseModel):
    type: Literal["get_record"] = "get_record"


class RecordReply(BaseModel):
    type: Literal["record"] = "record"
    envelope: str = Field(description="base64 of the sealed record")
    # Unsigned and advisory (it changes with every request): per capability, e.g. a model's
    # {"running", "parallel", "queued", "max_queue"}; a router's health check spreads load by it.
    load: dict[str, dict[str, int]] = Field(default_factory=dict, max_length=64)


class ErrorReply(BaseModel):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str


Reply = TypeAdapter(Annotated[RecordReply | ErrorReply, Field(discriminator="type")])


def capability_handler(
    sealed_record: Callable[[], bytes | None], load: Callable[[], dict[str, dict[str, int]]] = dict
) -> Callable[[INetStream], Awaitable[None]]:
    async def handle(stream: INetStream) -> None:
        reader = FrameReader(stream, max_frame=MAX_MESSAGE)
        try:
            GetRecord.model_validate_json(await reader.read_frame(REQUEST_TIMEOUT_S))
            sealed = sealed_record()
            reply: BaseModel = (
                ErrorReply(code=ErrorCode.NOT_FOUND, message="this node offers nothing")
                if sealed is None
                else RecordReply(envelope=base64.b64encode(sealed).decode(), load=load())
            )
        except ValidationError:
            reply = ErrorReply(code=ErrorCode.INVALID_ARGUMENT, message="expected a get_record request")
        except ClawnodeError as error:
            reply = ErrorReply(code=error.code, message=error.message)
        await write_frame(stream, reply.model_dump_json().encode(), max_frame=MAX_MESSAGE)
        await stream.close()

    return handle


async def ask_record(host: IHost, peer_id: ID, timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[bytes, float]:
    """The peer's raw answer to ``get_record`` (unparsed) and the request's round-trip time in seconds."""
    try:
        with trio.fail_after(timeout_s):
            stream = await open_stream(host, peer_id, [CAPABILITY_PROTOCOL])  # through a relay if needed
            try:
                started = time.perf_counter()
                await write_frame(stream, GetRecord().model_dump_json().encode())
                frame = await FrameReader(stream, max_frame=MAX_MESSAGE).read_frame(timeout_s)
                rtt = time.perf_counter() - started
            finally:
                with trio.move_on_after(1):
                    await stream.close()
    except trio.TooSlowError:
        raise ClawnodeError(ErrorCode.TIMEOUT, "the peer did not answer in time") from None
    except ClawnodeError:
        raise
    except Exception as error:  # noqa: BLE001 - dial and stream failures come in many types
        raise ClawnodeError(ErrorCode.UNAVAILABLE, f"the peer is unreachable ({type(error).__name__})") from None
    return frame, rtt


async def fetch_sealed_record(host: IHost, peer_id: ID, timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[bytes, float]:
    """The peer's sealed record and the request's round-trip time in seconds."""
    frame, rtt = await ask_record(host, peer_id, timeout_s)
    return parse_record_reply(frame), rtt


def parse_record_reply(frame: bytes) -> bytes:
    """The sealed record in a peer's reply frame; ``ClawnodeError`` for anything else (never another exception)."""
    try:
        reply = Reply.validate_json(frame)
    except ValidationError:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the peer sent an unreadable reply") from None
    if isinstance(reply, ErrorReply):
        # The peer's words are not ours to repeat: its code, and a message of bounded length.
        raise ClawnodeError(reply.code, reply.message[:200])
    return from_base64(reply.envelope)
