"""``/clawnode/layers/1.0.0``: a lease holder's ggml-rpc bytes, carried over libp2p to the seller's layer server.

Consumer: :func:`open_tunnel` listens on a loopback port that only this process's own sockets may
use (each connection's peer socket must be one of ours: checked in ``/proc``), and carries each
connection its engine makes over a stream of its own to the seller, after a first frame naming the
lease and its access token. Seller: :class:`LayerSeller` admits a stream through
``protocols.machines.layers.tunnel_verdict``, starts the lease's RPC server process at its first
tunnel (``runtime.split.server``: sandboxed, reachable only through its unix socket), pipes the
stream to it, and meters what passes (``runtime.split.meter``: bytes each way, graph computations,
tokens through its layers), handed to ``on_usage`` when each tunnel ends. A server that dies ends
its lease (``on_lost``); the node goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.stream.net_stream import StreamState
from libp2p.peer.id import ID
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH, NoisePacketReadWriter
from libp2p.stream_muxer.yamux.yamux import (
    HEADER_SIZE as YAMUX_HEADER_SIZE,
)
from libp2p.stream_muxer.yamux.yamux import (
    MAX_MESSAGE_SIZE,
    TYPE_DATA,
    YAMUX_HEADER_FORMAT,
    YamuxStream,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocols.lease.base import Ticket, token_digest
from protocols.lease.handler import LeaseMarket
from protocols.machines.layers import LayerLeaseFacts, tunnel_verdict
from runtime.errors import ClawnodeError, ErrorCode, Reason
from runtime.split.meter import REPLY_HEADER, REQUEST_HEADER, MessageEdges, RpcMeter
from runtime.split.server import RpcServerProcess, open_server_connection
from wire.framing import FrameReader, write_frame
from wire.rpc import error_reply
from wire.streams import open_stream
from wire.yamux_window import WindowedReader

LAYERS_PROTOCOL = TProtocol("/clawnode/layers/1.0.0")
MAX_OPEN_FRAME = 4096
OPEN_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0  # closing both ends of a tunnel, shielded from the caller's cancellation
# The most a tunnel reads or writes at a time: one Yamux DATA frame in one Noise message (64 KiB would
# be a frame over Yamux's 64 KiB bound and a Noise message over its own: three messages, two frames).
CHUNK = MAX_PLAINTEXT_LENGTH - YAMUX_HEADER_SIZE
COALESCE_S = 0.01  # the longest a tunnel waits for the rest of a message before it writes what it has
MAX_TUNNELS_PER_LEASE = 4
MAX_SERVERS = 2
MAX_LEASES = 256  # leases remembered beside the market's (their servers, tunnels, usage)
BILL_EVERY_S = 0.5  # the tokens a tunnel ran are billed this often, and when it ends
NOT_OURS = "not_our_socket"
SET_TENSOR = 6  # ggml-rpc's RPC_CMD_SET_TENSOR: no reply, the engine goes on to its next request at once
# Requests a tunnel may hold back until the engine's next one (within COALESCE_S): the engine waits for
# nothing after them, and the server gains nothing from them alone before the graph that reads them.
HELD_COMMANDS = frozenset({SET_TENSOR})


@dataclass
class RequestBatch(MessageEdges):
    """The consumer's requests, read as :class:`MessageEdges` reads them, plus which command the last
    whole one was: a request that waits for no reply (``HELD_COMMANDS``) is held, so a token's many
    small ``SET_TENSOR`` requests (its inputs, a few per layer) cross together with the graph that
    reads them, one frame where each would cost its own, through Python, on both peers."""

    header: int = REQUEST_HEADER
    hold: frozenset[int] = HELD_COMMANDS
    last: int = -1  # the command of the message begun or ended last

    @property
    def held(self) -> bool:
        """May what was read wait for the engine's next request?"""
        return self.last in self.hold

    def header_read(self, head: bytearray) -> None:
        self.last = head[0]


def _waits(edges: MessageEdges) -> bool:
    """Should a tunnel read on before it writes: a message begun and not whole, or a held request?"""
    return edges.partial or (isinstance(edges, RequestBatch) and edges.held)


