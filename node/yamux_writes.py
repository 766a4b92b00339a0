"""Yamux frames go out whole once they hold the connection's write lock, whatever is cancelled.

py-libp2p 0.8.1 writes a Yamux frame (``Yamux._write_frame``) by encrypting it with the Noise session,
which spends the next nonce, then sending the bytes. Many writers run in tasks that others cancel: a
stream's reader sends a window update from inside ``read``, so a call's reader stopped at the end of
the call writes as it is cancelled. A cancel that lands between the encryption and the send (trio's
socket send checks for one first) drops a frame whose nonce is spent, and the peer's next decrypt
fails ("Failed authentication of message"): it closes the whole connection, every stream on it
resets, and new ones to that peer fail until it is dialed again. On a loaded machine this cut one
lease in about twenty of a consumer leaving four concurrent calls mid-stream (the provider never heard
the revocation, and paused the lease until it counted as abandoned).

So a writer that holds the lock finishes its frame shielded from cancellation; a cancel is seen
before the lock (nothing is spent yet) or after the frame left. The shield is bounded: a frame still
not out after ``FRAME_WRITE_TIMEOUT_S`` (a peer that stopped reading) closes the connection, which
such a peer has lost anyway, and the writer gets the muxer's usual write error. A daemon that is
shutting down cuts that wait short (``release_frame_writes``).

Reading, py-libp2p 0.8.1 buffers a DATA frame past the stream's receive window with only a warning, so
a peer that ignored the window could push bytes into a stream nobody reads (identify's, once it has
answered) until the node ran out of memory. Each stream's buffer here holds at most the window the
node granted, and a connection's streams together ``MAX_CONNECTION_BUFFERED`` (``bound_receive_buffers``):
a frame past either ends that stream's receiving side (it reads as ended, the frame is dropped), or
the connection when the frame opens or accepts the stream.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.network.connection.exceptions import RawConnError
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, Yamux

log = logging.getLogger(__name__)

FRAME_WRITE_TIMEOUT_S = 30.0
# Bytes one connection's streams may hold unread, all together: each stream's window grows with its
# first reads (2-8 MiB after identify's), and a peer may open 256 streams, so the windows alone let
# one connection hold a gigabyte. Two streams may still fill the largest window py-libp2p grants (a
# consumer's layer tunnels to two of a seller's servers, uploading weights while the servers load).
MAX_CONNECTION_BUFFERED = 32 << 20
CLOSE_TIMEOUT_S = 1.0
# At shutdown a frame still waiting for a peer that stopped reading gets this long, not the full
# timeout: the daemon's shutdown is bounded (SHUTDOWN_GRACE_S) and must not wait out the shield.
SHUTDOWN_GRACE_S = 0.5

# The shields of frames being written now (at most one per connection: the write lock).
_writing: set[trio.CancelScope] = set()


_shutting_down = False


def release_frame_writes() -> None:
    """Shutting down: every frame being written, or written from now on, gets ``SHUTDOWN_GRACE_S``
    at most."""
    global _shutting_down
    _shutting_down = True
    deadline = trio.current_time() + SHUTDOWN_GRACE_S
    for scope in list(_writing):
        scope.deadline = min(scope.deadline, deadline)


async def _write_frame_whole(self: Yamux, data: bytes) -> None:
    """``Yamux._write_frame``: serialized by the write lock, and once under it, not cancellable."""
    async with self._write_lock:
        with trio.CancelScope(shield=True) as writing:
            writing.deadline = trio.current_time() + (SHUTDOWN_GRACE_S if _shutting_down else FRAME_WRITE_TIMEOUT_S)
            _writing.add(writing)
            try:
                await self.secured_conn.write(data)
            finally:
                _writing.discard(writing)
        if writing.cancelled_caught:
            log.info(
                "a frame to %s was not sent in %.0f s: the connection is closed", self.peer_id, FRAME_WRITE_TIMEOUT_S
            )
            with trio.move_on_after(CLOSE_TIMEOUT_S) as closing:
                closing.shield = True
                try:
                    await self.secured_conn.close()
                except Exception:  # noqa: BLE001 - already broken
                    pass
            raise RawConnError("a frame could not be sent in time")
    await trio.lowlevel.checkpoint()


def make_frame_writes_whole() -> None:
    """Install the whole-frame write on py-libp2p's Yamux (idempotent)."""
    Yamux._write_frame = _write_frame_whole  # type: ignore[method-assign]


class ReceiveWindowExceeded(RawConnError):
    """A peer wrote past the receive window a stream granted it (a protocol error, as go-yamux has it)."""


class _WindowedBuffer(bytearray):
    """One stream's receive buffer: refuses bytes past the window its node granted (``target_recv_window``,
    which every grant keeps the window and the unread bytes within)."""

    def __init__(self, conn: Yamux, stream_id: int) -> None:
        super().__init__()
        self.conn = conn
        self.stream_id = stream_id

    def extend(self, data: object) -> None:
        size = len(data)  # type: ignore[arg-type]
        stream = self.conn.streams.get(self.stream_id)
        window = max(DEFAULT_WINDOW_SIZE, getattr(stream, "target_recv_window", 0))
        if len(self) + size > window:
            raise ReceiveWindowExceeded(f"{len(self) + size} bytes buffered, over the window of {window}")
        held = sum(len(buffer) for buffer in self.conn.stream_buffers.values())
        if held + size > MAX_CONNECTION_BUFFERED:
            raise ReceiveWindowExceeded(f"{held + size} bytes buffered on the connection, over its bound")
        super().extend(data)  # type: ignore[arg-type]


class _StreamBuffers(dict[int, bytearray]):
    """``Yamux.stream_buffers``, each new stream's buffer a :class:`_WindowedBuffer`."""

    def __init__(self, conn: Yamux) -> None:
        super().__init__()
        self.conn = conn

    def __setitem__(self, stream_id: int, buffer: bytearray) -> None:
        if not isinstance(buffer, _WindowedBuffer):
            bounded = _WindowedBuffer(self.conn, stream_id)
            bytearray.extend(bounded, buffer)
            buffer = bounded
        super().__setitem__(stream_id, buffer)


_original_init = Yamux.__init__


def _init_bounded(self: Yamux, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    self.stream_buffers = _StreamBuffers(self)


def bound_receive_buffers() -> None:
    """Bound every Yamux stream's receive buffer by its window (idempotent); see the module's docstring."""
    Yamux.__init__ = _init_bounded  # type: ignore[method-assign]
