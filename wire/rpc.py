"""One request frame, one reply frame: the exchange every clawnode protocol but streaming calls uses.

Requests and replies are pydantic models with a ``type`` tag, sent as JSON frames
(``wire.framing``). A handler raises ``ClawnodeError`` to answer ``{type: "error", code,
message, reason}`` (``reason``: the error's stable machine-readable reason, or null); anything
else it raises is answered ``E_INTERNAL`` without its text, so an exception message (which may
name a file or an endpoint) never leaves the node.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, TypeVar

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from runtime.errors import ClawnodeError, ErrorCode, clean_reason
from wire.framing import DEFAULT_MAX_FRAME, FrameReader, write_frame
from wire.streams import open_stream

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0

R = TypeVar("R")


class ErrorReply(BaseModel):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str = Field(max_length=500)
    # Added later: a peer that sends none is read as null, and one that does not know it ignores it.
    reason: str | None = Field(None, max_length=64, description="the stable machine-readable reason")
    # Added later too: a busy peer's hint, seconds until a retry may be taken (E_RATE_LIMITED).
    retry_after_s: float | None = Field(None, ge=0, le=3600)


def error_reply(error: BaseException) -> ErrorReply:
    """What a peer is told about ``error``: its code, message and reason if it is ours, else nothing more."""
    if isinstance(error, ClawnodeError):
        hint = error.retry_after_s
        return ErrorReply(
            code=error.code,
            message=error.message[:500],
            reason=clean_reason(error.reason),
            retry_after_s=None if hint is None else min(3600.0, max(0.0, hint)),
        )
    if isinstance(error, ValidationError):
        return ErrorReply(code=ErrorCode.INVALID_ARGUMENT, message="the request does not match the protocol")
    return ErrorReply(code=ErrorCode.INTERNAL, message=f"internal error ({type(error).__name__})")


Handler = Callable[[bytes, ID], Awaitable[BaseModel]]


def serve_requests(
    handler: Handler, *, max_frame: int = DEFAULT_MAX_FRAME, read_timeout_s: float = DEFAULT_TIMEOUT_S
) -> Callable[[INetStream], Awaitable[None]]:
    """A stream handler: read one request, answer it with the handler's reply or an error reply."""

    async def handle(stream: INetStream) -> None:
        remote = stream.muxed_conn.peer_id
        try:
            try:
                request = await FrameReader(stream, max_frame=max_frame).read_frame(read_timeout_s)
                reply: BaseModel = await handler(request, remote)
            except Exception as error:
                if not isinstance(error, ClawnodeError | ValidationError):
                    log.warning("request handler failed: %s", type(error).__name__, exc_info=log.isEnabledFor(10))
                reply = error_reply(error)
            with trio.move_on_after(read_timeout_s):
                await write_frame(stream, reply.model_dump_json().encode(), max_frame=max_frame)
        finally:
            with trio.move_on_after(1):
                await stream.close()

    return handle


async def request(
    host: IHost,
    peer_id: ID,
    protocol: TProtocol | Sequence[TProtocol],
    message: BaseModel,
    replies: TypeAdapter[R],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> R:
    """Send ``message`` to the peer and return its reply; an error reply raises ``ClawnodeError``.

    Several protocol ids (newest first) are offered in one negotiation: the peer speaks the first it knows,
    and ``replies`` must read the replies of each."""
    protocols = [protocol] if isinstance(protocol, str) else list(protocol)
    try:
        with trio.fail_after(timeout_s):
            stream = await open_stream(host, peer_id, protocols)  # through a relay if needed
            try:
                await write_frame(stream, message.model_dump_json().encode(), max_frame=max_frame)
                frame = await FrameReader(stream, max_frame=max_frame).read_frame(timeout_s)
            finally:
                with trio.move_on_after(1):
                    await stream.close()
    except trio.TooSlowError:
        raise ClawnodeError(ErrorCode.TIMEOUT, "the peer did not answer in time") from None
    except ClawnodeError:
        raise
    except Exception as error:  # noqa: BLE001 - dial and stream failures come in many types
        raise ClawnodeError(ErrorCode.UNAVAILABLE, f"the peer is unreachable ({type(error).__name__})") from None
    return parse_reply(frame, replies)


_ERROR = TypeAdapter(ErrorReply)


def parse_reply(frame: bytes, replies: TypeAdapter[R]) -> R:
    try:
        error = _ERROR.validate_json(frame)
    except ValidationError:
        pass
    else:
        raise ClawnodeError(error.code, error.message, clean_reason(error.reason), retry_after_s=error.retry_after_s)
    try:
        return replies.validate_json(frame)
    except ValidationError:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the peer sent an unreadable reply") from None