class TunnelOpen(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lease_id: str = Field(min_length=1, max_length=128)
    token: str = Field(min_length=1, max_length=256)


class TunnelReady(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ok: bool = True


@dataclass
class LayerUsage:
    """What one lease's tunnels carried, all of them together."""

    bytes_up: int = 0
    bytes_down: int = 0
    graphs: int = 0
    tokens: int = 0
    tunnels: int = 0

    def add(self, meter: RpcMeter) -> None:
        self.bytes_up += meter.bytes_up
        self.bytes_down += meter.bytes_down
        self.graphs += meter.graphs
        self.tokens += meter.tokens
        self.tunnels += 1


@dataclass
class LayerLease:
    lease_id: str
    consumer: str
    token_sha256: str
    ends_at: float
    ended: bool = False
    tunnels: int = 0
    server: RpcServerProcess | None = None
    usage: LayerUsage = field(default_factory=LayerUsage)

    def facts(self) -> LayerLeaseFacts:
        return LayerLeaseFacts(
            consumer=self.consumer,
            token_sha256=self.token_sha256,
            ends_at=self.ends_at,
            ended=self.ended,
            tunnels=self.tunnels,
            has_server=self.server is not None and self.server.alive,
        )


async def _pump(
    read: Callable[[int], Awaitable[bytes]],
    write: Callable[[bytes], Awaitable[None]],
    count: Callable[[bytes], None],
    edges: MessageEdges | None = None,
) -> None:
    """Carries one direction. With ``edges`` (reading a socket, whose reads may be cancelled without
    losing bytes) a message begun is read whole, up to ``CHUNK`` and within ``COALESCE_S``, and
    written in one go: one yamux frame and one Noise message where the engine's three writes would
    each cost both, through Python, on both peers. The far end cannot act on part of a message, so
    the wait costs nothing; a reading that misjudges an edge is bounded by ``COALESCE_S``. A
    :class:`RequestBatch` also reads on past a whole request that waits for no reply, so the next ones
    join it in the same write."""
    while True:
        chunk = await read(CHUNK)
        if not chunk:
            return
        count(chunk)
        ended = False
        if edges is not None:
            edges.feed(chunk)
            if _waits(edges) and len(chunk) < CHUNK:
                parts = [chunk]
                size = len(chunk)
                with trio.move_on_after(COALESCE_S):
                    while _waits(edges) and size < CHUNK:
                        more = await read(CHUNK - size)
                        if not more:
                            ended = True
                            break
                        count(more)
                        edges.feed(more)
                        parts.append(more)
                        size += len(more)
                chunk = b"".join(parts)
        await write(chunk)
        if ended:
            return


RECEIVE_BYTES = 1 << 17  # a buffered Noise reader takes up to this much from its socket at a time


def _buffer_noise_reads(stream: INetStream) -> None:
    """Reads the Noise messages of ``stream``'s connection from a buffer (an adapter on py-libp2p 0.8.1).

    Its ``NoisePacketReadWriter.read_msg`` reads a message's 2-byte length and then its body, each a
    socket read under the raw stream's lock: two syscalls and four trio task switches a Yamux frame,
    on both peers. Here one socket read takes whatever has arrived (often the whole frame, or several)
    and each message is cut from the buffer, without a switch while one is there. Only the connection's
    Yamux reader reads it (the handshake is over), so the lock guarded nothing. A broken socket and an
    end of stream raise what the original raises (``ConnectionClosedError``, ``IncompleteReadError``),
    which end the connection the same way. Installed once per connection, the first time one of its
    streams carries a tunnel (the other protocols on it read the same bytes as before); a connection of
    another kind (not Noise over TCP) is left as it is."""
    try:
        packets = stream.muxed_conn.secured_conn.conn.read_writer  # type: ignore[attr-defined]
        raw = packets.read_write_closer.stream
    except AttributeError:
        return
    if (
        not isinstance(packets, NoisePacketReadWriter)
        or not isinstance(raw, TrioTCPStream)
        or getattr(packets, "_buffered_reads", False)
    ):
        return
    sock = raw.stream
    buffer = bytearray()

    async def read_msg() -> bytes:
        while True:
            if len(buffer) >= 2:
                size = int.from_bytes(buffer[:2], "big")
                if len(buffer) >= 2 + size:
                    message = bytes(buffer[2 : 2 + size])
                    del buffer[: 2 + size]
                    return message
            try:
                chunk = await sock.receive_some(RECEIVE_BYTES)
            except trio.BrokenResourceError as error:
                raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}", transport="tcp") from error
            except trio.ClosedResourceError:
                chunk = b""
            if not chunk:
                raise IncompleteReadError("the connection closed mid-message", 2, len(buffer))
            buffer.extend(chunk)

    packets.read_msg = read_msg  # type: ignore[method-assign]
    packets._buffered_reads = True  # type: ignore[attr-defined]


_WRITABLE = frozenset({StreamState.INIT, StreamState.OPEN, StreamState.CLOSE_READ})  # as NetStream.write allows


def _stream_writer(stream: INetStream) -> Callable[[bytes], Awaitable[None]]:
    """Writes a tunnel's stream: a chunk that fits the peer's window goes out as one Yamux DATA frame
    through the connection's frame writer, as ``YamuxStream.write`` sends it, without the stream's
    three locks (its state, writers and window: one task switch each). The tunnel's pump is the
    stream's only writer, and trio runs the window's check and debit with no await between, so none
    of them guards anything here. A chunk over the window or the frame size, a closing stream or
    another muxer's takes ``write`` as before."""
    muxed = getattr(stream, "muxed_stream", None)
    if not isinstance(muxed, YamuxStream):
        return stream.write

    async def write(data: bytes) -> None:
        if (
            len(data) > MAX_MESSAGE_SIZE - YAMUX_HEADER_SIZE
            or muxed.send_window < len(data)
            or muxed.send_closed
            or muxed.closed
            or getattr(stream, "_state", None) not in _WRITABLE
        ):
            await stream.write(data)
            return
        muxed.send_window -= len(data)
        header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, muxed.stream_id, len(data))
        await muxed.conn._write_frame(header + data)

    return write


