"""Frames on a libp2p stream: an unsigned varint length, then that many bytes.

Written here rather than taken from py-libp2p, whose ``read_varint_prefixed_bytes``
gives up after 101 reads and reports a multi-MiB message as a closed connection.
Every read has a deadline and every frame a size limit, so a slow or hostile peer
costs one stream, never a task stuck forever or unbounded memory.
"""

from __future__ import annotations

from typing import Protocol

import trio

from runtime.errors import ClawnodeError, ErrorCode

DEFAULT_MAX_FRAME = 1 << 20
DEFAULT_READ_TIMEOUT_S = 10.0
_MAX_VARINT_BYTES = 9


class ByteStream(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...


def encode_uvarint(value: int) -> bytes:
    if value < 0:
        raise ValueError("a varint is never negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class FrameReader:
    """Reads frames from one stream, keeping bytes that arrived ahead of the current frame."""

    def __init__(self, stream: ByteStream, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._max_frame = max_frame

    async def _fill(self) -> None:
        chunk = await self._stream.read(65536)
        if not chunk:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "the peer closed the stream")
        self._buffer.extend(chunk)

    async def _read_length(self) -> int:
        while True:
            value, shift = 0, 0
            for index, byte in enumerate(self._buffer):
                if index >= _MAX_VARINT_BYTES:
                    raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "frame length prefix is too long")
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    del self._buffer[: index + 1]
                    return value
            if len(self._buffer) >= _MAX_VARINT_BYTES:
                raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "frame length prefix is too long")
            await self._fill()

    async def read_first_frame(self, timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> bytes | None:
        """``read_frame``, or None when the stream ends (closed or reset) before a byte of the frame came:
        a stream opened ahead of its call and closed unused (``wire.spare_streams``), not a failure."""
        deadline = trio.current_time() + timeout_s
        if not self._buffer:
            try:
                with trio.fail_after(timeout_s):
                    chunk = await self._stream.read(65536)
            except trio.TooSlowError:
                raise ClawnodeError(ErrorCode.TIMEOUT, f"no complete frame within {timeout_s:g} s") from None
            except Exception:  # noqa: BLE001 - an EOF or a reset (each muxer raises its own): nothing was asked
                return None
            if not chunk:
                return None
            self._buffer.extend(chunk)
        return await self.read_frame(max(0.0, deadline - trio.current_time()))

    async def read_frame(self, timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> bytes:
        try:
            with trio.fail_after(timeout_s):
                length = await self._read_length()
                if length > self._max_frame:
                    raise ClawnodeError(
                        ErrorCode.INVALID_ARGUMENT, f"frame of {length} bytes exceeds the limit of {self._max_frame}"
                    )
                while len(self._buffer) < length:
                    await self._fill()
        except trio.TooSlowError:
            raise ClawnodeError(ErrorCode.TIMEOUT, f"no complete frame within {timeout_s:g} s") from None
        frame = bytes(self._buffer[:length])
        del self._buffer[:length]
        return frame


async def write_frame(stream: ByteStream, payload: bytes, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
    if len(payload) > max_frame:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"frame of {len(payload)} bytes exceeds {max_frame}")
    await stream.write(encode_uvarint(len(payload)) + payload)
