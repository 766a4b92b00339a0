"""AutoNAT done right: ``/clawnode/autonat/1.0.0``.

py-libp2p 0.8.1's AutoNAT "dials back" over the connection the request came on, so every node is
told it is reachable. Here the server dials back from a second, throwaway identity (its own host
and key, kept for this) on a fresh connection to exactly the address asked about: the Noise
handshake proves the requester answered there, and the requester's connection table cannot fool
the test, because that identity never had a connection to it. The client also checks that the
dial-back identity the server names did connect to it, so a lying server cannot make it public.

One request frame, one reply frame (``wire.rpc``):

- ``{"type": "dial_back", "addrs": ["/ip4/81.2.69.5/tcp/4021", ...], "ports": [4021]}`` — own TCP
  addresses (public-looking ones only, unless ``allow_private``) and listen ports to be dialed at
  the IP the server observes (what a node behind a NAT, knowing no public address, can ask); at
  most ``server_max_addrs`` in all.
- ``{"type": "dial_back_result", "dialer": "<peer id>", "results": [{"addr", "status": "ok" |
  "dial_error" | "forbidden", "at", "rtt_ms", "error"}]}``: the server dials only the requester's
  observed IP (the one its connection comes from), so nobody can use it against a third party;
  other addresses come back ``forbidden``. Error replies: ``E_FORBIDDEN`` (nothing left to dial: all
  on other IPs, or private ones in production), ``E_RATE_LIMITED`` (too soon after this peer's last
  request, or too many dial-backs running), ``E_INVALID_ARGUMENT``, ``E_UNAVAILABLE`` (this node does
  not serve AutoNAT now).

Verdict (``AutoNat.check``): ``public`` when at least ``min_servers`` distinct servers (distinct IPs,
or distinct peer ids with ``distinct_by="peer"`` for loopback tests) dialed back, ``private`` when
that many failed every address, else ``unknown``. With ``v2=`` (the daemon passes its
``nat.autonat_v2.AutoNatV2``), connected servers that speak AutoNAT v2 but not this protocol (js and
go nodes) are asked too, about our own addresses (rotated per request: a v2 server dials one), and
their answers count in the same verdict (``nat.autonat_v2_rules.server_result_of``); a server that
speaks both is asked over this protocol only.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Annotated, Literal, Protocol

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork
from libp2p.custom_types import TProtocol
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.network.config import RetryConfig
from libp2p.peer.id import ID
from pydantic import BaseModel, Field, TypeAdapter

from nat.addresses import Reachability, ip_of, is_public_ip, sources_for
from nat.addresses import candidate_addrs as candidate_addrs_of
from nat.autonat_rules import dial_back_targets, dialable_tcp_addr
from nat.notifee import QuietNotifee
from nat.reachability import ReachabilityState, ServerResult
from runtime.errors import ClawnodeError, ErrorCode
from wire.rpc import request, serve_requests

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

MAX_REACHED_ADDRS = 32  # addresses remembered as reached by dial-backs (``AutoNat._reached``)

PROTOCOL_ID = TProtocol("/clawnode/autonat/1.0.0")
MAX_FRAME = 8 * 1024
MAX_ADDRS_ON_WIRE = 16
STALE_AFTER_CHECKS = 3  # a verdict survives inconclusive rounds for this many check intervals
ERROR_RETRY_FIRST_S = 2.0  # while unknown, servers that gave no usable answer are asked again this soon (doubling)

ServeMode = Literal["auto", "always", "never"]
Ask = tuple[tuple[str, ...], tuple[int, ...]]  # (own addresses, listen ports at the observed IP)


# Messages


class DialBackRequest(BaseModel):
    type: Literal["dial_back"] = "dial_back"
    addrs: list[str] = Field(default_factory=list, max_length=MAX_ADDRS_ON_WIRE)
    # "My observed IP, these TCP ports": what a node that knows no public address of its own asks.
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=list, max_length=MAX_ADDRS_ON_WIRE)


class DialResult(BaseModel):
    addr: str = Field(max_length=256)
    status: Literal["ok", "dial_error", "forbidden"]  # forbidden: not the observed IP, or private
    at: float  # unix time the dial ended
    rtt_ms: float = 0.0
    error: str = Field("", max_length=100)  # the exception's type only, or why it was not dialed


class DialBackReply(BaseModel):
    type: Literal["dial_back_result"] = "dial_back_result"
    dialer: str = Field(max_length=128)  # the identity the server dialed back from
    results: list[DialResult] = Field(max_length=MAX_ADDRS_ON_WIRE)


_REPLY = TypeAdapter(DialBackReply)


@dataclass(frozen=True)
class AutoNatSettings:
    min_servers: int = 3  # K: distinct servers that must agree
    distinct_by: Literal["ip", "peer"] = "ip"  # "peer" only for tests on loopback
    allow_private: bool = False  # ask about / dial private and loopback addresses (tests, LANs)
    max_servers_per_check: int = 5
    check_interval_s: float = 300.0  # re-check period after a conclusive verdict
    retry_interval_s: float = 30.0  # re-check period while the verdict is unknown
    addr_poll_s: float = 5.0  # how often the own addresses are compared with the last check's
    request_timeout_s: float = 15.0
    serve: ServeMode = "auto"  # auto: serve when the role is relay/bootstrap or the verdict is public
    server_max_addrs: int = 4
    server_max_concurrent: int = 4  # dial-backs running at once
    server_peer_interval_s: float = 30.0  # one request per peer per this many seconds
    dial_timeout_s: float = 5.0


class V2Client(Protocol):
    """What ``AutoNat`` needs of an AutoNAT v2 client (``nat.autonat_v2.AutoNatV2``)."""

    def servers(self) -> list[ID]: ...

    async def ask_result(self, peer_id: ID, addrs: Sequence[str]) -> ServerResult: ...


# Addresses


def listen_ports(addrs: Sequence[str]) -> list[int]:
    """The TCP ports of these addresses (0 and duplicates left out)."""
    ports: list[int] = []
    for addr in addrs:
        base = dialable_tcp_addr(addr)
        if base is not None:
            port = int(base.rsplit("/", 1)[1])
            if port not in ports:
                ports.append(port)
    return ports


def quic_listen_ports(addrs: Sequence[str]) -> list[int]:
    """The UDP ports of these addresses' ``/udp/<port>/quic-v1`` listeners (0 and duplicates left out)."""
    ports: list[int] = []
    for addr in addrs:
        parts = addr.split("/")
        if len(parts) >= 6 and parts[3] == "udp" and parts[5] in ("quic-v1", "quic") and parts[4].isdigit():
            port = int(parts[4])
            if 0 < port < 65536 and port not in ports:
                ports.append(port)
    return ports


