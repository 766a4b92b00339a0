"""Circuit relay v2: serve as a relay, hold reservations while private, dial through a relay.

Built on py-libp2p's ``libp2p.relay.circuit_v2``:

- ``CircuitV2Protocol`` is the hop service (``allow_hop=True`` on a ``relay`` node, with limits from
  ``[relay]``) and, on every node, the stop handler that accepts circuits a relay opens to us.
- Reservations are made here, not by py-libp2p's ``CircuitV2Transport._refresh_reservations_worker``:
  that worker renews only 30 s before expiry (``RESERVATION_REFRESH_MARGIN``, transport.py:83),
  keeps no relay addresses and swallows refusals. ``RelayService`` keeps at least
  ``relay.min_relays`` reservations while the node is private (and, before AutoNAT's first verdict,
  while none of its own addresses is public: ``nat.addresses.wants_relays``), renews each once
  ``relay.renew_fraction`` of its TTL has passed, and builds the relayed addresses
  ``<relay addr>/p2p/<relay id>/p2p-circuit`` the capability record carries.
- A reservation lives only as long as the connection to its relay (circuit v2 spec): when that
  connection closes (a notifee sees it; the maintenance loop checks too) the reservation and its
  circuit addresses are dropped at once (a connection that dies silently, e.g. a home router
  forgetting its NAT mapping, is found by a ping every ``probe_interval_s``, two unanswered in a
  row: one answered late on a busy machine dropped live relays several times a minute), another known relay
  is reserved on, and the lost relay is re-dialled with capped exponential backoff (``retry_delay``:
  1 s doubling to 60 s) and reserved on again as soon as it is connected. Failed renewals back off
  the same way (they used to be retried every 0.05 s); failures are logged once a minute per relay.
- A ``/p2p-circuit`` address is dialled only by ``CircuitV2Transport.dial()`` (``host.connect()``
  ignores it): ``connect_via_relay`` (``wire/streams.py``) does that before a ``new_stream`` when the peer has no
  working direct address.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import PING_LENGTH
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from nat.addresses import ip_bucket, is_loopback_ip, sources_for
from nat.autonat import remote_ip
from nat.notifee import QuietNotifee
from nat.relay_rules import Peer, reservation_per_ip
from wire.streams import (  # is_circuit is still imported from here
    DIAL_TIMEOUT_S,
    is_circuit,
    register_circuit_dialer,
    unregister_circuit_dialer,
)

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

HOP = str(HOP_PROTOCOL)
RESERVE_TIMEOUT_S = 10.0
TOP_UP_POLL_S = 1.0  # while short of min_relays: how often connected peers are checked for new relays
_SERVICES: weakref.WeakKeyDictionary[IHost, RelayService] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class RelaySettings:
    """What ``[relay]`` configures (see ``node.config.RelaySection``)."""

    max_reservations: int = 16
    # Of those, held from one IP (or IPv6 /64) at once; loopback exempt unless told (a swarm on one machine).
    max_reservations_per_ip: int = 4
    reservations_loopback_exempt: bool = True
    reservation_ttl_s: int = 3600
    max_circuits: int = 8
    max_circuit_duration_s: int = 120
    max_circuit_bytes: int = 1 << 20
    static_relays: tuple[str, ...] = ()
    min_relays: int = 2
    renew_fraction: float = 0.5
    poll_interval_s: float = 5.0
    probe_interval_s: float = 5.0  # each reserved-on relay is pinged this often over its connection
    probe_timeout_s: float = 4.0  # two pings unanswered this long: the connection is dead (a silent NAT, a hung relay)


class RelayRefused(Exception):
    def __init__(self, relay: ID, status: int) -> None:
        super().__init__(f"relay {relay} refused the reservation ({StatusCode(status).name})")
        self.relay = relay
        self.status = status


@dataclass
class Reservation:
    relay_id: str
    relay_addrs: list[str]  # each ends in /p2p/<relay id>
    expires_at: float  # unix seconds, as the relay said
    reserved_at: float
    renewals: int = 0
    limit_duration_s: int = 0
    limit_data: int = 0

    def circuit_addrs(self) -> list[str]:
        return [f"{addr}/p2p-circuit" for addr in self.relay_addrs]


RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
PROBE_TRIES = 2  # pings in a row that must go unanswered before a relay is taken for gone
LOG_EVERY_S = 60.0
MAX_LOST = 16  # lost relays re-dialled at once (configured ones are re-dialled anyway)
GIVE_UP_AFTER = 14  # failed re-dials of a lost relay found by discovery: 1+2+...+32+60*8 s, ~10 min


def retry_delay(failures: int, *, first_s: float = RETRY_FIRST_S, max_s: float = RETRY_MAX_S) -> float:
    """Seconds to wait after ``failures`` consecutive failures with one relay: 1, 2, 4, ... 60."""
    if failures <= 0:
        return 0.0
    return min(max_s, first_s * 2.0 ** min(failures - 1, 32))


@dataclass
class _Health:
    """One relay's consecutive failures, when it may be tried again, and when we last logged about it."""

    failures: int = 0
    retry_at: float = 0.0
    logged_at: float = float("-inf")
    quiet: int = 0  # failures not logged since logged_at