async def _socket_read(sock: trio.SocketStream, size: int) -> bytes:
    try:
        return await sock.receive_some(size)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return b""


async def _splice(
    stream: INetStream,
    sock: trio.SocketStream,
    from_stream: Callable[[bytes], None],
    from_socket: Callable[[bytes], None],
    socket_edges: MessageEdges | None = None,
) -> None:
    """Both directions until either side ends; then both are closed, also when the caller is cancelled
    (a consumer's tunnel endpoint closing under a call): a stream left open would keep the seller's
    tunnel, and its lease's server, waiting for the connection's end."""
    _buffer_noise_reads(stream)
    try:
        async with trio.open_nursery() as nursery:

            async def one_way(pump: Awaitable[None]) -> None:
                with contextlib.suppress(Exception):
                    await pump
                nursery.cancel_scope.cancel()

            nursery.start_soon(one_way, _pump(WindowedReader(stream).read, sock.send_all, from_stream))
            nursery.start_soon(
                one_way, _pump(lambda n: _socket_read(sock, n), _stream_writer(stream), from_socket, socket_edges)
            )
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT_S) as cleanup:
            cleanup.shield = True
            with contextlib.suppress(Exception):
                await sock.aclose()
            try:
                await stream.close()
            except Exception:  # noqa: BLE001 - a stream that cannot close cleanly is reset
                with contextlib.suppress(Exception):
                    await stream.reset()


