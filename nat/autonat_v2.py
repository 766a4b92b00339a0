"""AutoNAT v2 (libp2p specs, ``autonat/autonat-v2.md``): client and server, beside our own
``/clawnode/autonat/1.0.0`` (``nat.autonat``), so that js and go nodes, which speak only v2, can
measure their reachability with clawnode nodes and clawnode nodes with them.

Server (``/libp2p/autonat/2/dial-request``): reads one DialRequest, admits it or answers
E_REQUEST_REJECTED (``nat.autonat_v2_rules.admit``: at most ``max_running`` at once, ``max_per_minute``
in all, one per peer per ``peer_interval_s``), picks the one address it will dial
(``choose_target``: the first TCP address of an IP family it has, not private unless
``allow_private``, no ``/p2p/`` of another peer; none: E_DIAL_REFUSED). When that address's IP is
not the one the request came from, it first asks for 30,000 to 100,000 bytes of dial data
(DialDataRequest; the requester pays more than the dial costs, so nobody can use the server to
amplify against a third party) and reads them in DialDataResponses of at most 4,096 bytes each.
Then it dials that address from a throwaway identity on a fresh connection (never from its listen
port: no accidental hole punch), sends the nonce on ``/libp2p/autonat/2/dial-back``, waits for the
DialBackResponse, hangs up, and answers OK with the dial status (OK, E_DIAL_ERROR,
E_DIAL_BACK_ERROR). The whole request has a deadline; every message a size limit.

Client: :meth:`AutoNatV2.ask` sends one server the addresses and a fresh 64-bit nonce, pays dial
data up to ``client_max_dial_data`` (else it resets the stream), and counts an OK only when the
dial-back carrying that nonce did reach it (``outcome_of``). The check loop asks up to
``max_servers_per_check`` connected v2 servers, each about the address list rotated so that
different servers test different addresses first (a server dials only one), and keeps one verdict
per address (``judge_addr``: ``min_servers`` distinct servers decide). In the daemon that loop is
off: the node's own AutoNAT (``nat.autonat.AutoNat``, ``v2=``) asks the servers that speak only v2
through :meth:`AutoNatV2.ask_result`, and their answers count toward the node's reachability beside
v1 ones, so a node whose only servers are js or go nodes still learns it.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.network.config import RetryConfig
from libp2p.peer.id import ID

from nat.addresses import candidate_addrs as candidate_addrs_of
from nat.autonat import candidate_addrs, forget_dialed_peer, remote_ip
from nat.autonat_v2_rules import (
    DIAL_DATA_MAX,
    AddrVerdict,
    Outcome,
    Refused,
    accept_dial_data,
    admit,
    choose_target,
    dial_data_size,
    judge_addr,
    outcome_of,
    server_result_of,
)
from nat.autonat_v2_wire import (
    DIAL_BACK_OK,
    DIAL_BACK_PROTOCOL,
    DIAL_DATA_CHUNK,
    DIAL_REQUEST_PROTOCOL,
    MAX_DIAL_BACK_BYTES,
    MAX_MESSAGE_BYTES,
    DialDataRequest,
    DialDataResponse,
    DialRequest,
    DialResponse,
    DialStatus,
    Message,
    ResponseStatus,
    WireError,
    decode_dial_back,
    decode_dial_back_response,
    decode_message,
    encode_dial_back,
    encode_dial_back_response,
    encode_message,
)
from nat.reachability import ServerResult
from runtime.errors import ClawnodeError
from wire.framing import FrameReader, write_frame

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

MAX_DIAL_DATA_FRAMES = 1024  # 100,000 bytes in frames of 100 bytes on average at the least
MAX_PENDING_NONCES = 64  # requests of ours in flight
MAX_TRACKED_PEERS = 4096  # per-peer rate-limit entries kept
MAX_OUTCOMES_PER_ADDR = 16  # servers remembered per address


@dataclass(frozen=True)
class AutoNatV2Settings:
    allow_private: bool = False  # ask about and dial private and loopback addresses (tests, LANs)
    # server
    max_addrs: int = 8  # addresses of a request looked at
    max_running: int = 4  # requests served at once
    max_per_minute: int = 60  # requests served in any minute
    peer_interval_s: float = 30.0  # one request per peer per this many seconds
    request_timeout_s: float = 30.0  # one whole request, dial data and dial-back included
    dial_timeout_s: float = 5.0  # the dial-back's connection, then its nonce exchange
    # client
    client_max_dial_data: int = DIAL_DATA_MAX  # the most dial data we pay to one server
    min_servers: int = 3  # servers that must agree on an address
    distinct_by: Literal["ip", "peer"] = "ip"  # "peer" only for tests on loopback
    max_servers_per_check: int = 5
    check_interval_s: float = 300.0  # re-check period (0: no check loop; ask() still works)
    retry_interval_s: float = 30.0  # while some address is unknown


@dataclass(frozen=True)
class Answer:
    """What one server said about one request of ours."""

    server: str  # its peer id
    ip: str  # the IP we reached it at
    outcome: Outcome | Literal["declined", "error"]  # declined: we would not pay its dial data
    addr: str | None = None  # the address it dialed (reachable, unreachable, inconclusive)
    dial_data: int = 0  # bytes we paid


@dataclass
class ServerCounts:
    """What the server side did, for status and tests."""

    served: Counter[str] = field(default_factory=Counter)  # dial status or refusal reason -> count
    dial_data_requested: int = 0
    dial_data_received: int = 0
    dials: int = 0


class AutoNatV2:
    """Client and server of AutoNAT v2; start with ``await nursery.start(autonat_v2.run)``.

    ``build_dialer(n)`` returns a fresh host with a new identity and at most ``n`` connections for
    the dial-backs (the daemon passes ``node.host.build_dialer_host``); ``should_serve()`` says
    whether to serve now (the daemon: whenever ``/clawnode/autonat/1.0.0`` is served);
    ``own_addrs()`` the addresses to ask about (default: the host's listen and observed ones).
    """

    def __init__(
        self,
        host: IHost,
        settings: AutoNatV2Settings | None = None,
        *,
        build_dialer: Callable[[int], IHost],
        should_serve: Callable[[], bool] = lambda: True,
        own_addrs: Callable[[], list[str]] | None = None,
    ) -> None:
        self.host = host
        self.settings = settings or AutoNatV2Settings()
        self._build_dialer = build_dialer
        self._should_serve = should_serve
        self._own_addrs = own_addrs or (lambda: candidate_addrs_of(host))
        self._dialer: IHost | None = None
        self._serving = False
        self._running = 0
        self._last_by_peer: dict[str, float] = {}
        self._recent_starts: deque[float] = deque(maxlen=max(1, self.settings.max_per_minute))
        self._pending: dict[int, bool] = {}  # our nonces in flight -> whether their dial-back came
        self._outcomes: dict[str, dict[str, Outcome]] = {}  # address -> server key -> latest outcome
        self._round = 0
        self.counts = ServerCounts()
        self.answers: deque[Answer] = deque(maxlen=64)  # the latest answers we got, newest last

    @property
    def serving(self) -> bool:
        return self._serving

    # ---- lifecycle

    async def run(self, *, task_status: TaskStatus[AutoNatV2] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(DIAL_BACK_PROTOCOL, self._handle_dial_back)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._run_dialer)
                self._update_serving(nursery)
                nursery.start_soon(self._serve_loop, nursery)
                task_status.started(self)
                if self.settings.check_interval_s > 0:
                    await self._check_loop()
                else:
                    await trio.sleep_forever()
        finally:
            self.host.remove_stream_handler(DIAL_BACK_PROTOCOL)
            if self._serving:
                self.host.remove_stream_handler(DIAL_REQUEST_PROTOCOL)
                self._serving = False

    async def _run_dialer(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        dialer = self._build_dialer(max(8, self.settings.max_running * 2))
        dialer.get_network().retry_config = RetryConfig(max_retries=0)  # type: ignore[attr-defined]
        async with dialer.run([]):
            auto_connector = getattr(dialer.get_network(), "auto_connector", None)
            if auto_connector is not None:
                await auto_connector.stop()  # it dials only when asked
            self._dialer = dialer
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._dialer = None

    def _update_serving(self, nursery: trio.Nursery) -> None:
        want = self._dialer is not None and self._should_serve()
        if want == self._serving:
            return
        if want:
            self.host.set_stream_handler(DIAL_REQUEST_PROTOCOL, self._handle_dial_request)
        else:
            self.host.remove_stream_handler(DIAL_REQUEST_PROTOCOL)
        self._serving = want
        nursery.start_soon(self._push_identify)  # peers learn our protocols from identify

    async def _serve_loop(self, nursery: trio.Nursery) -> None:
        while True:
            await trio.sleep(1.0)
            self._update_serving(nursery)

    async def _push_identify(self) -> None:
        try:
            with trio.move_on_after(10):
                await push_identify_to_peers(self.host)
        except Exception as error:  # noqa: BLE001 - best effort; peers learn it on their next identify
            log.debug("identify push failed: %s", type(error).__name__)

    # ---- server

    async def _handle_dial_request(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        try:
            remote = stream.get_remote_address()
        except Exception:  # noqa: BLE001 - a stream with no socket underneath (relayed)
            remote = None
        observed_ip = str(remote[0]) if remote else ""
        reader = FrameReader(stream, max_frame=MAX_MESSAGE_BYTES)
        settings = self.settings
        try:
            with trio.fail_after(settings.request_timeout_s):
                request = decode_message(await reader.read_frame(settings.request_timeout_s))
                if not isinstance(request, DialRequest):
                    raise WireError("the first message is not a DialRequest")
                now = trio.current_time()
                refused = admit(
                    str(peer_id),
                    now,
                    last_by_peer=self._last_by_peer,
                    recent=self._recent_starts,
                    running=self._running,
                    peer_interval_s=settings.peer_interval_s,
                    max_per_minute=settings.max_per_minute,
                    max_running=settings.max_running,
                )
                target = refused or choose_target(
                    request.addrs,
                    requester=str(peer_id),
                    observed_ip=observed_ip,
                    families=self._families(),
                    allow_private=settings.allow_private,
                    max_addrs=settings.max_addrs,
                )
                if isinstance(target, Refused):
                    self.counts.served[target.reason] += 1
                    await self._send(stream, DialResponse(target.status))
                    await stream.close()
                    return
                self._note_request(str(peer_id), now)
                self._running += 1
                try:
                    if target.needs_dial_data:
                        await self._take_dial_data(stream, reader, target.index)
                    status = await self._dial_back(peer_id, target.addr, request.nonce)
                finally:
                    self._running -= 1
                self.counts.served[status.name.lower()] += 1
                await self._send(stream, DialResponse(ResponseStatus.OK, target.index, status))
                await stream.close()
        except (WireError, ClawnodeError, trio.TooSlowError, OSError) as error:
            self.counts.served["aborted"] += 1
            log.debug("AutoNAT v2 request from %s aborted: %s", peer_id, type(error).__name__)
            await _reset(stream)
        except Exception as error:  # noqa: BLE001 - a stream error from the peer's side (reset, closed)
            self.counts.served["aborted"] += 1
            log.debug("AutoNAT v2 request from %s failed: %s", peer_id, type(error).__name__)
            await _reset(stream)

    def _families(self) -> frozenset[int]:
        """The IP versions this node can dial: those of its own listen addresses (``::`` is both)."""
        found: set[int] = set()
        for addr in self.host.get_transport_addrs():
            text = str(addr)
            if text.startswith("/ip4/"):
                found.add(4)
            elif text.startswith("/ip6/"):
                found.add(6)
        return frozenset(found or {4})

    def _note_request(self, peer: str, now: float) -> None:
        self._recent_starts.append(now)
        self._last_by_peer[peer] = now
        if len(self._last_by_peer) > MAX_TRACKED_PEERS:
            cutoff = now - self.settings.peer_interval_s
            self._last_by_peer = {key: at for key, at in self._last_by_peer.items() if at >= cutoff}

    async def _take_dial_data(self, stream: INetStream, reader: FrameReader, index: int) -> None:
        """Ask for dial data and read it all, or raise (the request then ends without a dial)."""
        wanted = dial_data_size(random.random())
        self.counts.dial_data_requested += 1
        await self._send(stream, DialDataRequest(index, wanted))
        received = 0
        for _ in range(MAX_DIAL_DATA_FRAMES):
            message = decode_message(await reader.read_frame(self.settings.request_timeout_s))
            if not isinstance(message, DialDataResponse):
                raise WireError("expected a DialDataResponse")
            if len(message.data) > DIAL_DATA_CHUNK:
                raise WireError(f"dial data over {DIAL_DATA_CHUNK} bytes in one message")
            received += len(message.data)
            self.counts.dial_data_received += len(message.data)
            if received >= wanted:
                return
        raise WireError("too many dial data messages")

    async def _dial_back(self, peer_id: ID, addr: str, nonce: int) -> DialStatus:
        dialer = self._dialer
        if dialer is None:
            return DialStatus.DIAL_ERROR
        network = dialer.get_network()
        self.counts.dials += 1
        try:
            try:
                with trio.fail_after(self.settings.dial_timeout_s):
                    # This address only, from the throwaway identity: Noise fails unless the peer
                    # listening there is the requester itself.
                    await network.dial_addr(multiaddr.Multiaddr(addr), peer_id)
            except Exception:  # noqa: BLE001 - every failure to connect is E_DIAL_ERROR
                return DialStatus.DIAL_ERROR
            try:
                with trio.fail_after(self.settings.dial_timeout_s):
                    stream = await dialer.new_stream(peer_id, [DIAL_BACK_PROTOCOL])
                    try:
                        await write_frame(stream, encode_dial_back(nonce), max_frame=MAX_DIAL_BACK_BYTES)
                        reply = await FrameReader(stream, max_frame=MAX_DIAL_BACK_BYTES).read_frame(
                            self.settings.dial_timeout_s
                        )
                    finally:
                        await _close(stream)
                if decode_dial_back_response(reply) != DIAL_BACK_OK:
                    return DialStatus.DIAL_BACK_ERROR
            except Exception:  # noqa: BLE001 - connected, but the nonce did not get through
                return DialStatus.DIAL_BACK_ERROR
            return DialStatus.OK
        finally:
            await forget_dialed_peer(dialer, peer_id)

    @staticmethod
    async def _send(stream: INetStream, message: Message) -> None:
        await write_frame(stream, encode_message(message), max_frame=MAX_MESSAGE_BYTES)

    # ---- client

    async def _handle_dial_back(self, stream: INetStream) -> None:
        """A server dialing us back: answer OK to a nonce of ours, reset anything else."""
        try:
            with trio.fail_after(self.settings.dial_timeout_s):
                frame = await FrameReader(stream, max_frame=MAX_DIAL_BACK_BYTES).read_frame(
                    self.settings.dial_timeout_s
                )
                nonce = decode_dial_back(frame)
                if nonce not in self._pending:
                    raise WireError("no request of ours has this nonce")
                self._pending[nonce] = True
                await write_frame(stream, encode_dial_back_response(), max_frame=MAX_DIAL_BACK_BYTES)
            await stream.close()
        except Exception as error:  # noqa: BLE001 - a stranger's stream: reset, never raise
            log.debug("AutoNAT v2 dial-back refused: %s", type(error).__name__)
            await _reset(stream)

    def _server_ip(self, peer_id: ID) -> str:
        return remote_ip(self.host, peer_id)

    async def ask(self, peer_id: ID, addrs: Sequence[str]) -> Answer:
        """Ask one server to dial one of ``addrs`` (most wanted first) and say what it found."""
        ip = self._server_ip(peer_id)
        if not addrs or len(self._pending) >= MAX_PENDING_NONCES:
            return Answer(str(peer_id), ip, "error")
        nonce = secrets.randbits(64) or 1
        self._pending[nonce] = False
        paid = 0
        try:
            with trio.fail_after(self.settings.request_timeout_s):
                stream = await self.host.new_stream(peer_id, [DIAL_REQUEST_PROTOCOL])
                try:
                    wire_addrs = tuple(multiaddr.Multiaddr(addr).to_bytes() for addr in addrs)
                    await self._send(stream, DialRequest(wire_addrs, nonce))
                    reader = FrameReader(stream, max_frame=MAX_MESSAGE_BYTES)
                    message = decode_message(await reader.read_frame(self.settings.request_timeout_s))
                    if isinstance(message, DialDataRequest):
                        if not accept_dial_data(
                            message.addr_idx,
                            message.num_bytes,
                            asked=len(addrs),
                            max_bytes=self.settings.client_max_dial_data,
                        ):
                            await _reset(stream)  # the spec: a client that will not pay resets the stream
                            return Answer(str(peer_id), ip, "declined")
                        paid = await self._pay_dial_data(stream, message.num_bytes)
                        message = decode_message(await reader.read_frame(self.settings.request_timeout_s))
                    if not isinstance(message, DialResponse):
                        raise WireError("expected a DialResponse")
                    outcome, index = outcome_of(message, asked=len(addrs), nonce_seen=self._pending[nonce])
                finally:
                    await _close(stream)
        except Exception as error:  # noqa: BLE001 - one server's trouble is its answer: error
            log.debug("AutoNAT v2 request to %s failed: %s", peer_id, type(error).__name__)
            answer = Answer(str(peer_id), ip, "error", dial_data=paid)
        else:
            answer = Answer(str(peer_id), ip, outcome, addrs[index] if index is not None else None, paid)
        finally:
            self._pending.pop(nonce, None)
        self.answers.append(answer)
        return answer

    async def _pay_dial_data(self, stream: INetStream, num_bytes: int) -> int:
        chunk = encode_message(DialDataResponse(bytes(DIAL_DATA_CHUNK)))
        sent = 0
        while sent < num_bytes:
            await write_frame(stream, chunk, max_frame=MAX_MESSAGE_BYTES)
            sent += DIAL_DATA_CHUNK
        return sent

    async def ask_result(self, peer_id: ID, addrs: Sequence[str]) -> ServerResult:
        """:meth:`ask`, as the one-server result the node's reachability verdict counts beside v1
        answers (``nat.autonat.AutoNat``, ``v2=``; ``server_result_of``)."""
        answer = await self.ask(peer_id, addrs)
        return server_result_of(answer.server, answer.ip, answer.outcome, answer.addr, time.time())

    def servers(self) -> list[ID]:
        """The connected peers whose identify names the v2 dial-request protocol."""
        peerstore = self.host.get_peerstore()
        found = []
        for peer_id in self.host.get_connected_peers():
            try:
                if DIAL_REQUEST_PROTOCOL in peerstore.get_protocols(peer_id):
                    found.append(peer_id)
            except Exception:  # noqa: BLE001 - not identified yet
                continue
        return found

    def candidates(self) -> list[str]:
        return candidate_addrs(
            self._own_addrs(), allow_private=self.settings.allow_private, limit=self.settings.max_addrs
        )

    async def check(self) -> dict[str, AddrVerdict]:
        """Ask up to ``max_servers_per_check`` connected v2 servers about our addresses; the verdicts."""
        addrs = self.candidates()
        servers = self.servers()
        servers = sorted(random.sample(servers, min(len(servers), self.settings.max_servers_per_check)), key=str)
        self._round += 1
        answers: list[Answer] = []

        async def ask_one(offset: int, peer_id: ID) -> None:
            # Each server is asked about another address first, and another one each round.
            shift = (offset + self._round) % len(addrs)
            answers.append(await self.ask(peer_id, addrs[shift:] + addrs[:shift]))

        if addrs:
            async with trio.open_nursery() as nursery:
                for offset, peer_id in enumerate(servers):
                    nursery.start_soon(ask_one, offset, peer_id)
        for answer in answers:
            if answer.addr is not None and answer.outcome in ("reachable", "unreachable", "inconclusive"):
                self._record(answer.addr, answer.server if self.settings.distinct_by == "peer" else answer.ip, answer)
        self._outcomes = {addr: outcomes for addr, outcomes in self._outcomes.items() if addr in addrs}
        return self.verdicts()

    def _record(self, addr: str, server: str, answer: Answer) -> None:
        outcomes = self._outcomes.setdefault(addr, {})
        outcomes.pop(server, None)
        outcomes[server] = answer.outcome  # type: ignore[assignment]  # narrowed by the caller
        while len(outcomes) > MAX_OUTCOMES_PER_ADDR:
            del outcomes[next(iter(outcomes))]

    def verdicts(self) -> dict[str, AddrVerdict]:
        """Per address asked about: reachable, unreachable or unknown."""
        return {addr: judge_addr(outcomes, self.settings.min_servers) for addr, outcomes in self._outcomes.items()}

    def reachable_addrs(self) -> list[str]:
        return [addr for addr, verdict in self.verdicts().items() if verdict == "reachable"]

    async def _check_loop(self) -> None:
        asked: set[ID] = set()
        next_check = 0.0
        while True:
            servers = set(self.servers())
            unknown = not self._outcomes or "unknown" in self.verdicts().values()
            if servers and (trio.current_time() >= next_check or (unknown and not servers <= asked)):
                verdicts = await self.check()
                asked = servers
                settled = verdicts and "unknown" not in verdicts.values()
                interval = self.settings.check_interval_s if settled else self.settings.retry_interval_s
                next_check = trio.current_time() + interval
            await trio.sleep(1.0)


async def _reset(stream: INetStream) -> None:
    with trio.move_on_after(1) as cleanup:
        cleanup.shield = True
        try:
            await stream.reset()
        except Exception:  # noqa: BLE001 - already gone
            pass


async def _close(stream: INetStream) -> None:
    with trio.move_on_after(1) as cleanup:
        cleanup.shield = True
        try:
            await stream.close()
        except Exception:  # noqa: BLE001 - already gone
            pass