@dataclass
class _Failures:
    health: dict[str, _Health] = field(default_factory=dict)

    def get(self, key: str) -> _Health:
        return self.health.setdefault(key, _Health())

    def may_try(self, key: str, now: float) -> bool:
        health = self.health.get(key)  # asking adds no entry: only relays that failed are kept
        return health is None or health.retry_at <= now

    def failed(self, key: str, now: float, what: str, error: object) -> None:
        health = self.get(key)
        health.failures += 1
        health.retry_at = now + retry_delay(health.failures)
        if now - health.logged_at >= LOG_EVERY_S:
            more = f" ({health.quiet} more failures not logged)" if health.quiet else ""
            log.info("%s %s failed: %s; next try in %.0f s%s", what, key, error, health.retry_at - now, more)
            health.logged_at, health.quiet = now, 0
        else:
            health.quiet += 1
            log.debug("%s %s failed: %s", what, key, error)

    def succeeded(self, key: str) -> None:
        health = self.health.get(key)
        if health is not None:
            health.failures, health.retry_at = 0, 0.0

    def retry_now(self, key: str) -> None:
        """The relay is connected again: try it at once, whatever its backoff said."""
        health = self.health.get(key)
        if health is not None:
            health.retry_at = 0.0


class _RelayWatch(QuietNotifee):
    """Tells the relay service when a peer connects or a relay's last connection closes."""

    def __init__(self, service: RelayService) -> None:
        self._service = weakref.ref(service)

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        service = self._service()
        if service is not None:
            service._peer_connected(str(conn.muxed_conn.peer_id))

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        service = self._service()
        if service is None:
            return
        peer_id = conn.muxed_conn.peer_id
        if not [c for c in network.get_connections(peer_id) if c is not conn]:
            service._relay_lost(str(peer_id), "disconnected")


async def reserve(host: IHost, relay_id: ID) -> Reservation:
    """One RESERVE exchange on a fresh hop stream; a refusal raises ``RelayRefused``."""
    with trio.fail_after(RESERVE_TIMEOUT_S):
        stream = await host.new_stream(relay_id, [HOP_PROTOCOL])
        try:
            await write_delimited_msg(
                stream, HopMessage(type=HopMessage.RESERVE, peer=CircuitPeerId(id=host.get_id().to_bytes()))
            )
            reply = await read_delimited_msg(stream, HopMessage)
        finally:
            with trio.move_on_after(1):
                await stream.close()
    status = reply.status if reply.HasField("status") else int(StatusCode.OK)
    if status != int(StatusCode.OK) or not reply.HasField("reservation"):
        raise RelayRefused(relay_id, status)
    addrs: list[str] = []
    for raw in reply.reservation.addrs:
        try:
            addrs.append(str(multiaddr.Multiaddr(raw)))
        except Exception:  # noqa: BLE001 - a relay's bad address is skipped
            continue
    if not addrs:  # a relay that names none: what we know of it
        addrs = [f"{addr}/p2p/{relay_id}" for addr in host.get_peerstore().addrs(relay_id) if not is_circuit(addr)]
    suffix = f"/p2p/{relay_id}"
    addrs = [addr if addr.endswith(suffix) else addr + suffix for addr in addrs if not is_circuit(addr)]
    return Reservation(
        relay_id=str(relay_id),
        relay_addrs=addrs[:4],
        expires_at=float(reply.reservation.expire),
        reserved_at=time.time(),
        limit_duration_s=reply.limit.duration if reply.HasField("limit") else 0,
        limit_data=reply.limit.data if reply.HasField("limit") else 0,
    )