class LayerSeller:
    """The seller's side: layer leases it granted, their servers and tunnels."""

    def __init__(
        self,
        host: IHost,
        *,
        clock: Callable[[], float] = time.time,
        threads: int = 1,
        memory_bytes: int | None = None,
        sandbox: bool = True,
        max_servers: int = MAX_SERVERS,
        on_usage: Callable[[str, RpcMeter], Awaitable[None]] | None = None,
        on_lost: Callable[[str], Awaitable[None]] | None = None,
        facts: Callable[[str], LayerLeaseFacts | None] | None = None,
        bill: Callable[[str, int], Awaitable[None]] | None = None,
        cache_root: Path | None = None,
        cache_bytes: int | None = None,
    ) -> None:
        self.host = host
        self.clock = clock
        self.threads = threads
        self.memory_bytes = memory_bytes
        self.sandbox = sandbox
        self.max_servers = max_servers
        self.on_usage = on_usage
        self.on_lost = on_lost
        # Where the leases come from: the market's (``market_facts``), else those granted here.
        self.facts = facts
        # Bills the tokens a lease's tunnel ran, as they run (``market_billing``); a refusal cuts it.
        self.bill = bill
        self.leases: dict[str, LayerLease] = {}
        # Where each consumer's servers keep uploaded tensors (ggml-rpc's cache; one folder a consumer),
        # and that root's bound in bytes (runtime.split.server); None: no cache.
        self.cache_root = cache_root
        self.cache_bytes = cache_bytes

    def mount(self) -> None:
        self.host.set_stream_handler(LAYERS_PROTOCOL, self._handle)

    def grant(self, lease_id: str, consumer: str, token: str, ends_at: float) -> LayerLease:
        lease = LayerLease(lease_id, consumer, token_digest(token), ends_at)
        self.leases[lease_id] = lease
        return lease

    async def end(self, lease_id: str) -> None:
        lease = self.leases.get(lease_id)
        if lease is None:
            return
        lease.ended = True
        if lease.server is not None:
            await trio.to_thread.run_sync(lease.server.stop)
            lease.server = None

    async def aclose(self) -> None:
        for lease_id in list(self.leases):
            await self.end(lease_id)

    def summary(self, limit: int = 16) -> list[dict[str, Any]]:
        """The layer leases this node serves, newest first (status, dashboard): whose, how busy, what
        their layers ran so far. Lease ids and peer ids are shortened; nothing else identifies them."""
        views = []
        for lease in reversed(list(self.leases.values())[-limit:]):
            alive = lease.server is not None and lease.server.alive
            views.append(
                {
                    "lease_id": lease.lease_id[:12],
                    "consumer": lease.consumer[-8:],
                    "state": "ended" if lease.ended else "serving" if alive else "idle",
                    "tunnels": lease.tunnels,
                    "tokens": lease.usage.tokens,
                    "bytes": lease.usage.bytes_up + lease.usage.bytes_down,
                }
            )
        return views

    def _lease(self, lease_id: str) -> tuple[LayerLease | None, LayerLeaseFacts | None]:
        """The lease's local state (its server, tunnels, usage) and the facts the rule reads."""
        lease = self.leases.get(lease_id)
        if self.facts is None:
            return lease, lease.facts() if lease is not None else None
        outside = self.facts(lease_id)
        if outside is None:
            return None, None
        if lease is None:
            if len(self.leases) >= MAX_LEASES:
                self._forget_idle()
            lease = LayerLease(lease_id, outside.consumer, outside.token_sha256, outside.ends_at)
            self.leases[lease_id] = lease
        mine = lease.facts()
        return lease, dataclasses.replace(
            outside, ended=outside.ended or lease.ended, tunnels=mine.tunnels, has_server=mine.has_server
        )

    async def _lost_if_dead(self, lease: LayerLease | None) -> None:
        """A lease whose server died (a crash, a limit, a kill) ends; the node goes on. Seen when one
        of its tunnels ends or the next one asks to open."""
        if lease is None or lease.ended or lease.server is None or lease.server.alive:
            return
        await self.end(lease.lease_id)
        if self.on_lost is not None:
            await self.on_lost(lease.lease_id)

    async def _reap(self) -> None:
        """Servers of leases that ended outside (revoked, expired, spent: the market's facts) stop, so
        they no longer count against ``max_servers``: a consumer that renews its lease gets a server
        for the new one."""
        if self.facts is None:
            return
        now = self.clock()
        for lease in list(self.leases.values()):
            if lease.ended or lease.server is None or not lease.server.alive:
                continue
            outside = self.facts(lease.lease_id)
            if outside is None or outside.ended or now >= outside.ends_at:
                await self.end(lease.lease_id)

    def _forget_idle(self) -> None:
        for lease_id, lease in list(self.leases.items()):
            if lease.tunnels == 0 and (lease.server is None or not lease.server.alive):
                del self.leases[lease_id]

    def _servers(self) -> int:
        return sum(1 for lease in self.leases.values() if lease.server is not None and lease.server.alive)

    async def _server_of(self, lease: LayerLease) -> RpcServerProcess:
        if lease.server is not None and lease.server.alive:
            return lease.server
        kwargs: dict[str, Any] = {"memory_bytes": self.memory_bytes} if self.memory_bytes else {}
        if self.cache_root is not None:
            kwargs |= {"cache_root": self.cache_root, "consumer": lease.consumer}
            if self.cache_bytes:
                kwargs["cache_bytes"] = self.cache_bytes
        server = RpcServerProcess(threads=self.threads, sandbox=self.sandbox, **kwargs)
        lease.server = server
        server.spawn()  # on the event loop's thread, which outlives the server (see spawn)
        await trio.to_thread.run_sync(server.wait_ready)
        return server

    async def _handle(self, stream: INetStream) -> None:
        remote = str(stream.muxed_conn.peer_id)
        reader = FrameReader(stream, max_frame=MAX_OPEN_FRAME)
        lease: LayerLease | None = None
        try:
            try:
                opened = TunnelOpen.model_validate_json(await reader.read_frame(OPEN_TIMEOUT_S))
                await self._lost_if_dead(self.leases.get(opened.lease_id))
                if self._servers() >= self.max_servers:
                    await self._reap()
                lease, facts = self._lease(opened.lease_id)
                verdict = tunnel_verdict(
                    facts,
                    remote=remote,
                    token_sha256=token_digest(opened.token),
                    now=self.clock(),
                    max_tunnels=MAX_TUNNELS_PER_LEASE,
                    servers=self._servers(),
                    max_servers=self.max_servers,
                )
                if verdict is not None:
                    lease = None
                    raise verdict.error()
                assert lease is not None
                lease.tunnels += 1
                server = await self._server_of(lease)
                sock = await open_server_connection(server.socket_path)
            except (ClawnodeError, ValidationError, OSError) as error:
                if lease is not None:  # admitted: its slot is free again, whether or not the reply leaves
                    lease.tunnels -= 1
                await write_frame(stream, error_reply(error).model_dump_json().encode(), max_frame=MAX_OPEN_FRAME)
                await stream.close()
                return
            try:
                await write_frame(stream, TunnelReady().model_dump_json().encode(), max_frame=MAX_OPEN_FRAME)
            except BaseException:  # the consumer left while its server started: the tunnel never began
                lease.tunnels -= 1
                with trio.CancelScope(shield=True):
                    await sock.aclose()
                raise
            meter = RpcMeter()
            billed = 0

            async def settle() -> None:
                nonlocal billed
                due = meter.tokens - billed
                if due > 0 and self.bill is not None:
                    billed += due
                    await self.bill(lease.lease_id, due)

            try:
                async with trio.open_nursery() as nursery:

                    async def billing() -> None:
                        try:
                            while True:
                                await trio.sleep(BILL_EVERY_S)
                                await settle()
                        except ClawnodeError:  # refused (budget, ended): the tunnel is cut
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(billing)
                    await _splice(
                        stream, sock, meter.up, lambda chunk: meter.down(len(chunk)), MessageEdges(REPLY_HEADER)
                    )
                    nursery.cancel_scope.cancel()
            finally:
                lease.tunnels -= 1
                lease.usage.add(meter)
                with trio.CancelScope(shield=True):
                    with contextlib.suppress(ClawnodeError):
                        await settle()
                    if self.on_usage is not None:
                        await self.on_usage(lease.lease_id, meter)
                    await self._lost_if_dead(lease)
        except Exception:  # noqa: BLE001 - a tunnel's failure is the tunnel's, never the node's
            with contextlib.suppress(Exception):
                await stream.reset()


