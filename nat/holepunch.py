"""Hole punching (DCUtR): turn a relayed connection into a direct one.

The wire exchange is py-libp2p's ``DCUtRProtocol`` (``/libp2p/dcutr``: CONNECT with each side's
predicted public addresses, SYNC after half the measured round trip, then a TCP simultaneous open
from the listen port, whose listener carries ``SO_REUSEPORT``). This module decides *when* to punch
and keeps count of what happened:

- py-libp2p's own trigger (a loop on both sides that punches every relayed peer every 2 s) is
  switched off: both sides starting sessions at once made them race each other. As the DCUtR spec
  says, the peer that *received* the relayed connection (B, the private one behind its relay)
  starts the exchange as soon as the circuit is up (a notifee sees the inbound relayed
  connection); the peer that dialed through the relay (A) answers in py-libp2p's stream handler.
  So a js-libp2p or go-libp2p peer that reaches a private clawnode node through a relay gets a
  direct connection (they only answer as A). A still starts the exchange itself when nothing came
  from B within ``ANSWER_WAIT_S`` of its dial (a peer that never starts, e.g. a clawnode before
  this change, which punched only as A).
- Each attempt, whichever side started it, ends as ``direct`` (a verified direct connection, how
  long it took) or ``failed`` (symmetric NATs and loss: the relayed connection stays and keeps
  working). ``summary()`` feeds ``clawnode status``, the dashboard and ``/metrics``.
- New streams prefer a direct connection over a relayed one (py-libp2p's "best" connection
  choice), so calls move to the punched path as soon as it exists; DCUtR closes the relayed
  connection after a grace period.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from nat import quic_punch
from nat.addresses import is_loopback_ip, parse_ip
from nat.autonat import quic_listen_ports
from nat.notifee import QuietNotifee
from nat.relay import is_circuit
from runtime.telemetry import LatencyHistogram

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

Outcome = Literal["direct", "failed"]
ConnectionPath = Literal["direct", "relayed"]


PunchSource = tuple[str, int]
MAX_PREDICTED_ADDRS = 20  # py-libp2p's MAX_OBSERVED_ADDRS
# Punch dials to one peer in flight at once, every exchange with it together. A CONNECT may name
# about 370 addresses (4 KiB), py-libp2p dials each at once in three rounds and lets a peer run any
# number of exchanges: a stranger's 4 KiB had a node hold hundreds of connections to a third party.
MAX_PUNCH_DIALS = 16
# A, having dialed B through a relay, waits this long for B to start the exchange (the spec's
# order) before starting it itself.
ANSWER_WAIT_S = 3.0
# When both sides listen for QUIC, A's TCP punch dials wait this long for the QUIC punch first
# (a TCP simultaneous open completes in one round trip and would win every race; see nat.quic_punch).
QUIC_HEAD_START_S = 1.5


def _is_wildcard(ip: str) -> bool:
    parsed = parse_ip(ip)
    return parsed is not None and parsed.is_unspecified


def _family_of(ip: str) -> int:
    return 6 if ":" in ip else 4


def punch_source(target_ip: str, route_ip: str | None, listeners: Sequence[PunchSource]) -> PunchSource | None:
    """The (ip, port) a hole-punch dial to ``target_ip`` must leave from, or None (an ephemeral source).

    The NAT maps the listen port as seen from the interface that routes to the peer: that is the
    source whose external mapping ``router ip:listen port`` we advertised. ``route_ip`` is the local
    address of the route to ``target_ip`` (``route_source_ip``); ``listeners`` the bound TCP listen
    sockets (``0.0.0.0``/``::`` when listening on every interface). Never loopback for a peer that is
    not on loopback (py-libp2p took the first advertised address, 127.0.0.1 with ``0.0.0.0``, and
    every dial failed at once); never an address no listener covers (the bind would fail).
    """
    if route_ip is None or _family_of(route_ip) != _family_of(target_ip):
        return None
    if is_loopback_ip(route_ip) and not is_loopback_ip(target_ip):
        return None
    for ip, port in listeners:
        if ip == route_ip and port:
            return (route_ip, port)
    for ip, port in listeners:
        if _is_wildcard(ip) and _family_of(ip) == _family_of(route_ip) and port:
            return (route_ip, port)
    return None


def route_source_ip(target_ip: str) -> str | None:
    """The local address the kernel picks to reach ``target_ip`` (a UDP ``connect``: one routing
    lookup, no packet sent, does not block)."""
    family = socket.AF_INET6 if _family_of(target_ip) == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((target_ip, 9))
            return str(probe.getsockname()[0])
    except OSError:
        return None


def _tcp_target(addr: Multiaddr) -> tuple[str, int] | None:
    parts = str(addr).split("/")
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    try:
        return parts[2], int(parts[4])
    except ValueError:
        return None


def tcp_listeners(host: IHost) -> list[PunchSource]:
    """The host's bound TCP listen sockets as (ip, port): the real port when it listened on port 0."""
    found: list[PunchSource] = []
    for addr in host.get_transport_addrs():
        target = _tcp_target(addr)
        if target is not None and "/p2p-circuit" not in str(addr):
            found.append(target)
    return found