def candidate_addrs(addrs: Sequence[str], *, allow_private: bool, limit: int) -> list[str]:
    """The own addresses worth asking about: TCP, public-looking unless ``allow_private``, no duplicates."""
    found: list[str] = []
    for addr in addrs:
        base = dialable_tcp_addr(addr)
        if base is None or base in found:
            continue
        ip = ip_of(base) or ""
        if not allow_private and not is_public_ip(ip):
            continue
        found.append(base)
    return found[:limit]


# Server side


class _InboundWatch(QuietNotifee):
    """Remembers which peer ids opened a connection to us, and when (for the client's own check)."""

    def __init__(self, limit: int = 256) -> None:
        self.seen: dict[str, float] = {}
        self._limit = limit

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        direction = str(getattr(conn, "direction", ""))
        if "inbound" not in direction.lower():
            return
        try:
            peer = str(conn.muxed_conn.peer_id)
        except Exception:  # noqa: BLE001 - a connection torn down while notifying
            return
        self.seen[peer] = time.monotonic()
        if len(self.seen) > self._limit:
            oldest = min(self.seen, key=lambda key: self.seen[key])
            del self.seen[oldest]


class AutoNat:
    """Client and server of ``/clawnode/autonat/1.0.0``; start with ``await nursery.start(autonat.run)``.

    ``own_addrs`` gives the addresses to ask about (default: the host's listen and observed
    addresses; only public-looking ones are sent unless ``allow_private``), ``own_ports`` the TCP
    ports to be dialed at the IP each server observes (default: the listen ports); tests pass a
    closed port to both to play an unreachable node. ``serves_by_role`` is
    true for relay and bootstrap nodes, which serve whatever their own verdict. ``build_dialer(n)``
    returns a fresh host with a new identity and at most ``n`` connections for the dial-backs
    (the daemon passes ``node.host.build_host``; nat/ must not import node/).
    """

    def __init__(
        self,
        host: IHost,
        settings: AutoNatSettings | None = None,
        *,
        state: ReachabilityState | None = None,
        serves_by_role: bool = False,
        own_addrs: Callable[[], list[str]] | None = None,
        own_ports: Callable[[], list[int]] | None = None,
        clock: Callable[[], float] = time.time,
        build_dialer: Callable[[int], IHost],
        v2: V2Client | None = None,
    ) -> None:
        self._build_dialer = build_dialer
        self._v2 = v2
        self._v2_asks = 0  # rotates the address list of v2 requests
        self._conclusive_at: float | None = None  # trio time of the last public/private verdict
        self.host = host
        self.settings = settings or AutoNatSettings()
        self.state = state or ReachabilityState()
        self.serves_by_role = serves_by_role
        # Unranked: a UPnP mapping is published only once confirmed, so it must be asked about first.
        self._own_addrs = own_addrs or (lambda: candidate_addrs_of(host))
        self._own_ports = own_ports or (lambda: listen_ports([str(addr) for addr in host.get_transport_addrs()]))
        self._clock = clock
        self.inbound = _InboundWatch()
        self._dialer: IHost | None = None
        self._serving = False
        self._last_request: dict[str, float] = {}
        self._inconclusive = 0  # inconclusive rounds in a row (client)
        self._round_conclusive = False  # whether the last round decided public or private
        self._dialing = trio.Semaphore(self.settings.server_max_concurrent)
        self._dial_locks: dict[str, trio.Lock] = {}
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._recent: dict[str, tuple[float, Ask, ServerResult]] = {}  # peer -> (when, what was asked, result)
        # address -> server -> when it last dialed us back there, whatever we asked about: ``_recent``
        # keeps only the answers about the current candidates, and a change of them (a relay dropped
        # after a public verdict) emptied the confirmed addresses until servers answered again
        self._reached: dict[str, dict[str, float]] = {}
        self.checks = 0

    # ---- lifecycle

    @property
    def dialer_id(self) -> str | None:
        return str(self._dialer.get_id()) if self._dialer is not None else None

    @property
    def serving(self) -> bool:
        return self._serving

    def should_serve(self) -> bool:
        mode = self.settings.serve
        if mode == "never":
            return False
        return mode == "always" or self.serves_by_role or self.state.verdict == "public"

    def _update_serving(self) -> None:
        want = self.should_serve() and self._dialer is not None
        if want == self._serving:
            return
        if want:
            self.host.set_stream_handler(PROTOCOL_ID, self._handle)
        else:
            self.host.remove_stream_handler(PROTOCOL_ID)
        self._serving = want
        self.push_identify_soon()

    def push_identify_soon(self) -> None:
        """Peers learn our protocols from identify: tell the connected ones now."""
        if self._nursery is not None:
            self._nursery.start_soon(self._push_identify)

    async def _push_identify(self) -> None:
        try:
            with trio.move_on_after(10):
                await push_identify_to_peers(self.host)
        except Exception as error:  # noqa: BLE001 - best effort; peers learn it on their next identify
            log.debug("identify push failed: %s", type(error).__name__)

    def recheck_soon(self) -> None:
        """Ask for a check now (e.g. after the node's addresses changed)."""
        self._wake.set()

    async def run(self, *, task_status: TaskStatus[AutoNat] = trio.TASK_STATUS_IGNORED) -> None:
        sources = sources_for(self.host)  # what the host publishes: confirmed addresses first
        sources.confirmed = self.confirmed_addrs
        sources.reachability = lambda: self.state.verdict
        self.host.get_network().register_notifee(self.inbound)
        async with trio.open_nursery() as nursery:
            if self.settings.serve != "never":
                await nursery.start(self._run_dialer)
            self._update_serving()
            self._nursery = nursery
            self.state.on_change(self._update_serving)
            task_status.started(self)
            try:
                await self._check_loop()
            finally:
                self._nursery = None
                if self._serving:
                    self.host.remove_stream_handler(PROTOCOL_ID)
                    self._serving = False
                nursery.cancel_scope.cancel()

    async def _run_dialer(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        dialer = self._build_dialer(max(8, self.settings.server_max_concurrent))
        dialer.get_network().retry_config = RetryConfig(max_retries=0)  # type: ignore[attr-defined]
        async with dialer.run([]):
            # It dials only when asked: no auto-connecting to peers it met in dial-backs.
            auto_connector = getattr(dialer.get_network(), "auto_connector", None)
            if auto_connector is not None:
                await auto_connector.stop()
            self._dialer = dialer
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._dialer = None

    async def _check_loop(self) -> None:
        settings = self.settings
        last_addrs: Ask | None = None
        last_servers: set[ID] = set()
        next_check = 0.0
        while True:
            addrs = self._candidates()
            servers = set(self._servers())
            now = trio.current_time()
            # While unknown, a server we did not ask yet is worth a check at once.
            new_server = self.state.verdict == "unknown" and not servers <= last_servers
            if self._wake.is_set() or addrs != last_addrs or now >= next_check or new_server:
                self._wake = trio.Event()
                if servers:
                    await self.check(addrs)
                    last_addrs, last_servers = addrs, servers
                    # A round that decided nothing (too few answers) is followed up soon even when
                    # an earlier verdict still stands: a UPnP mapping made just after a "private"
                    # verdict was asked about at once, every server refused (asked a moment before),
                    # and the node stayed private with a working mapping until the next check (300 s).
                    conclusive = self._round_conclusive
                    if conclusive:
                        self._inconclusive = 0
                        next_check = trio.current_time() + settings.check_interval_s
                    else:
                        self._inconclusive += 1
                        next_check = trio.current_time() + self._retry_in()
                elif self.state.checked_at is None:
                    self.state.reason = "autonat: no AutoNAT server connected yet"
            # Until a first check ran, look for servers (identified peers) every second; a round due
            # sooner than the next poll (a quick retry while unknown) is not held back by it.
            poll = settings.addr_poll_s if self.state.checked_at else min(1.0, settings.addr_poll_s)
            due_in = next_check - trio.current_time()
            with trio.move_on_after(min(poll, due_in) if due_in > 0 else poll):
                await self._wake.wait()

    # ---- client

    def _errored(self) -> bool:
        return any(result.outcome == "error" for _, _, result in self._recent.values())

    def _error_retry_s(self) -> float:
        """How soon a server that gave no usable answer is asked again: 2 s, doubling with each
        inconclusive round, up to ``retry_interval_s``."""
        return min(self.settings.retry_interval_s, ERROR_RETRY_FIRST_S * 2.0 ** max(0, self._inconclusive - 1))

    def _retry_in(self) -> float:
        """Seconds to the next round while the verdict is unknown: soon (``_error_retry_s``) when
        servers gave no usable answer, e.g. busy with other nodes' dial-backs (a home network's nodes
        starting at once): the verdict of a node with a UPnP mapping waited 30 s for the next round
        (48 s after its start instead of ~6 s); else ``retry_interval_s``."""
        return self._error_retry_s() if self._errored() else self.settings.retry_interval_s

    def _candidates(self) -> Ask:
        """What to ask about: up to two listen ports (at the observed IP), then own addresses."""
        ports = tuple(self._own_ports()[:2])
        limit = max(0, self.settings.server_max_addrs - len(ports))
        addrs = candidate_addrs(self._own_addrs(), allow_private=self.settings.allow_private, limit=limit)
        return tuple(addrs), ports

    def _servers(self) -> list[ID]:
        """Connected servers of this protocol, then those that speak only AutoNAT v2 (with ``v2``)."""
        v1 = [peer for peer in self.host.get_connected_peers() if PROTOCOL_ID in _protocols_of(self.host, peer)]
        if self._v2 is None:
            return self._usable(v1)
        known = set(v1)
        return self._usable(v1 + [peer_id for peer_id in self._v2.servers() if peer_id not in known])

    def _usable(self, servers: list[ID]) -> list[ID]:
        # A server on a private address sees us on one too, and would refuse to dial it.
        return [peer_id for peer_id in servers if self.settings.allow_private or is_public_ip(self._server_ip(peer_id))]

    def _server_ip(self, peer_id: ID) -> str:
        return remote_ip(self.host, peer_id)

    async def _ask_v2(self, v2: V2Client, peer_id: ID, ask: Ask, results: list[ServerResult]) -> None:
        """One v2-only server, about our own addresses: it dials one (the first it may), so each
        request starts at another one. It cannot dial a bare port at our observed IP."""
        addrs = list(ask[0])
        if not addrs:
            ip = self._server_ip(peer_id)
            results.append(ServerResult(str(peer_id), ip, "error", "autonat v2: no address to ask", self._clock()))
            return
        shift = self._v2_asks % len(addrs)
        self._v2_asks += 1
        results.append(await v2.ask_result(peer_id, addrs[shift:] + addrs[:shift]))

    async def _ask(self, peer_id: ID, ask: Ask, results: list[ServerResult]) -> None:
        if self._v2 is not None and PROTOCOL_ID not in _protocols_of(self.host, peer_id):
            await self._ask_v2(self._v2, peer_id, ask, results)
            return
        ip = self._server_ip(peer_id)
        started = time.monotonic()
        try:
            reply = await request(
                self.host,
                peer_id,
                PROTOCOL_ID,
                DialBackRequest(addrs=list(ask[0]), ports=list(ask[1])),
                _REPLY,
                timeout_s=self.settings.request_timeout_s,
                max_frame=MAX_FRAME,
            )
        except ClawnodeError as error:
            results.append(ServerResult(str(peer_id), ip, "error", error.code.value, self._clock()))
            return
        if reply.dialer == str(peer_id) or not any(result.status != "forbidden" for result in reply.results):
            results.append(ServerResult(str(peer_id), ip, "error", "bad reply", self._clock()))
            return
        dialed = [result for result in reply.results if result.status != "forbidden"]
        tried = tuple(result.addr for result in dialed)
        if any(result.status == "ok" for result in dialed):
            # Count it only if that identity really connected to us during this request.
            seen = self.inbound.seen.get(reply.dialer)
            if seen is not None and seen >= started:
                reached = tuple(result.addr for result in dialed if result.status == "ok")
                results.append(ServerResult(str(peer_id), ip, "ok", reply.dialer, self._clock(), reached, tried))
            else:
                results.append(ServerResult(str(peer_id), ip, "error", "dial-back not seen", self._clock()))
            return
        results.append(ServerResult(str(peer_id), ip, "dial_error", reply.dialer, self._clock(), dialed=tried))

    async def check(self, ask: Ask | None = None) -> ReachabilityState:
        """Ask up to ``max_servers_per_check`` servers to dial back, then update and return the state.

        Servers that answered about the same addresses within ``retry_interval_s`` are not asked
        again (they would rate-limit us); their answers, while younger than ``check_interval_s``,
        count together with this round's, the latest one per server.
        """
        settings = self.settings
        key = self._candidates() if ask is None else ask
        if not key[0] and not key[1]:
            self._record("unknown", "autonat: no public address or listen port to test", [])
            return self.state
        now = trio.current_time()
        self._recent = {
            peer: (at, asked, result)
            for peer, (at, asked, result) in self._recent.items()
            if asked == key and now - at < settings.check_interval_s
        }
        # A server that answered is not asked again within retry_interval_s; one that gave no usable
        # answer (busy with other dial-backs, a timeout) may be asked at the next round.
        fresh = {
            peer
            for peer, (at, _, result) in self._recent.items()
            if now - at < (settings.retry_interval_s if result.outcome != "error" else self._error_retry_s())
        }
        servers = [peer_id for peer_id in self._servers() if str(peer_id) not in fresh]
        random.shuffle(servers)
        servers = servers[: settings.max_servers_per_check]
        if not servers and not self._recent:
            self._round_conclusive = False
            self._record("unknown", "autonat: no AutoNAT server connected", [])
            return self.state
        answers: list[ServerResult] = []
        async with trio.open_nursery() as nursery:
            for peer_id in servers:
                nursery.start_soon(self._ask, peer_id, key, answers)
        answered_at = trio.current_time()
        verdict_before, confirmed_before = self.state.verdict, self.confirmed_addrs()
        for answer in answers:
            if answer.outcome != "error" or answer.peer_id not in self._recent:
                self._recent[answer.peer_id] = (answered_at, key, answer)
        self._note_reached(answers, answered_at)
        try:
            return self._judge_round(answered_at)
        finally:
            if self.state.verdict == verdict_before and self.confirmed_addrs() != confirmed_before:
                # The record and identify name confirmed addresses only: republish, tell the peers
                # (a changed verdict told the listeners already).
                self.state.addrs_changed()
                self.push_identify_soon()

    def _judge_round(self, answered_at: float) -> ReachabilityState:
        settings = self.settings
        results = [result for _, _, result in self._recent.values()]
        verdict, reason = judge(results, settings.min_servers, settings.distinct_by)
        self._round_conclusive = verdict != "unknown"
        if verdict == "unknown" and self._still_valid(answered_at):
            # Too few servers could answer this round (rate limits right after a check, a new
            # address): that says nothing new about us. Dropping to unknown would drop a private
            # node's relay reservations and its relayed addresses with them.
            log.debug("autonat: inconclusive round (%s); keeping %s", reason, self.state.verdict)
            return self.state
        if verdict != "unknown":
            self._conclusive_at = answered_at
        self._record(verdict, reason, results)
        return self.state

    def _note_reached(self, answers: Sequence[ServerResult], at: float) -> None:
        """Remember which server reached us where (``confirmed_addrs``); a server that now failed an
        address no longer vouches for it; answers older than ``check_interval_s`` are forgotten."""
        for answer in answers:
            if answer.outcome not in ("ok", "dial_error"):
                continue
            for addr in set(answer.confirmed):
                self._reached.setdefault(addr, {})[answer.peer_id] = at
            for addr in set(answer.dialed) - set(answer.confirmed):
                self._reached.get(addr, {}).pop(answer.peer_id, None)
        horizon = at - self.settings.check_interval_s
        kept = {
            addr: fresh
            for addr, servers in self._reached.items()
            if (fresh := {peer: when for peer, when in servers.items() if when > horizon})
        }
        newest = sorted(kept, key=lambda addr: -max(kept[addr].values()))[:MAX_REACHED_ADDRS]
        self._reached = {addr: kept[addr] for addr in newest}

    def confirmed_addrs(self) -> list[str]:
        """While public: the addresses at least two servers (or ``min_servers``, if fewer) dialed us
        back on within ``check_interval_s``, most confirmed first, whatever we asked them about. A
        manual port forward makes us public at ``router IP:port``, an address no listener and no
        UPnP mapping names, and a UPnP mapping is published only once confirmed: without it in our
        identify and record, peers would only know our LAN address."""
        if self.state.verdict != "public":
            return []
        counts = {addr: len(servers) for addr, servers in self._reached.items()}
        needed = min(2, self.settings.min_servers)
        usable = [
            addr
            for addr, count in counts.items()
            if count >= needed
            and dialable_tcp_addr(addr) == addr
            and (self.settings.allow_private or is_public_ip(ip_of(addr) or ""))
        ]
        return sorted(usable, key=lambda addr: -counts[addr])

    def observed_ips(self) -> list[str]:
        """The IPs the servers of the current verdict saw our requests come from (they dial only
        that one), most often seen first; AutoNAT v2 answers do not tell it."""
        counts: dict[str, int] = {}
        for _, _, result in self._recent.values():
            if not result.at_observed_ip:
                continue
            for ip in {ip_of(addr) for addr in result.dialed} - {None}:
                assert ip is not None
                counts[ip] = counts.get(ip, 0) + 1
        return sorted(counts, key=lambda ip: -counts[ip])

    def tested_addrs(self) -> list[tuple[str, float]]:
        """Every address a server of the current verdict dialed (reached or not), with the unix time
        of the latest answer about it."""
        latest: dict[str, float] = {}
        for _, _, result in self._recent.values():
            for addr in result.dialed:
                latest[addr] = max(latest.get(addr, 0.0), result.at)
        return sorted(latest.items())

    def _still_valid(self, now: float) -> bool:
        """Whether the last conclusive verdict is recent enough to outlive inconclusive rounds."""
        return (
            self.state.verdict != "unknown"
            and self._conclusive_at is not None
            and now - self._conclusive_at < STALE_AFTER_CHECKS * self.settings.check_interval_s
        )

    def _record(self, verdict: Reachability, reason: str, results: list[ServerResult]) -> None:
        self.checks += 1
        if verdict != self.state.verdict:
            log.info("reachability: %s (%s)", verdict, reason)
        self.state.update(verdict, reason, results, self._clock())

    # ---- server

    async def _handle(self, stream: INetStream) -> None:
        remote = None
        try:
            remote = stream.get_remote_address()
        except Exception:  # noqa: BLE001 - a stream without a socket underneath (a relayed one)
            remote = None
        observed_ip = str(remote[0]) if remote else ""
        handler = serve_requests(partial(self._answer, observed_ip), max_frame=MAX_FRAME)
        await handler(stream)

    def _rate_limit(self, peer: str) -> None:
        now = trio.current_time()
        last = self._last_request.get(peer)
        if last is not None and now - last < self.settings.server_peer_interval_s:
            raise ClawnodeError(ErrorCode.RATE_LIMITED, "one AutoNAT request per peer per interval")

    def _note_request(self, peer: str) -> None:
        """Count a request that is served against its peer's interval (one refused because too many
        dial-backs ran may be asked again at once: it cost nothing)."""
        now = trio.current_time()
        self._last_request[peer] = now
        if len(self._last_request) > 4096:
            cutoff = now - self.settings.server_peer_interval_s
            self._last_request = {key: at for key, at in self._last_request.items() if at >= cutoff}

    def validate(self, message: DialBackRequest, observed_ip: str) -> tuple[list[str], dict[str, str]]:
        """The addresses to dial, and those refused (with why); raises when nothing may be dialed
        (the rule: ``nat.autonat_rules.dial_back_targets``)."""
        return dial_back_targets(
            message.addrs,
            message.ports,
            observed_ip,
            max_addrs=self.settings.server_max_addrs,
            allow_private=self.settings.allow_private,
        )

    async def _answer(self, observed_ip: str, frame: bytes, remote: ID) -> BaseModel:
        if not self._serving or self._dialer is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "this node does not serve AutoNAT now")
        message = DialBackRequest.model_validate_json(frame)
        targets, refused = self.validate(message, observed_ip)  # costs nothing, so not counted
        self._rate_limit(str(remote))
        try:
            self._dialing.acquire_nowait()
        except trio.WouldBlock:
            raise ClawnodeError(ErrorCode.RATE_LIMITED, "too many dial-backs running") from None
        self._note_request(str(remote))
        try:
            results = [await self._dial_back(remote, addr) for addr in targets]
        finally:
            self._dialing.release()
        now = self._clock()
        results.extend(DialResult(addr=addr, status="forbidden", at=now, error=why) for addr, why in refused.items())
        return DialBackReply(dialer=str(self._dialer.get_id()), results=results)

    async def _dial_back(self, peer_id: ID, addr: str) -> DialResult:
        dialer = self._dialer
        if dialer is None:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "this node does not serve AutoNAT now")
        key = str(peer_id)
        lock = self._dial_locks.setdefault(key, trio.Lock())
        network = dialer.get_network()
        try:
            async with lock:
                started = time.monotonic()
                error = ""
                try:
                    with trio.fail_after(self.settings.dial_timeout_s):
                        # dial_addr: this address only (connect() would try every address the
                        # peerstore knows), on a fresh connection from the dialer's identity;
                        # Noise fails unless the peer at the address is the requester.
                        await network.dial_addr(multiaddr.Multiaddr(addr), peer_id)
                except trio.TooSlowError:
                    error = "TooSlowError"
                except Exception as failure:  # noqa: BLE001 - every dial failure is a dial_error
                    error = type(failure).__name__
                finally:
                    await forget_dialed_peer(dialer, peer_id)
                rtt_ms = (time.monotonic() - started) * 1000
        finally:
            # The lock goes with its last holder (a released lock a waiter took is still held): each
            # requester's lock stayed for good, so strangers asking from fresh identities grew it.
            if not lock.locked() and self._dial_locks.get(key) is lock:
                del self._dial_locks[key]
        return DialResult(
            addr=addr,
            status="dial_error" if error else "ok",
            at=self._clock(),
            rtt_ms=round(rtt_ms, 3),
            error=error[:100],
        )