def _socket_inode(local_port: int, remote_port: int) -> str | None:
    """The inode of the loopback TCP socket from ``local_port`` to ``remote_port`` (Linux)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines, None)
                for line in lines:
                    parts = line.split()
                    if len(parts) < 10:
                        continue
                    if (
                        int(parts[1].rsplit(":", 1)[1], 16) == local_port
                        and int(parts[2].rsplit(":", 1)[1], 16) == remote_port
                    ):
                        return parts[9]
        except OSError:
            continue
    return None


def own_socket(peer_port: int, listen_port: int, pids: Iterable[int] = ()) -> bool:
    """Is the client end of a connection to our ``listen_port`` (from ``peer_port``) a socket of this
    process, or of one of ``pids`` (its own worker processes)?"""
    inode = _socket_inode(peer_port, listen_port)
    if inode is None:
        return not os.path.exists("/proc/net/tcp")  # no /proc: nothing to check against
    target = f"socket:[{inode}]"
    for pid in ("self", *(str(p) for p in pids)):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return True
    return False


@dataclass
class LocalTunnel:
    """The consumer's end of one layer lease: the engine names ``endpoint`` as its RPC server."""

    endpoint: str
    meter_total: LayerUsage = field(default_factory=LayerUsage)  # of the connections that ended
    live: list[RpcMeter] = field(default_factory=list)  # of those open now
    refused: int = 0

    def bytes_moved(self) -> int:
        """Bytes both ways so far, open connections included."""
        total = self.meter_total.bytes_up + self.meter_total.bytes_down
        return total + sum(m.bytes_up + m.bytes_down for m in self.live)

    def tokens(self) -> int:
        """Tokens the seller's layers ran through this tunnel so far, open connections included."""
        return self.meter_total.tokens + sum(meter.tokens for meter in self.live)