class _OneSidedDCUtR(DCUtRProtocol):
    """py-libp2p's DCUtR without its periodic trigger (see the module docstring) and without its
    plain direct dial first: we punch only peers whose record says they are private, where that
    dial just waits out its timeout (5 s) before the exchange starts. Exchanges a peer starts with
    us are told to ``on_answer`` (started) and ``on_answered`` (done: whether it ended direct)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.on_answer: Callable[[ID], None] = lambda peer_id: None
        self.on_answered: Callable[[ID, bool, float], None] = lambda peer_id, ok, seconds: None
        self._quic_first: set[ID] = set()  # peers A is punching over QUIC: TCP dials wait QUIC_HEAD_START_S
        self._dials: Counter[ID] = Counter()  # punch dials in flight per peer (MAX_PUNCH_DIALS)

    async def _handle_dcutr_stream(self, stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        if await self._have_direct_connection(peer_id):
            await super()._handle_dcutr_stream(stream)  # closes it: nothing to punch
            return
        self.on_answer(peer_id)
        started = time.monotonic()
        ok = False
        try:
            await super()._handle_dcutr_stream(stream)
            ok = await self._have_direct_connection(peer_id)
        finally:
            self.on_answered(peer_id, ok, time.monotonic() - started)

    async def _auto_drive_loop(self) -> None:
        return None

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        return False

    async def _dial_peer(
        self, peer_id: ID, addr: Multiaddr, source: PunchSource | None = None, as_responder: bool = False
    ) -> None:
        """py-libp2p binds every punch dial to the first advertised address (127.0.0.1 when listening
        on 0.0.0.0, or a UPnP mapping's router address, which cannot be bound): bind the listen port on
        the interface that routes to ``addr`` instead (``punch_source``)."""
        if self._dials[peer_id] >= MAX_PUNCH_DIALS:
            log.debug("hole punch: %d dials to %s in flight, %s left out", MAX_PUNCH_DIALS, peer_id, addr)
            return
        self._dials[peer_id] += 1
        try:
            await self._dial_one(peer_id, addr, source, as_responder)
        finally:
            self._dials[peer_id] -= 1
            if self._dials[peer_id] <= 0:
                del self._dials[peer_id]

    async def _dial_one(self, peer_id: ID, addr: Multiaddr, source: PunchSource | None, as_responder: bool) -> None:
        quic = quic_punch.quic_target(addr)
        if quic is not None:
            if as_responder:
                # The side that sent SYNC only sprays from its QUIC listener (the spec; dialing from
                # the listen port would take the other side's Initials away from the listener, and
                # py-libp2p cannot take a QUIC connection as responder). The plain dials of
                # _perform_hole_punch still try QUIC from an ephemeral port.
                return
            if source is not None:
                source = punch_source(quic[0], route_source_ip(quic[0]), quic_punch.quic_listeners(self.host))
        elif source is not None:
            target = _tcp_target(addr)
            if target is None:
                source = None
            else:
                if not as_responder and peer_id in self._quic_first:
                    with trio.move_on_after(QUIC_HEAD_START_S):
                        while not await self._verify_direct_connection(peer_id):
                            await trio.sleep(0.1)
                    if await self._verify_direct_connection(peer_id):
                        return
                source = punch_source(target[0], route_source_ip(target[0]), tcp_listeners(self.host))
        if source is not None:
            log.debug("hole-punch dial to %s binds %s:%d", addr, source[0], source[1])
        await super()._dial_peer(peer_id, addr, source, as_responder)

    def _decode_observed_addrs(self, addr_bytes: list[bytes]) -> list[Multiaddr]:
        """The first ``MAX_PREDICTED_ADDRS`` of a CONNECT's addresses (as many as py-libp2p sends): it
        read all of them (about 370 fit in 4 KiB) into the peer store for 10 minutes, so a stranger's
        exchanges, one after another, each naming fresh addresses, grew it without bound."""
        decoded: list[Multiaddr] = super()._decode_observed_addrs(addr_bytes[:MAX_PREDICTED_ADDRS])
        return decoded

    async def _get_observed_addrs(self) -> list[bytes]:
        """py-libp2p predicts ``router ip:TCP listen port`` only: add ``router ip:QUIC listen port``
        (``/udp/<port>/quic-v1``) for each QUIC listener, first (``nat.quic_punch``)."""
        encoded = await super()._get_observed_addrs()
        ports = quic_listen_ports([str(a) for a in self.host.get_transport_addrs()])
        if not ports:
            return encoded
        addrs = [Multiaddr(raw) for raw in encoded]
        return [addr.to_bytes() for addr in quic_punch.with_quic_predictions(addrs, ports)][:MAX_PREDICTED_ADDRS]

    async def _spam_udp_for_hole_punch(self, addr: Multiaddr, stop: trio.Event) -> None:
        """The QUIC punch packets leave from our QUIC listener's socket (py-libp2p sent them from a
        fresh socket: the NAT mapping they opened led to no listener)."""
        target = quic_punch.quic_target(addr)
        if target is not None:
            await quic_punch.spray_from_listener(self.host, target, stop)

    async def _perform_hole_punch(self, peer_id: ID, addrs: list[Multiaddr], as_responder: bool = False) -> bool:
        """As the initiator, py-libp2p dials from the listen port and takes the *responder* role in
        the security handshake, as a merged TCP simultaneous open needs. When our side is behind a
        symmetric NAT the other side's dial never arrives; ours reaches its listener as a plain
        inbound connection instead, where it is the responder too, and the handshake stalls (the
        NAT matrix: symmetric x full-cone and symmetric x address-restricted ended on the relay).
        So the initiator also dials each address plainly, as the handshake's initiator."""
        if not as_responder:
            quic_both = bool(quic_punch.quic_listeners(self.host)) and any(
                quic_punch.quic_target(addr) for addr in addrs
            )
            if quic_both:
                self._quic_first.add(peer_id)
            try:
                return await super()._perform_hole_punch(peer_id, addrs, as_responder)
            finally:
                self._quic_first.discard(peer_id)
        async with trio.open_nursery() as nursery:
            for addr in addrs:
                if not is_circuit(addr):
                    nursery.start_soon(self._dial_peer, peer_id, addr, None, False)
            punched = await super()._perform_hole_punch(peer_id, addrs, as_responder)
            nursery.cancel_scope.cancel()
        return punched


