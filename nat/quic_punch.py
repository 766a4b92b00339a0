"""QUIC hole punching over py-libp2p 0.8.1: dial from the listen socket's port, predict QUIC addresses.

py-libp2p 0.8.1's QUIC transport dials every connection from a fresh UDP socket on an ephemeral port
and has no ``dial_with_source`` (the hook its swarm calls for hole-punch dials, which the TCP
transport has), and its DCUtR predicts only ``router ip:TCP listen port`` and sprays its QUIC punch
packets from a fresh socket too. So no NAT ever held a mapping for the QUIC listen port that the
other side could reach, and no punch ended on QUIC (the NAT matrix: 0/13). This module is the small
adapter that closes those gaps, written against py-libp2p's public seams so it can go upstream:

- :class:`SourceQUICTransport` adds ``dial_with_source(maddr, source)`` to ``QUICTransport``. The
  dialed connection (:class:`SourceQUICConnection`) gets its own UDP socket, bound to ``source`` (the
  QUIC listen port, with ``SO_REUSEADDR``/``SO_REUSEPORT`` as the listener's socket has) and
  ``connect()``-ed to the peer. Its packets leave from the listen port, so the NAT reuses the listen
  port's mapping (the address we advertised), and the kernel hands the dialed connection every
  datagram from that peer address: a connected UDP socket outranks the unconnected listener in
  Linux's lookup and is never picked by the ``SO_REUSEPORT`` group's hash. Datagrams from every
  other address still reach the listener. (The other design, dialing from the listener's socket
  itself and routing the dialed connection's packets by connection ID in the listener's receive
  loop, needs py-libp2p's connection-ID registry to know client connections and the client packet
  receiver to stop reading the shared socket; the kernel's 4-tuple demux needs neither.)
  ``install(host)`` turns a host's QUIC transport into one (a subclass that adds a method and no
  state, so the instance's class is swapped in place: py-libp2p's ``new_host`` offers no way to
  pass a QUIC transport class).
- :func:`with_quic_predictions` adds ``/ip4/<ip>/udp/<QUIC listen port>/quic-v1`` beside each
  ``/ip4/<ip>/tcp/<port>`` address DCUtR predicts from the observed router address (NATs that keep
  the source port map the QUIC listen port to the same port on the router).
- :func:`spray_from_listener`: the spec's QUIC punch of the side that sent SYNC (random UDP packets
  every 10-200 ms while the other side dials) leaves from the QUIC listener's own socket, so the
  other side's QUIC dial finds this NAT open for it and lands on the listener.

Who does what in a QUIC punch (the DCUtR spec): the side that receives SYNC (py-libp2p's stream
handler) dials QUIC from its listen port; the side that sent SYNC only sprays from its listener and
takes the other side's dial as an inbound connection. It must not dial QUIC from its listen port:
its connected socket would take the other side's Initial packets away from its listener.
Linux only (``SO_REUSEPORT``); elsewhere ``dial_with_source`` binds what it can and the punch falls
back to TCP as before.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import socket
import time
from collections.abc import Sequence

import multiaddr
import trio
from aioquic.quic.connection import QuicConnection as NativeQUICConnection
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.transport.quic.connection import QUICConnection
from libp2p.transport.quic.exceptions import QUICConnectionError, QUICDialError
from libp2p.transport.quic.transport import QUICTransport
from libp2p.transport.quic.utils import is_quic_multiaddr, multiaddr_to_quic_version, quic_multiaddr_to_endpoint

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]
# The spec's spray: one packet every 10-200 ms; bounded in count whatever stops it.
SPRAY_INTERVAL_S = (0.01, 0.2)
SPRAY_MAX_PACKETS = 200
SPRAY_PACKET_BYTES = 64


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def quic_target(addr: multiaddr.Multiaddr | str) -> Endpoint | None:
    """``(ip, port)`` of an ``/ip4|ip6/<ip>/udp/<port>/quic-v1`` address (a circuit address: None)."""
    parts = str(addr).split("/")
    if len(parts) < 6 or parts[1] not in ("ip4", "ip6") or parts[3] != "udp" or parts[5] not in ("quic-v1", "quic"):
        return None
    if "p2p-circuit" in parts:
        return None
    try:
        return parts[2], int(parts[4])
    except ValueError:
        return None


def quic_listeners(host: IHost) -> list[Endpoint]:
    """The host's bound QUIC listen sockets as (ip, port): the real port when it listened on port 0."""
    found: list[Endpoint] = []
    for addr in host.get_transport_addrs():
        target = quic_target(addr)
        if target is not None and target not in found:
            found.append(target)
    return found


def with_quic_predictions(addrs: Sequence[multiaddr.Multiaddr], quic_ports: Sequence[int]) -> list[multiaddr.Multiaddr]:
    """``addrs`` with ``/ipX/<ip>/udp/<port>/quic-v1`` for each QUIC listen port beside every
    ``/ipX/<ip>/tcp/…`` address, QUIC ones first (a pure function; duplicates dropped, order kept)."""
    quic: list[multiaddr.Multiaddr] = []
    seen = {str(addr) for addr in addrs}
    for addr in addrs:
        parts = str(addr).split("/")
        if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
            continue
        for port in quic_ports:
            text = f"/{parts[1]}/{parts[2]}/udp/{int(port)}/quic-v1"
            if text not in seen:
                seen.add(text)
                quic.append(multiaddr.Multiaddr(text))
    return quic + list(addrs)