async def _carry(
    host: IHost,
    peer: ID,
    opened: TunnelOpen,
    sock: trio.SocketStream,
    tunnel: LocalTunnel,
    listen_port: int,
    on_tokens: Callable[[int], None] | None,
    clients: Callable[[], Iterable[int]] | None,
    private: bool = False,
) -> None:
    stream: INetStream | None = None
    try:
        peer_port = sock.socket.getpeername()[1]
        pids = list(clients()) if clients is not None else []
        if not private and not await trio.to_thread.run_sync(own_socket, peer_port, listen_port, pids):
            tunnel.refused += 1
            await sock.aclose()
            return
        stream = await open_stream(host, peer, [LAYERS_PROTOCOL])
        await write_frame(stream, opened.model_dump_json().encode(), max_frame=MAX_OPEN_FRAME)
        reply = await FrameReader(stream, max_frame=MAX_OPEN_FRAME).read_frame(OPEN_TIMEOUT_S)
        try:
            TunnelReady.model_validate_json(reply)
        except ValidationError:  # an error reply: refused
            tunnel.refused += 1
            await stream.close()
            await sock.aclose()
            return
        meter = RpcMeter()
        tunnel.live.append(meter)

        def sent(chunk: bytes) -> None:
            before = meter.tokens
            meter.up(chunk)
            if on_tokens is not None and meter.tokens > before:
                on_tokens(meter.tokens - before)  # counted before the seller's receipt can ask for them

        try:
            await _splice(stream, sock, lambda chunk: meter.down(len(chunk)), sent, RequestBatch())
        finally:
            tunnel.live.remove(meter)
            tunnel.meter_total.add(meter)
    except Exception:  # noqa: BLE001 - the engine sees its connection close
        with contextlib.suppress(Exception):
            await sock.aclose()
        if stream is not None:  # and the seller its stream's (no answer in time, a failed write)
            with contextlib.suppress(Exception):
                await stream.reset()