def _free_departed_reservations(protocol: CircuitV2Protocol) -> None:
    """A reservation is valid only while its holder stays connected (circuit v2 spec).

    py-libp2p frees a slot only at expiry (an hour by default), so peers that came and went kept
    the relay full: in the NAT matrix a relay with 16 slots refused every private node after two
    rounds of eight. Slots of disconnected holders are now freed whenever expired ones are.
    """
    manager = protocol.resource_manager
    clean_expired = manager._clean_expired

    def clean_expired_and_departed() -> None:
        clean_expired()
        for peer_id in [p for p in manager._reservations if not manager._is_peer_connected(p)]:
            del manager._reservations[peer_id]

    manager._clean_expired = clean_expired_and_departed  # type: ignore[method-assign]


def _limit_reservations_per_ip(protocol: CircuitV2Protocol, host: IHost, per_ip: int, loopback_exempt: bool) -> None:
    """At most ``per_ip`` reservations held from one IP (IPv6 /64): py-libp2p counts only the total.
    The rule is ``nat.relay_rules.reservation_per_ip``; this fetches where the asker and each holder
    connected from, and a refusal gets py-libp2p's answer to a full relay (``RESOURCE_LIMIT_EXCEEDED``,
    the status the rule names)."""
    manager = protocol.resource_manager
    can_accept = manager.can_accept_reservation

    def peer(peer_id: ID) -> Peer:
        address = remote_ip(host, peer_id)
        if not address:
            return Peer(None)
        return Peer(ip_bucket(address), on_loopback=is_loopback_ip(address))

    def can_accept_within_ip_limit(peer_id: ID) -> bool:
        if not can_accept(peer_id):
            return False
        # Looked up only if the rule counts them (not for a renewal or an exempt asker).
        holders = (peer(holder) for holder in list(manager._reservations) if holder != peer_id)
        verdict = reservation_per_ip(
            peer(peer_id),
            holders,
            renewal=manager.has_reservation(peer_id),
            per_ip=per_ip,
            loopback_exempt=loopback_exempt,
        )
        if verdict is not None:
            log.debug("relay: reservation refused (%s)", verdict.reason)
        return verdict is None

    manager.can_accept_reservation = can_accept_within_ip_limit  # type: ignore[method-assign]


@dataclass
class RelayedTraffic:
    """What this relay carried for others: bytes, and circuits it cut at a limit (data or duration)."""

    bytes: int = 0
    cut: dict[str, int] = field(default_factory=lambda: {"data": 0, "duration": 0})


def _count_relayed_traffic(protocol: CircuitV2Protocol) -> RelayedTraffic:
    """py-libp2p keeps a circuit's byte count in a local variable and only logs a cut; an operator
    (and the lease-over-relay test) needs both. Every relayed chunk passes through
    ``_read_stream_with_retry`` and every cut sends RESOURCE_LIMIT_EXCEEDED through ``_send_status``."""
    traffic = RelayedTraffic()
    read = protocol._read_stream_with_retry
    send_status = protocol._send_status

    async def counted_read(stream: INetStream, *args: object, **kwargs: object) -> bytes | None:
        data = await read(stream, *args, **kwargs)  # type: ignore[arg-type]
        if data:
            traffic.bytes += len(data)
        return data

    async def counted_status(
        stream: INetStream, status: StatusCode, message: str, *args: object, **kwargs: object
    ) -> None:
        if status == StatusCode.RESOURCE_LIMIT_EXCEEDED:
            if "duration limit" in message:
                traffic.cut["duration"] += 1
            elif "Data transfer limit" in message:
                traffic.cut["data"] += 1
        await send_status(stream, status, message, *args, **kwargs)  # type: ignore[arg-type]

    protocol._read_stream_with_retry = counted_read  # type: ignore[method-assign]
    protocol._send_status = counted_status  # type: ignore[method-assign, assignment]
    return traffic