@dataclass(frozen=True)
class HolePunchSettings:
    enabled: bool = True
    dial_timeout_s: int = 5
    history: int = 64


@dataclass(frozen=True)
class Attempt:
    peer_id: str
    outcome: Outcome
    seconds: float
    finished_at: float


@dataclass
class HolePunchService:
    host: IHost
    settings: HolePunchSettings = field(default_factory=HolePunchSettings)
    counts: dict[Outcome, int] = field(default_factory=lambda: {"direct": 0, "failed": 0})
    direct_after_s: LatencyHistogram = field(default_factory=LatencyHistogram)  # successful punches
    _recent: deque[Attempt] = field(init=False)
    _punched: set[str] = field(default_factory=set)
    _running: set[str] = field(default_factory=set)
    # exchanges we started (B, or A after ANSWER_WAIT_S) and exchanges a peer started with us
    initiated: int = 0
    answered: int = 0
    _answering_now: set[str] = field(default_factory=set)  # exchanges a peer started with us, ongoing
    _answers_done: set[str] = field(default_factory=set)  # ended while our relayed_dial waited for one
    _nursery: trio.Nursery | None = None
    _protocol: DCUtRProtocol | None = None

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=self.settings.history)

    async def run(self, *, task_status: TaskStatus[HolePunchService] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.settings.enabled:
            task_status.started(self)
            await trio.sleep_forever()
        quic_punch.install(self.host)  # QUIC punch dials leave from the QUIC listen port
        protocol = _OneSidedDCUtR(self.host, dial_timeout=self.settings.dial_timeout_s)
        protocol.on_answer = self._answering
        protocol.on_answered = self._answered
        self._protocol = protocol
        watch = _InboundRelayed(self)
        network = self.host.get_network()
        async with background_trio_service(protocol), trio.open_nursery() as nursery:
            await protocol.event_started.wait()
            self._nursery = nursery
            network.register_notifee(watch)
            task_status.started(self)
            try:
                await trio.sleep_forever()
            finally:
                remove = getattr(network, "remove_notifee", None)
                if remove is not None:
                    remove(watch)

    def relayed_dial(self, peer_id: ID) -> None:
        """A circuit to ``peer_id`` was just dialed by us (we are A): B starts the exchange; if it has
        not within ``ANSWER_WAIT_S`` (and we are not direct by then), we start it."""
        key = str(peer_id)
        if self._nursery is None or self._protocol is None or key in self._running:
            return
        self._running.add(key)
        self._nursery.start_soon(self._punch_unless_started, peer_id)

    def inbound_relayed(self, peer_id: ID) -> None:
        """``peer_id`` reached us through a relay (we are B): start the exchange now (the spec's order)."""
        key = str(peer_id)
        if self._nursery is None or self._protocol is None or key in self._running:
            return
        self._running.add(key)
        self._nursery.start_soon(self._punch, peer_id)

    async def _punch_unless_started(self, peer_id: ID) -> None:
        key = str(peer_id)
        with trio.move_on_after(ANSWER_WAIT_S):
            while key not in self._answering_now and key not in self._answers_done:
                await trio.sleep(0.05)
        if key in self._answering_now or key in self._answers_done or self.path_to(peer_id) != "relayed":
            self._running.discard(key)  # B drives it (or we are direct, or gone): its outcome is counted
            self._answers_done.discard(key)
            return
        log.debug("hole punch: %s did not start the exchange within %.0f s, starting it", peer_id, ANSWER_WAIT_S)
        await self._punch(peer_id)

    async def _punch(self, peer_id: ID) -> None:
        assert self._protocol is not None
        key = str(peer_id)
        started = time.monotonic()
        self.initiated += 1
        try:
            ok = await self._protocol.initiate_hole_punch(peer_id)
        except Exception as error:  # noqa: BLE001 - a failed punch leaves the relayed path working
            log.debug("hole punch to %s raised %s", peer_id, type(error).__name__)
            ok = False
        finally:
            self._running.discard(key)
        self._count(key, ok, time.monotonic() - started)

    def _answering(self, peer_id: ID) -> None:
        self.answered += 1
        self._answering_now.add(str(peer_id))

    def _answered(self, peer_id: ID, ok: bool, seconds: float) -> None:
        key = str(peer_id)
        self._answering_now.discard(key)
        if key in self._running:  # our own wait for it (relayed_dial) is told it came
            self._answers_done.add(key)
        self._count(key, ok, seconds)

    def _count(self, key: str, ok: bool, seconds: float) -> None:
        outcome: Outcome = "direct" if ok else "failed"
        self.counts[outcome] += 1
        self._recent.append(Attempt(key, outcome, round(seconds, 3), time.time()))
        if ok:
            # Only peers still connected are kept: each one that ever ended direct stayed for good,
            # so strangers punching from fresh identities grew the set for as long as the node ran.
            connected = {str(peer) for peer in self.host.get_connected_peers()}
            self._punched = {peer for peer in self._punched if peer in connected}
            self._punched.add(key)
            self.direct_after_s.observe(seconds)
        log.info("hole punch to %s: %s after %.2f s", key, outcome, seconds)

    def _direct_addrs(self, peer_id: ID) -> list[str] | None:
        """The addresses of our direct connection to ``peer_id``: [] when relayed only, None when not connected."""
        conns = self.host.get_network().get_connections(peer_id)
        if not conns:
            return None
        for conn in conns:
            try:
                direct = [str(addr) for addr in conn.get_transport_addresses() if not is_circuit(addr)]
            except Exception:  # noqa: BLE001 - a closing connection
                continue
            if direct:
                return direct
        return []

    def path_to(self, peer_id: ID) -> ConnectionPath | None:
        """How we are connected to ``peer_id`` right now (None: not connected)."""
        direct = self._direct_addrs(peer_id)
        return None if direct is None else ("direct" if direct else "relayed")

    def direct_transport(self, peer_id: ID) -> Literal["tcp", "quic"] | None:
        """The transport of our direct connection to ``peer_id`` (None: none, or relayed only)."""
        direct = self._direct_addrs(peer_id)
        if not direct:
            return None
        return "quic" if any("/quic" in addr for addr in direct) else "tcp"

    def connections_by_path(self) -> dict[ConnectionPath, int]:
        """Connected peers by how we are connected to them now."""
        counts: dict[ConnectionPath, int] = {"direct": 0, "relayed": 0}
        for peer_id in self.host.get_connected_peers():
            path = self.path_to(peer_id)
            if path is not None:
                counts[path] += 1
        return counts

    def punched(self, peer_id: ID) -> bool:
        """Whether the direct connection to ``peer_id`` came from a hole punch."""
        return str(peer_id) in self._punched

    def summary(self) -> dict[str, object]:
        return {
            "enabled": self.settings.enabled,
            "direct": self.counts["direct"],
            "failed": self.counts["failed"],
            "in_progress": len(self._running | self._answering_now),
            "recent": [
                {"outcome": a.outcome, "seconds": a.seconds, "finished_at": a.finished_at} for a in self._recent
            ],
        }


def _relayed_inbound(conn: INetConn) -> bool:
    """Whether ``conn`` came in through a relay: a circuit, and the remote side opened it."""
    try:
        if not any(is_circuit(addr) for addr in conn.get_transport_addresses()):
            return False
    except Exception:  # noqa: BLE001 - a connection closing meanwhile
        return False
    muxed = getattr(conn, "muxed_conn", None)
    initiator = getattr(muxed, "is_initiator_value", None)
    if initiator is None:
        initiator = getattr(getattr(muxed, "secured_conn", None), "is_initiator", None)
    return initiator is False


class _InboundRelayed(QuietNotifee):
    """Tells the hole-punch service of each relayed connection a peer opened to us."""

    def __init__(self, service: HolePunchService) -> None:
        self._service = service

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        if _relayed_inbound(conn):
            self._service.inbound_relayed(conn.muxed_conn.peer_id)