@contextlib.asynccontextmanager
async def open_tunnel(
    host: IHost,
    peer: ID,
    lease_id: str,
    token: str,
    on_tokens: Callable[[int], None] | None = None,
    clients: Callable[[], Iterable[int]] | None = None,
    listener: trio.SocketListener | None = None,
) -> AsyncIterator[LocalTunnel]:
    """A loopback endpoint whose connections reach the seller's layer server for ``lease_id``;
    ``on_tokens`` hears of the tokens the seller's layers ran (``market_counting``); ``clients``:
    the pids of this node's worker processes that may connect too (``runtime.split.worker``)."""
    private = listener
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]
    tunnel = LocalTunnel(endpoint=f"127.0.0.1:{port}")
    opened = TunnelOpen(lease_id=lease_id, token=token)
    try:
        async with trio.open_nursery() as nursery:

            async def accept() -> None:
                while True:
                    sock = await listener.accept()
                    sock.setsockopt(6, 1, 1)  # TCP_NODELAY: the RPC protocol is request and reply
                    nursery.start_soon(_carry, host, peer, opened, sock, tunnel, port, on_tokens, clients)

            async def accept_private() -> None:
                assert private is not None
                while True:
                    sock = await private.accept()
                    sock.setsockopt(6, 1, 1)
                    nursery.start_soon(_carry, host, peer, opened, sock, tunnel, port, on_tokens, clients, True)

            nursery.start_soon(accept)
            if private is not None:
                nursery.start_soon(accept_private)
            try:
                yield tunnel
            finally:
                nursery.cancel_scope.cancel()
                # Shielded: in the cancelled scope an unshielded await would raise Cancelled in place
                # of the block's own exception, and the nursery would swallow both.
                with trio.CancelScope(shield=True):
                    await listener.aclose()
    except BaseExceptionGroup as group:
        # The block's own exception comes out as it went in, not wrapped by the tunnel's nursery.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def layers_capability(sha256: str) -> str:
    """The capability that sells layer capacity for one GGUF file: ``layers:<sha256>``."""
    return f"layers:{sha256}"


def layer_request_schema(layers: int, memory_mb: int) -> dict[str, Any]:
    """What a lease of layer capacity may ask: at most ``layers`` layers of the file, within
    ``memory_mb`` of the seller's memory. The record states the capacity here."""
    return {
        "type": "object",
        "properties": {
            "layers": {"type": "integer", "minimum": 1, "maximum": layers},
            "memory_mb": {"type": "integer", "minimum": 0, "maximum": memory_mb},
        },
        "additionalProperties": False,
    }


LAYER_REPLY_SCHEMA: dict[str, Any] = {"type": "object", "description": "ggml-rpc over /clawnode/layers/1.0.0"}


def layer_offer_fields(
    model_offers: list[dict[str, Any]], capacity: dict[str, tuple[int, int]], price_per_token: int = 0
) -> list[dict[str, Any]]:
    """A ``layers:<sha256>`` offer per file among the node's model offers whose ``capacity`` (sha256
    -> (layers, memory MB)) is known, priced ``price_per_token`` per token its layers run (0: the
    model's own price per token)."""
    offers: dict[str, dict[str, Any]] = {}
    for offer in model_offers:
        sha256 = str(offer.get("sha256") or "")
        if not sha256 or sha256 not in capacity or sha256 in offers:
            continue
        layers, memory_mb = capacity[sha256]
        offers[sha256] = {
            "name": layers_capability(sha256),
            "summary": f"up to {layers} layers of {offer['name']}'s file, {memory_mb} MB",
            "unit": "token",
            "price_per_unit": price_per_token or int(offer.get("price_per_unit", 0)),
            "sha256": sha256,
            "params_schema": layer_request_schema(layers, memory_mb),
            "returns": LAYER_REPLY_SCHEMA,
            "examples": [{"layers": layers, "memory_mb": memory_mb}],
        }
    return list(offers.values())


class LayerService:
    """What a ``layers:<sha256>`` capability answers on ``/clawnode/infer/1.0.0``: nothing. Its lease
    is used over ``/clawnode/layers/1.0.0``; registered so the market quotes and grants it."""

    async def run(self, body: dict[str, Any], emit: Callable[[dict[str, Any]], Awaitable[None]]) -> Any:
        raise ClawnodeError(
            ErrorCode.INVALID_ARGUMENT, "a layers lease is used over /clawnode/layers/1.0.0, not for calls"
        )