class RelayService:
    """The relay protocol on one host: hop service (relay role), reservations while private, dialing."""

    def __init__(
        self,
        host: IHost,
        settings: RelaySettings,
        *,
        serve_hop: bool,
        wants_reservations: Callable[[], bool] = lambda: False,
        on_change: Callable[[], None] = lambda: None,
        on_relayed_dial: Callable[[ID], None] = lambda peer_id: None,
    ) -> None:
        self.host = host
        self.on_relayed_dial = on_relayed_dial  # the hole-punch service upgrades what we dial through a relay
        self.settings = settings
        self.serve_hop = serve_hop
        self._wants = wants_reservations
        self._on_change = on_change
        self.limits = RelayLimits(
            duration=settings.max_circuit_duration_s,
            data=settings.max_circuit_bytes,
            max_circuit_conns=settings.max_circuits,
            max_reservations=settings.max_reservations,
            reservation_ttl=settings.reservation_ttl_s,
        )
        self.protocol = CircuitV2Protocol(host, limits=self.limits, allow_hop=serve_hop)
        _free_departed_reservations(self.protocol)
        _limit_reservations_per_ip(
            self.protocol, host, settings.max_reservations_per_ip, settings.reservations_loopback_exempt
        )
        self.relayed = _count_relayed_traffic(self.protocol)  # relay role: what we carried for others
        # No CLIENT role: with it, every dial through a relay first takes a reservation there
        # (transport.py:398), using up the relay's slots for peers that only dial out.
        roles = RelayRole.STOP | (RelayRole.HOP if serve_hop else RelayRole(0))
        self.transport = CircuitV2Transport(
            host,
            self.protocol,
            RelayConfig(
                roles=roles,
                limits=self.limits,
                reservation_ttl=settings.reservation_ttl_s,
                max_circuit_duration=settings.max_circuit_duration_s,
                max_circuit_bytes=settings.max_circuit_bytes,
            ),
        )
        self.reservations: dict[str, Reservation] = {}
        self.dials: dict[str, int] = {"ok": 0, "failed": 0}  # circuits we dialed through a relay
        self._failures = _Failures()
        self._lost: dict[str, None] = {}  # relays whose reservation went with their connection: re-dialled
        self._no_ping: set[str] = set()  # relays that do not speak ping: their connection alone tells
        self.lost_total = 0  # reservations dropped because their relay went away
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None

    # --- what others read -------------------------------------------------------------------

    def relayed_addrs(self) -> list[str]:
        now = time.time()
        return [addr for res in self.reservations.values() if res.expires_at > now for addr in res.circuit_addrs()]

    def summary(self) -> list[dict[str, object]]:
        return [
            {
                "relay": res.relay_id,
                "expires_at": res.expires_at,
                "renewals": res.renewals,
                "addrs": res.circuit_addrs(),
            }
            for res in self.reservations.values()
        ]

    def hop_reservations(self) -> int:
        """Relay role: reservations this node holds for others now."""
        manager = self.protocol.resource_manager
        manager._clean_expired()
        return len(manager._reservations)

    def _changed(self) -> None:
        """Our circuit addresses changed: the owner republishes its record; connected peers learn the
        new addresses now (identify push), not at their next identify."""
        self._on_change()
        if self._nursery is not None:
            self._nursery.start_soon(self._push_identify)

    async def _push_identify(self) -> None:
        try:
            with trio.move_on_after(10):
                await push_identify_to_peers(self.host)
        except Exception as error:  # noqa: BLE001 - best effort; peers learn it on their next identify
            log.debug("identify push failed: %s", type(error).__name__)

    def wake(self) -> None:
        self._wake.set()

    def _connected_to(self, key: str) -> bool:
        try:
            return bool(self.host.get_network().get_connections(ID.from_base58(key)))
        except Exception:  # noqa: BLE001 - a malformed id is not connected
            return False

    def _relay_lost(self, key: str, why: str) -> None:
        """The connection to a relay we hold a reservation on is gone: so is the reservation."""
        if self.reservations.pop(key, None) is None:
            return
        self.lost_total += 1
        self._lost.pop(key, None)
        self._lost[key] = None  # newest last
        while len(self._lost) > MAX_LOST:  # relays only found as connected hop peers come and go
            del self._lost[next(iter(self._lost))]
        log.info("relay %s lost (%s): reservation dropped", key, why)
        self._changed()
        self.wake()

    def _peer_connected(self, key: str) -> None:
        """A relay we lost (or a configured one) is connected again: reserve on it now."""
        if key in self._lost or key in self._static_ids():
            self._failures.retry_now(key)
            self.wake()

    def _static_ids(self) -> list[str]:
        ids = []
        for text in self.settings.static_relays:
            try:
                ids.append(str(info_from_p2p_addr(multiaddr.Multiaddr(text)).peer_id))
            except Exception:  # noqa: BLE001 - config validation checked the multiaddr
                continue
        return ids

    # --- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[RelayService] = trio.TASK_STATUS_IGNORED) -> None:
        watch = _RelayWatch(self)
        network = self.host.get_network()
        async with background_trio_service(self.protocol):
            await self.protocol.event_started.wait()
            _SERVICES[self.host] = self
            register_circuit_dialer(self.host, self)
            network.register_notifee(watch)
            sources = sources_for(self.host)
            sources.relayed = self.relayed_addrs  # identify carries them (nat.addresses)
            task_status.started(self)
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._probe_loop)
                    await self._loop()
            finally:
                self._nursery = None
                sources.relayed = lambda: []
                _SERVICES.pop(self.host, None)
                unregister_circuit_dialer(self.host)
                remove = getattr(network, "remove_notifee", None)
                if remove is not None:
                    remove(watch)

    async def _probe_loop(self) -> None:
        """Ping every relay we hold a reservation on; one that does not answer is gone."""
        while True:
            await trio.sleep(self.settings.probe_interval_s)
            async with trio.open_nursery() as nursery:
                for key in list(self.reservations):
                    if key not in self._no_ping:
                        nursery.start_soon(self._probe, key)

    async def _probe(self, key: str) -> None:
        """Ping the relay; it is taken for gone when two pings in a row go unanswered (the second
        sent at once): on a busy machine one ping answered late dropped a live relay, and its
        reservation with it, several times a minute."""
        for attempt in range(PROBE_TRIES):
            if await self._ping_once(key, last=attempt == PROBE_TRIES - 1):
                return

    async def _ping_once(self, key: str, *, last: bool) -> bool:
        """One ping; True when the relay answered or needs no more pings (not probed, not ours now,
        judged lost)."""
        peer_id = ID.from_base58(key)
        if not self._connected_to(key):
            self._relay_lost(key, "not connected")
            return True
        payload = b"\x00" * PING_LENGTH
        try:
            with trio.fail_after(self.settings.probe_timeout_s):
                stream = await self.host.new_stream(peer_id, [PING_PROTOCOL])
                try:
                    await stream.write(payload)
                    received = b""
                    while len(received) < PING_LENGTH:
                        chunk = await stream.read(PING_LENGTH - len(received))
                        if not chunk:
                            raise ConnectionError("ping stream closed")
                        received += chunk
                finally:
                    with trio.move_on_after(1):
                        await stream.close()
        except Exception as error:  # noqa: BLE001 - sorted out below
            if key not in self.reservations:
                return True
            if not isinstance(error, trio.TooSlowError) and self._connected_to(key):
                # Answered, but not ping (a relay without the protocol): alive; don't ask it again.
                self._no_ping.add(key)
                log.debug("relay %s does not answer ping (%s): not probed", key, type(error).__name__)
                return True
            if not last and isinstance(error, trio.TooSlowError):
                log.debug("relay %s: ping unanswered within %.0f s, pinging again", key, self.settings.probe_timeout_s)
                return False
            self._relay_lost(key, f"ping failed: {type(error).__name__}")
            with trio.move_on_after(2):
                try:
                    await self.host.disconnect(peer_id)  # the dead connection: a redial opens a fresh one
                except Exception:  # noqa: BLE001 - already gone
                    pass
        return True

    async def _loop(self) -> None:
        while True:
            self._wake = trio.Event()
            if self._wants():
                await self._maintain()
            elif self.reservations:
                self.reservations.clear()  # public again: the relays' copies simply expire
                self._changed()
            with trio.move_on_after(self._next_wake_in()):
                await self._wake.wait()

    def _renew_at(self, res: Reservation) -> float:
        return res.reserved_at + (res.expires_at - res.reserved_at) * self.settings.renew_fraction

    def _next_wake_in(self) -> float:
        """Until the next renewal or retry falls due (never before a relay's backoff allows it)."""
        delay = self.settings.poll_interval_s
        now = time.time()
        if self._wants():
            for key, res in self.reservations.items():
                due = max(self._renew_at(res), self._failures.get(key).retry_at)
                delay = min(delay, due - now)
            if len(self.reservations) < self.settings.min_relays:
                # A relay found as a connected peer is known only once identify says it serves the hop
                # protocol: looked for every second (cheap; each relay's own backoff still applies).
                delay = min(delay, TOP_UP_POLL_S)
                for key in [*self._static_ids(), *self._lost]:
                    if key not in self.reservations:
                        delay = min(delay, self._failures.get(key).retry_at - now)
        return max(0.05, delay)

    def candidates(self) -> list[ID]:
        """Relays to try: the configured ones first, then relays we lost that are connected again, then
        connected peers that announce the hop protocol."""
        found: list[ID] = [ID.from_base58(key) for key in self._static_ids()]
        for key in self._lost:
            peer = ID.from_base58(key)
            if peer not in found and self._connected_to(key):
                found.append(peer)
        store = self.host.get_peerstore()
        for peer in self.host.get_connected_peers():
            try:
                if peer not in found and HOP in [str(p) for p in store.get_protocols(peer)]:
                    found.append(peer)
            except Exception:  # noqa: BLE001 - not identified yet
                continue
        return [peer for peer in found if peer != self.host.get_id()]

    async def _connect_relays(self) -> None:
        """Dial the configured relays and the lost ones we are not connected to, each within its backoff."""
        infos: dict[str, PeerInfo] = {}
        static = set(self._static_ids())
        for text in self.settings.static_relays:
            info = info_from_p2p_addr(multiaddr.Multiaddr(text))
            infos.setdefault(str(info.peer_id), info)
        store = self.host.get_peerstore()
        for key in self._lost:
            if key not in infos:
                peer_id = ID.from_base58(key)
                try:
                    addrs = [addr for addr in store.addrs(peer_id) if not is_circuit(addr)]
                except Exception:  # noqa: BLE001 - its addresses expired from the peer store
                    addrs = []
                if addrs:
                    infos[key] = PeerInfo(peer_id, addrs)
        for key, info in infos.items():
            if info.peer_id == self.host.get_id() or key in self.reservations or self._connected_to(key):
                continue
            if not self._failures.may_try(key, time.time()):
                continue
            # py-libp2p refuses every dial to a peer for 60 s after all its addresses failed (its
            # negative cache): a relay back after 5 s would wait out the rest. Our backoff decides.
            negative = getattr(self.host.get_network(), "_negative_peer_cache", None)
            if negative is not None:
                negative.evict(key)
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    await self.host.connect(info)
            except Exception as error:  # noqa: BLE001 - retried after its backoff
                self._failures.failed(key, time.time(), "dialing relay", type(error).__name__)
                if key in self._lost and key not in static and self._failures.get(key).failures >= GIVE_UP_AFTER:
                    del self._lost[key]  # ~10 min without an answer: forgotten until seen again

    async def _maintain(self) -> None:
        now = time.time()
        changed = False
        for key, res in list(self.reservations.items()):
            if res.expires_at <= now:
                del self.reservations[key]
                changed = True
            elif not self._connected_to(key):  # the notifee missed it (or it closed meanwhile)
                self._relay_lost(key, "not connected")
        await self._connect_relays()
        # Renew what is due (and allowed by the relay's backoff).
        for key, res in list(self.reservations.items()):
            now = time.time()
            if self._renew_at(res) <= now and self._failures.may_try(key, now):
                try:
                    fresh = await reserve(self.host, ID.from_base58(key))
                except Exception as error:  # noqa: BLE001 - kept until it expires or its relay goes away
                    self._failures.failed(key, time.time(), "renewing the reservation on", error)
                    if not self._connected_to(key):
                        self._relay_lost(key, "renewal failed")
                    continue
                self._failures.succeeded(key)
                fresh.renewals = res.renewals + 1
                self.reservations[key] = fresh
                changed = changed or fresh.relay_addrs != res.relay_addrs
        # Top up to min_relays: lost relays that are back, configured ones, connected hop peers.
        # The missing ones are asked at once (in parallel), each success told as it comes: a home
        # node's first circuit address is what makes it reachable, the second need not wait on it.
        wanted: list[ID] = []
        for relay in self.candidates():
            key = str(relay)
            if key in self.reservations or not self._failures.may_try(key, time.time()):
                continue
            if key in self._lost and not self._connected_to(key):
                continue  # _connect_relays re-dials it within its backoff
            wanted.append(relay)
        wanted = wanted[: max(0, self.settings.min_relays - len(self.reservations))]
        if changed:
            self._changed()
        if wanted:
            async with trio.open_nursery() as nursery:
                for relay in wanted:
                    nursery.start_soon(self._reserve_on, relay)

    async def _reserve_on(self, relay: ID) -> None:
        key = str(relay)
        try:
            reservation = await reserve(self.host, relay)
        except Exception as error:  # noqa: BLE001 - another relay is tried on the next round
            self._failures.failed(key, time.time(), "reservation on", error)
            return
        if not self._wants() or (len(self.reservations) >= self.settings.min_relays and key not in self.reservations):
            return  # public meanwhile, or another parallel ask filled the quota meanwhile (never more than min_relays)
        self.reservations[key] = reservation
        self._failures.succeeded(key)
        self._lost.pop(key, None)
        log.info("reserved on relay %s until %d", key, reservation.expires_at)
        self._changed()


def service_for(host: IHost) -> RelayService | None:
    return _SERVICES.get(host)