def judge(
    results: Sequence[ServerResult], min_servers: int, distinct_by: Literal["ip", "peer"]
) -> tuple[Reachability, str]:
    """The verdict from one round of answers, and the line saying why."""

    def key(result: ServerResult) -> str:
        return result.peer_id if distinct_by == "peer" else result.ip

    # By IP, an answer whose server's IP was not read (its connection closed before the ask; the ask
    # dialed it again) counts for no one: falling back to its peer id let one host's many peer ids
    # count as many servers.
    counted = [result for result in results if key(result)]
    ok = {key(result) for result in counted if result.outcome == "ok"}
    failed = {key(result) for result in counted if result.outcome == "dial_error"} - ok
    answered = len(ok | failed)
    unit = "servers" if distinct_by == "peer" else "server IPs"
    if len(ok) >= min_servers:
        return "public", f"autonat: {len(ok)}/{answered} dial-backs"
    if len(failed) >= min_servers:
        return "private", f"autonat: {len(ok)}/{answered} dial-backs"
    errors = sum(1 for result in results if result.outcome == "error")
    return "unknown", (
        f"autonat: {len(ok)}/{answered} dial-backs, {min_servers} distinct {unit} needed"
        + (f" ({errors} without an answer)" if errors else "")
    )


async def forget_dialed_peer(dialer: IHost, peer_id: ID) -> None:
    """After a dial-back: close the dialer's connection to ``peer_id`` and forget its addresses, within
    2 s and whatever cancels the caller (a throwaway dialer must not keep what it reached)."""
    with trio.move_on_after(2) as cleanup:
        cleanup.shield = True
        try:
            await dialer.get_network().close_peer(peer_id)
        except Exception:  # noqa: BLE001 - nothing to close
            pass
        try:
            dialer.get_peerstore().clear_peerdata(peer_id)
        except Exception:  # noqa: BLE001 - never stored
            pass


def _protocols_of(host: IHost, peer_id: ID) -> list[str]:
    try:
        return list(host.get_peerstore().get_protocols(peer_id))
    except Exception:  # noqa: BLE001 - not identified yet
        return []


def remote_ip(host: IHost, peer_id: ID) -> str:
    """The IP one of our connections to ``peer_id`` comes from ("" when none is open)."""
    try:
        for conn in host.get_network().get_connections(peer_id):
            remote = conn.muxed_conn.get_remote_address()  # type: ignore[attr-defined]
            if remote:
                return str(remote[0])
    except Exception:  # noqa: BLE001 - a connection closing meanwhile
        pass
    return ""