def layer_capacity_of(model_host: Any) -> dict[str, tuple[int, int]]:
    """sha256 -> (layers, memory MB) of each model ``model_host`` loaded: its GGUF's block count, and
    its file's size as the memory all its layers take at most."""
    capacity: dict[str, tuple[int, int]] = {}
    for name, sha256 in model_host.sha256s.items():
        model = model_host.get(name)
        if not sha256 or model is None:
            continue
        metadata = getattr(model, "metadata", {}) or {}
        try:
            layers = int(metadata.get(f"{metadata.get('general.architecture', '')}.block_count", "0"))
        except ValueError:
            continue
        with contextlib.suppress(OSError):
            if layers >= 1:
                capacity[sha256] = (layers, max(1, os.path.getsize(model.path) >> 20))
    return capacity


def register_layer_services(model_host: Any, services: Any) -> None:
    """Register ``layers:<sha256>`` (a ServiceRegistry's) for each file ``model_host`` loaded, so the
    market quotes and grants its leases."""
    for sha256 in layer_capacity_of(model_host):
        services.register(layers_capability(sha256), LayerService())


def layer_capacity(descriptor_schema: dict[str, Any]) -> tuple[int, int] | None:
    """(layers, memory MB) a ``layers:<sha256>`` record's params_schema states, or None."""
    try:
        properties = descriptor_schema["properties"]
        return int(properties["layers"]["maximum"]), int(properties["memory_mb"]["maximum"])
    except (KeyError, TypeError, ValueError):
        return None


def market_facts(market: LeaseMarket) -> Callable[[str], LayerLeaseFacts | None]:
    """Tunnels on the leases the market serves: their consumer, token, expiry and end."""

    def facts(lease_id: str) -> LayerLeaseFacts | None:
        served = market.served.get(lease_id)
        if served is None:
            return None
        grant = served.grant
        return LayerLeaseFacts(
            consumer=grant.consumer,
            token_sha256=grant.token_sha256,
            ends_at=float(grant.expires_at),
            ended=served.ended_reason is not None,
        )

    return facts


def market_billing(market: LeaseMarket) -> Callable[[str, int], Awaitable[None]]:
    """Bills tokens a tunnel ran on its lease as a call of that many units: reserved within the
    budget (refused: the tunnel is cut), written to the ledger, metered; receipts, countersignatures
    and escrow claims follow as for every call."""

    async def bill(lease_id: str, units: int) -> None:
        served = market.served.get(lease_id)
        if served is None or served.ended_reason is not None:
            raise ClawnodeError(ErrorCode.FORBIDDEN, "the layer lease has ended", Reason.ENDED)
        plan = served.session.reserve(market.clock(), {"max_tokens": units})
        ticket = Ticket(served=served, reserved=plan.reserve)
        try:
            call_id = secrets.token_hex(12)
            await market.ledger.reserve_call(lease_id, call_id, reserved_units=plan.reserve)
            ticket.call_id = call_id
        finally:
            await market._meter(lease_id, ticket, units if ticket.call_id is not None else 0)

    return bill


def market_counting(market: LeaseMarket, lease_id: str) -> Callable[[int], None]:
    """The consumer's count of a layer lease's units: what its tunnels saw the seller's layers run,
    which is what it countersigns receipts for."""

    def count(tokens: int) -> None:
        held = market.held.get(lease_id)
        if held is not None:
            held.seen_units += tokens

    return count


__all__ = [
    "LAYERS_PROTOCOL",
    "LAYER_REPLY_SCHEMA",
    "LayerSeller",
    "LayerService",
    "LayerUsage",
    "LocalTunnel",
    "layer_capacity",
    "layer_capacity_of",
    "layer_offer_fields",
    "layer_request_schema",
    "layers_capability",
    "market_billing",
    "market_counting",
    "market_facts",
    "open_tunnel",
    "own_socket",
    "register_layer_services",
]
