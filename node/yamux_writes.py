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
"""

from __future__ import annotations

import logging

import trio
from libp2p.network.connection.exceptions import RawConnError
from libp2p.stream_muxer.yamux.yamux import Yamux

log = logging.getLogger(__name__)

FRAME_WRITE_TIMEOUT_S = 30.0
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
