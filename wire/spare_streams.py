"""Spare streams: one idle stream per peer, opened and negotiated ahead of the call that will use it.

Opening a libp2p stream costs two round trips of multistream-select (its header, then the protocol)
plus a Yamux window update a read, 2.8-4 ms of a call's time to first token on loopback. A caller
that expects to call a peer again (a consumer of a lease) parks one stream to it after a call
(``refill``) and ``take``s it for the next one, which then only writes its request.

A spare carries exactly one call, as a stream opened at that moment would: nothing of a call, its
lease or its signatures changes, only when the stream was negotiated. The peer may have written
to it before the request (it could as well right after a fresh stream's request): a spare whose
peer sent anything, closed or reset it is dropped, never used; so is one whose peer has another
connection now (a hole punch's direct path beside the relayed one). Bounded: ``per_peer`` spares a peer
(two: a call right after the last one finds the second while the first is replaced), ``max_peers``
peers (the longest unused closed first), each closed after ``idle_s`` unused: well
under the time a server gives a stream to send its request (the provider's
``CALL_READ_TIMEOUT_S``, 10 s), which takes a stream closed before its request as no failure.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from wire.streams import open_stream

log = logging.getLogger(__name__)

SPARE_IDLE_S = 4.0
SPARES_PER_PEER = 2  # a call that follows the last one at once finds the second while the first is replaced
MAX_SPARE_PEERS = 32
OPEN_TIMEOUT_S = 5.0
WAIT_FOR_SPARE_S = 1.0  # a call waits this long at most for a spare being opened, then opens its own
CLOSE_TIMEOUT_S = 1.0


def untouched(stream: INetStream) -> bool:
    """Open both ways, nothing received, not reset: as a freshly opened stream would be."""
    muxed = getattr(stream, "muxed_stream", None)
    if muxed is None:
        return False
    if any(getattr(muxed, flag, True) for flag in ("closed", "send_closed", "recv_closed", "reset_received")):
        return False
    conn = getattr(muxed, "conn", None)
    buffers = getattr(conn, "stream_buffers", None)
    shutting_down = getattr(conn, "event_shutting_down", None)
    if buffers is None or shutting_down is None or shutting_down.is_set():
        return False
    buffer = buffers.get(getattr(muxed, "stream_id", None))
    return buffer is not None and not buffer


def on_the_only_connection(host: IHost, peer: ID, stream: INetStream) -> bool:
    """The stream rides the peer's only open connection, so a stream opened now would ride it too. A
    peer with several (a relayed one and a punched direct one, a redial) gets a stream opened now:
    the swarm picks among them, and the circuit may be on its way out."""
    conns = [conn for conn in host.get_network().get_connections(peer) if not conn.is_closed]
    return len(conns) == 1 and conns[0].muxed_conn is stream.muxed_conn


class SpareStreams:
    """Per peer, at most ``per_peer`` idle streams of ``protocols``; see the module's docstring."""

    def __init__(
        self,
        host: IHost,
        protocols: Sequence[TProtocol],
        *,
        idle_s: float = SPARE_IDLE_S,
        per_peer: int = SPARES_PER_PEER,
        max_peers: int = MAX_SPARE_PEERS,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.host = host
        self.protocols = list(protocols)
        self.idle_s = idle_s
        self.per_peer = per_peer
        self.max_peers = max_peers
        self.clock = clock
        # peer -> its spares (stream, parked at), oldest first; peers by their last refill, oldest first
        self._spares: dict[str, list[tuple[INetStream, float]]] = {}
        self._opening: dict[str, trio.Event] = {}  # peer -> set when its refill parked a spare or ended
        self._waiting: set[str] = set()  # peers a call is waiting for a spare of
        self.taken = 0  # calls that found a spare

    def __len__(self) -> int:
        return sum(len(spares) for spares in self._spares.values())

    def __bool__(self) -> bool:
        return bool(self._spares)

    def _pop(self, key: str) -> tuple[INetStream, float] | None:
        spares = self._spares.get(key)
        if not spares:
            return None
        parked = spares.pop(0)
        if not spares:
            del self._spares[key]
        return parked

    async def take(self, peer: ID) -> INetStream:
        """The peer's oldest spare that is fresh and untouched (waiting for one being opened, which is
        further along than a new one would be), otherwise a stream opened now."""
        key = str(peer)
        opening = self._opening.get(key)
        if opening is not None and key not in self._spares and key not in self._waiting:
            # One call waits for the stream being opened; calls beside it open their own at once.
            self._waiting.add(key)
            try:
                with trio.move_on_after(WAIT_FOR_SPARE_S):
                    await opening.wait()
            finally:
                self._waiting.discard(key)
        while (parked := self._pop(key)) is not None:
            stream, at = parked
            if (
                self.clock() - at < self.idle_s
                and untouched(stream)
                and on_the_only_connection(self.host, peer, stream)
            ):
                self.taken += 1
                return stream
            await _close(stream)
        return await open_stream(self.host, peer, self.protocols)

    async def refill(self, peer: ID) -> None:
        """Open and park spares for ``peer`` up to ``per_peer`` (one refill a peer at a time). Failures
        are quiet: the next call opens its own stream and reports what fails."""
        key = str(peer)
        if key in self._opening:
            return
        opened = self._opening[key] = trio.Event()
        try:
            with trio.move_on_after(OPEN_TIMEOUT_S):
                while len(self._spares.get(key, ())) < self.per_peer:
                    stream = await open_stream(self.host, peer, self.protocols)
                    spares = self._spares.pop(key, [])
                    spares.append((stream, self.clock()))
                    self._spares[key] = spares  # the peer moves to the newest end
                    opened.set()  # a call waiting for this peer's spare takes it now
                    while len(self._spares) > self.max_peers:
                        for old, _at in self._spares.pop(next(iter(self._spares))):
                            await _close(old)
        except Exception as error:  # noqa: BLE001 - any dial or negotiation failure: no spare
            log.debug("no spare stream to %s: %s", key, type(error).__name__)
        finally:
            del self._opening[key]
            opened.set()

    def stale(self) -> list[INetStream]:
        """Take out the spares idle for ``idle_s`` or more, or no longer usable; the caller closes them."""
        now = self.clock()
        gone: list[INetStream] = []
        for key in list(self._spares):
            keep = []
            for stream, at in self._spares[key]:
                if now - at < self.idle_s and untouched(stream):
                    keep.append((stream, at))
                else:
                    gone.append(stream)
            if keep:
                self._spares[key] = keep
            else:
                del self._spares[key]
        return gone

    async def close_stale(self) -> None:
        for stream in self.stale():
            await _close(stream)

    async def aclose(self) -> None:
        spares, self._spares = self._spares, {}
        for parked in spares.values():
            for stream, _at in parked:
                await _close(stream)


async def _close(stream: INetStream) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT_S) as scope, contextlib.suppress(Exception):
        scope.shield = True
        await stream.close()
