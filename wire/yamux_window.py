"""Reading a libp2p stream while giving its Yamux window back ``RELEASE_BYTES`` at a time.

py-libp2p 0.8.1's ``read`` sends a WINDOW_UPDATE frame after every read that leaves the window
short of its target, which is every read of a request-and-reply exchange or of a stream of small
frames: half of all the frames such a stream costs, each a Noise message and a trip through both
peers' Python stacks, and sent before the read returns (a call's first chunk waited for it).
go-yamux gives the window back once half of it is read. The sender's window (256 KiB) stays far
above what is unreleased here, so it never waits. Another muxer's stream reads as it always did.

Data already in the stream's buffer is taken at once (``_take``), and an empty buffer is waited on
through the muxer's own event, as ``Yamux.read_stream`` does, without its connection-wide lock (one
trio task switch fewer a read); any other state (the stream closing, reset, the connection shutting
down) goes through ``read_stream``, whose end or reset reads as ``b""``. (The layer tunnel's reader,
``protocols/lease/layers.py``, moved here.)
"""

from __future__ import annotations

import contextlib

import trio
from libp2p.abc import INetStream
from libp2p.stream_muxer.yamux.yamux import YamuxStream

RELEASE_BYTES = 64 << 10


async def _stream_read(stream: INetStream, size: int) -> bytes:
    try:
        return await stream.read(size)
    except Exception:  # noqa: BLE001 - a reset or closed stream reads as its end
        return b""


class WindowedReader:
    """``read`` as a stream's, a reset or closed stream reading as its end (``b""``); ``write`` passes
    through (a ``wire.framing.ByteStream``)."""

    def __init__(self, stream: INetStream, *, release_bytes: int = RELEASE_BYTES) -> None:
        self.stream = stream
        muxed = getattr(stream, "muxed_stream", None)
        self.muxed = muxed if isinstance(muxed, YamuxStream) else None
        self.release_bytes = release_bytes
        self.unreleased = 0

    def _take(self, size: int) -> bytes | None:
        """Bytes buffered for an open stream (b"": none yet), or None: ask ``read_stream``."""
        assert self.muxed is not None
        conn, stream_id = self.muxed.conn, self.muxed.stream_id
        stream = conn.streams.get(stream_id)
        buffer = conn.stream_buffers.get(stream_id)
        if (
            stream is not self.muxed
            or buffer is None
            or stream.closed
            or stream.recv_closed
            or stream.reset_received
            or conn.event_shutting_down.is_set()
        ):
            return None
        if not buffer:
            return b""
        if size < 0 or size >= len(buffer):
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:size])
            del buffer[:size]
        return data

    async def _read(self, size: int) -> bytes:
        assert self.muxed is not None
        conn, stream_id = self.muxed.conn, self.muxed.stream_id
        while True:
            data = self._take(size)
            if data is None:
                return await conn.read_stream(stream_id, size)
            if data:
                return data
            event = conn.stream_events.get(stream_id)
            if event is None:
                return await conn.read_stream(stream_id, size)
            await event.wait()
            conn.stream_events[stream_id] = trio.Event()

    async def read(self, size: int | None = None) -> bytes:
        size = -1 if size is None else size
        if self.muxed is None:
            return await _stream_read(self.stream, size)
        try:
            data = await self._read(size)
        except Exception:  # noqa: BLE001 - a reset or closed stream reads as its end
            return b""
        self.unreleased += len(data)
        if self.unreleased >= self.release_bytes:
            increment, self.unreleased = self.unreleased, 0
            async with self.muxed.window_lock:
                self.muxed.recv_window += increment
            with contextlib.suppress(Exception):  # a connection closing: the next read ends the stream
                await self.muxed.send_window_update(increment)
        return data

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)
