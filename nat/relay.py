"""Circuit relay v2: serve as a relay, hold reservations while private, dial through a relay.

Built on py-libp2p's ``libp2p.relay.circuit_v2``:

- ``CircuitV2Protocol`` is the hop service (``allow_hop=True`` on a ``relay`` node, with limits from
  ``[relay]``) and, on every node, the stop handler that accepts circuits a relay opens to us.
- Reservations are made here, not by py-libp2p's ``CircuitV2Transport._refresh_reservations_worker``:
  that worker renews only 30 s before expiry (``RESERVATION_REFRESH_MARGIN``, transport.py:83),
  keeps no relay addresses and swallows refusals. ``RelayService`` keeps at least
  ``relay.min_relays`` reservations while the node is private, renews each once
  ``relay.renew_fraction`` of its TTL has passed, and builds the relayed addresses
  ``<relay addr>/p2p/<relay id>/p2p-circuit`` the capability record carries.
- A ``/p2p-circuit`` address is dialled only by ``CircuitV2Transport.dial()`` (``host.connect()``
  ignores it): ``connect_via_relay`` does that before a ``new_stream`` when the peer has no
  working direct address.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
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

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

HOP = str(HOP_PROTOCOL)
RESERVE_TIMEOUT_S = 10.0
DIAL_TIMEOUT_S = 10.0
_SERVICES: weakref.WeakKeyDictionary[IHost, RelayService] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class RelaySettings:
    """What ``[relay]`` configures (see ``node.config.RelaySection``)."""

    max_reservations: int = 16
    reservation_ttl_s: int = 3600
    max_circuits: int = 8
    max_circuit_duration_s: int = 120
    max_circuit_bytes: int = 1 << 20
    static_relays: tuple[str, ...] = ()
    min_relays: int = 2
    renew_fraction: float = 0.5
    poll_interval_s: float = 5.0


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


@dataclass
class _Failures:
    until: dict[str, float] = field(default_factory=dict)


def is_circuit(addr: multiaddr.Multiaddr | str) -> bool:
    return "/p2p-circuit" in str(addr)


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
        self._wake = trio.Event()

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

    def wake(self) -> None:
        self._wake.set()

    # --- running ------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[RelayService] = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.protocol):
            await self.protocol.event_started.wait()
            _SERVICES[self.host] = self
            task_status.started(self)
            try:
                while True:
                    self._wake = trio.Event()
                    if self._wants():
                        await self._maintain()
                    elif self.reservations:
                        self.reservations.clear()  # public again: the relays' copies simply expire
                        self._on_change()
                    with trio.move_on_after(self._next_wake_in()):
                        await self._wake.wait()
            finally:
                _SERVICES.pop(self.host, None)

    def _renew_at(self, res: Reservation) -> float:
        return res.reserved_at + (res.expires_at - res.reserved_at) * self.settings.renew_fraction

    def _next_wake_in(self) -> float:
        delay = self.settings.poll_interval_s
        if self._wants():
            for res in self.reservations.values():
                delay = min(delay, self._renew_at(res) - time.time())
        return max(0.05, delay)

    def candidates(self) -> list[ID]:
        """Relays to try: the configured ones first, then connected peers that announce the hop protocol."""
        found: list[ID] = []
        for text in self.settings.static_relays:
            try:
                found.append(info_from_p2p_addr(multiaddr.Multiaddr(text)).peer_id)
            except Exception:  # noqa: BLE001 - config validation checked the multiaddr
                continue
        store = self.host.get_peerstore()
        for peer in self.host.get_connected_peers():
            try:
                if peer not in found and HOP in [str(p) for p in store.get_protocols(peer)]:
                    found.append(peer)
            except Exception:  # noqa: BLE001 - not identified yet
                continue
        return [peer for peer in found if peer != self.host.get_id()]

    async def _connect_static(self) -> None:
        for text in self.settings.static_relays:
            info = info_from_p2p_addr(multiaddr.Multiaddr(text))
            if info.peer_id == self.host.get_id() or self.host.get_network().get_connections(info.peer_id):
                continue
            if self._failures.until.get(str(info.peer_id), 0.0) > time.time():
                continue
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    await self.host.connect(info)
            except Exception as error:  # noqa: BLE001 - retried later
                log.info("relay %s unreachable: %s", info.peer_id, type(error).__name__)
                self._failures.until[str(info.peer_id)] = time.time() + 30.0

    async def _maintain(self) -> None:
        now = time.time()
        changed = False
        for key, res in list(self.reservations.items()):
            if res.expires_at <= now:
                del self.reservations[key]
                changed = True
        await self._connect_static()
        # Renew what is due.
        for key, res in list(self.reservations.items()):
            if self._renew_at(res) <= now:
                try:
                    fresh = await reserve(self.host, ID.from_base58(key))
                except Exception as error:  # noqa: BLE001 - kept until it expires, then replaced
                    log.info("renewing the reservation on %s failed: %s", key, error)
                    continue
                fresh.renewals = res.renewals + 1
                self.reservations[key] = fresh
                changed = changed or fresh.relay_addrs != res.relay_addrs
        # Top up to min_relays.
        for relay in self.candidates():
            if len(self.reservations) >= self.settings.min_relays:
                break
            key = str(relay)
            if key in self.reservations or self._failures.until.get(key, 0.0) > now:
                continue
            try:
                self.reservations[key] = await reserve(self.host, relay)
            except Exception as error:  # noqa: BLE001 - another relay is tried
                log.info("reservation on %s failed: %s", key, error)
                self._failures.until[key] = now + 30.0
                continue
            log.info("reserved on relay %s until %d", key, self.reservations[key].expires_at)
            changed = True
        if changed:
            self._on_change()


def service_for(host: IHost) -> RelayService | None:
    return _SERVICES.get(host)


async def connect_via_relay(host: IHost, peer_id: ID, addrs: Sequence[multiaddr.Multiaddr] = ()) -> bool:
    """Make sure a connection to ``peer_id`` exists, through a relay when no direct address works.

    Returns False when nothing was done (already connected, or no circuit address known: the
    caller's ``new_stream`` dials as usual); raises the last error when every circuit failed.
    """
    network = host.get_network()
    if network.get_connections(peer_id):
        return False
    known = list(addrs)
    try:
        known += [addr for addr in host.get_peerstore().addrs(peer_id) if addr not in known]
    except Exception:  # noqa: BLE001 - no addresses stored
        pass
    circuits = [addr for addr in known if is_circuit(addr)]
    if not circuits:
        return False
    # Circuit addresses come from the peer's signed record, which names them only while the peer
    # is private: its direct addresses would time out behind its NAT, so the relays go first and
    # a hole punch (``nat.holepunch``) finds the direct path afterwards.
    service = _SERVICES.get(host)
    error: Exception = ConnectionError("no relay service runs on this host")
    if service is not None:
        suffix = f"/p2p/{peer_id}"
        for addr in circuits:
            text = str(addr)
            target = multiaddr.Multiaddr(text if text.endswith(suffix) else text + suffix)
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    await service.transport.dial(target)
                service.dials["ok"] += 1
                service.on_relayed_dial(peer_id)
                return True
            except Exception as failure:  # noqa: BLE001 - the next relay is tried
                service.dials["failed"] += 1
                log.info("no circuit to %s through %s: %s", peer_id, text.split("/p2p/")[1], type(failure).__name__)
                error = failure
    direct = [addr for addr in known if not is_circuit(addr)]
    if direct:
        # A stale record: the peer may be public again.
        with trio.fail_after(DIAL_TIMEOUT_S):
            await host.connect(PeerInfo(peer_id, direct))
        return True
    raise error


async def open_stream(host: IHost, peer_id: ID, protocols: Sequence[TProtocol]) -> INetStream:
    """``host.new_stream``, first connecting through a relay when the peer is known only by circuit addresses."""
    try:
        await connect_via_relay(host, peer_id)
    except Exception as error:  # noqa: BLE001 - new_stream's own dial reports the failure
        log.debug("no circuit to %s: %s", peer_id, error)
    return await host.new_stream(peer_id, list(protocols))