class SourceQUICConnection(QUICConnection):
    """A dialed QUIC connection whose UDP socket is bound to ``source`` and connected to the peer."""

    def __init__(self, *args: object, source: Endpoint, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._source = source

    async def _initiate_connection(self) -> None:
        sock = trio.socket.socket(family=_family(self._remote_addr[0]), type=socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            await sock.bind(self._source)
            # Connected: the kernel gives this socket, not the listener, what the peer sends to us.
            await sock.connect(self._remote_addr)
        except OSError as error:
            sock.close()
            raise QUICConnectionError(f"cannot dial from {self._source[0]}:{self._source[1]}: {error}") from error
        self._socket = sock
        self._owns_socket = True
        self._quic.connect(self._remote_addr, now=time.time())
        await self._transmit()


class SourceQUICTransport(QUICTransport):
    """``QUICTransport`` with ``dial_with_source``: the swarm's hook for hole-punch dials."""

    async def dial_with_source(self, maddr: multiaddr.Multiaddr, source: Endpoint) -> QUICConnection:
        """Dial ``maddr`` from ``source`` (our QUIC listen address); otherwise as ``dial()`` does."""
        if self._closed:
            raise QUICDialError("Transport is closed")
        if not is_quic_multiaddr(maddr):
            raise QUICDialError(f"Invalid QUIC multiaddr: {maddr}")
        host, port = quic_multiaddr_to_endpoint(maddr)
        peer_text = maddr.get_peer_id()
        if peer_text is None:
            raise QUICDialError("Unable to derive peer id from multiaddr")
        remote_peer_id = ID.from_string(peer_text)
        config = self._quic_configs.get(TProtocol(f"{multiaddr_to_quic_version(maddr)}_client"))
        if config is None:
            raise QUICDialError(f"Unsupported QUIC version in {maddr}")
        if self._background_nursery is None:
            raise QUICDialError("No nursery found to execute tasks")
        config = copy.copy(config)
        config.is_client = True
        if not config.certificate or not config.private_key:
            self._apply_tls_configuration(config, self._security_manager.create_client_config())
        connection = SourceQUICConnection(
            quic_connection=NativeQUICConnection(configuration=config),
            remote_addr=(host, port),
            remote_peer_id=remote_peer_id,
            local_peer_id=self._peer_id,
            is_initiator=True,
            maddr=maddr,
            transport=self,
            security_manager=self._security_manager,
            source=source,
        )
        try:
            await connection.connect(self._background_nursery)
        except BaseException as error:
            with trio.CancelScope(shield=True):
                try:
                    await connection.close()
                except Exception:  # noqa: BLE001 - closing a connection that never came up
                    pass
            if isinstance(error, Exception):
                raise QUICDialError(f"Dial from {source[0]}:{source[1]} failed: {error}") from error
            raise
        self._connections[f"{host}:{port}"] = connection
        return connection


def quic_transport(host: IHost) -> QUICTransport | None:
    """The host's QUIC transport, if it has one."""
    manager = getattr(host.get_network(), "transport_manager", None)
    if manager is None:
        return None
    for transport in manager.get_transports():
        if isinstance(transport, QUICTransport):
            return transport
    return None


def install(host: IHost) -> SourceQUICTransport | None:
    """Give the host's QUIC transport ``dial_with_source`` (idempotent; None: no QUIC transport)."""
    transport = quic_transport(host)
    if transport is None:
        return None
    if not isinstance(transport, SourceQUICTransport):
        if type(transport) is not QUICTransport:  # someone else's subclass: leave it alone
            log.debug("QUIC transport %s is not py-libp2p's: no listen-port dials", type(transport).__name__)
            return None
        transport.__class__ = SourceQUICTransport
    assert isinstance(transport, SourceQUICTransport)
    return transport


async def spray_from_listener(host: IHost, target: Endpoint, stop: trio.Event) -> int:
    """Send random UDP packets to ``target`` from our QUIC listener's socket until ``stop`` (at most
    ``SPRAY_MAX_PACKETS``). Returns how many went out (0: no QUIC listener of that family)."""
    transport = quic_transport(host)
    sock = None
    if transport is not None:
        for listener in transport._listeners:
            candidate = listener._socket if listener.is_listening() else None
            if candidate is not None and candidate.family == _family(target[0]):
                sock = candidate
                break
    if sock is None:
        return 0
    sent = 0
    while not stop.is_set() and sent < SPRAY_MAX_PACKETS:
        try:
            await sock.sendto(os.urandom(SPRAY_PACKET_BYTES), target)
            sent += 1
        except OSError as error:
            log.debug("QUIC punch packet to %s:%d failed: %s", target[0], target[1], error)
        with trio.move_on_after(random.uniform(*SPRAY_INTERVAL_S)):
            await stop.wait()
    return sent
