"""Local discovery: nodes on one LAN find each other by mDNS, with no bootstrap peer (issue 23).

This speaks the libp2p mDNS spec (``discovery/mdns.md``), as go-libp2p and js-libp2p do: a node
asks ``_p2p._udp.local`` (a PTR question, multicast to 224.0.0.251:5353) every ``interval_s``,
and answers such questions with a PTR record naming ``<random>._p2p._udp.local`` and a TXT record
there holding ``dnsaddr=<multiaddr>/p2p/<peer id>`` strings. A node that hears an answer naming a
peer it is not connected to dials it; once connected, identify tells the DHT (``DhtService``
adopts connected DHT peers), so the two home machines form a DHT of their own and meet the rest of
the network through whichever of them knows more.

Why not py-libp2p's ``libp2p.discovery.mdns``: it runs zeroconf's own engine, an asyncio loop in a
thread that calls the peer store from that thread (py-libp2p's peer store is not thread-safe, and
this project runs trio only), sleeps in that thread between retries, and advertises the host's
transport addresses as bound (``/ip4/0.0.0.0/...`` for a node listening on all interfaces, which
no peer can dial). Here one trio UDP socket does it all; zeroconf is used only to encode and decode
DNS messages. Packets are parsed defensively: anything malformed is dropped.

A node announces only its LAN and other non-loopback, non-relayed addresses; one listening on
loopback only has none and does not run mDNS (every test daemon on a CI machine would otherwise
find every other). ``node.mdns = false`` turns it off.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import multiaddr
import psutil
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from zeroconf import DNSIncoming, DNSOutgoing, DNSPointer, DNSQuestion, DNSText, const

from nat.addresses import parse_ip

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

SERVICE = "_p2p._udp.local."
GROUP = "224.0.0.251"
PORT = 5353
TTL_S = 120
DEFAULT_INTERVAL_S = 10.0
# A peer heard of again is not dialed more often than this.
REDIAL_AFTER_S = 30.0
# At most this many answers a second (one multicast answer serves every asker on the LAN).
ANSWERS_PER_S = 2
MAX_TXT_ADDRS = 16
MAX_PEERS = 256  # peers remembered (when each was last dialed): bounded
# Dials of peers heard of at once: a LAN stranger's answers can name a dozen fresh peer ids each,
# at addresses it picks; a peer heard while these are busy is dialed when heard of again.
MAX_DIALS_IN_FLIGHT = 4


def announced_addrs(addrs: Iterable[str]) -> list[str]:
    """The addresses worth announcing on the LAN: direct, not loopback (order kept, no ``/p2p/``)."""
    found: list[str] = []
    for addr in addrs:
        bare = addr.split("/p2p/")[0]
        parts = bare.split("/")
        if "/p2p-circuit" in addr or len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
            continue
        ip = parse_ip(parts[2])  # an IPv4-mapped IPv6 address is judged as its IPv4 address
        if ip is None:
            continue
        if ip.is_loopback or ip.is_unspecified or bare in found:
            continue
        found.append(bare)
    return found


def query_packet() -> bytes:
    out = DNSOutgoing(const._FLAGS_QR_QUERY, multicast=True)
    out.add_question(DNSQuestion(SERVICE, const._TYPE_PTR, const._CLASS_IN))
    return bytes(out.packets()[0])


def answer_packet(instance: str, peer_id: str, addrs: list[str]) -> bytes:
    """The PTR answer naming ``instance`` and its TXT record of ``dnsaddr=`` strings."""
    name = f"{instance}.{SERVICE}"
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA, multicast=True)
    out.add_answer_at_time(DNSPointer(SERVICE, const._TYPE_PTR, const._CLASS_IN, TTL_S, name), 0)
    strings = [f"dnsaddr={addr}/p2p/{peer_id}".encode() for addr in addrs[:MAX_TXT_ADDRS]]
    text = b"".join(bytes([len(item)]) + item for item in strings if len(item) < 256)
    out.add_additional_answer(DNSText(name, const._TYPE_TXT, const._CLASS_IN | const._CLASS_UNIQUE, TTL_S, text))
    return bytes(out.packets()[0])


def _txt_strings(text: bytes) -> list[bytes]:
    items, at = [], 0
    while at < len(text):
        length = text[at]
        items.append(text[at + 1 : at + 1 + length])
        at += 1 + length
    return items


@dataclass(frozen=True)
class Heard:
    """What one mDNS message said."""

    asks_for_peers: bool  # a question for ``_p2p._udp.local``
    peers: dict[str, list[str]]  # peer id -> addresses (no ``/p2p/``), from TXT records


def parse_packet(data: bytes) -> Heard:
    """Read an mDNS message; anything malformed says nothing."""
    nothing = Heard(False, {})
    try:
        incoming = DNSIncoming(data)
        if not incoming.valid:
            return nothing
        asks = incoming.is_query() and any(
            q.name.lower() == SERVICE and q.type in (const._TYPE_PTR, const._TYPE_ANY) for q in incoming.questions
        )
        peers: dict[str, list[str]] = {}
        if incoming.is_response():
            for record in incoming.answers():
                if not isinstance(record, DNSText) or not record.name.lower().endswith("." + SERVICE):
                    continue
                for item in _txt_strings(record.text)[:MAX_TXT_ADDRS]:
                    if not item.startswith(b"dnsaddr="):
                        continue
                    addr = item[len(b"dnsaddr=") :].decode("ascii", "replace")
                    if "/p2p/" not in addr or "/p2p-circuit" in addr:
                        continue
                    bare, peer_id = addr.rsplit("/p2p/", 1)
                    try:
                        ID.from_base58(peer_id)
                        multiaddr.Multiaddr(bare)
                    except Exception:  # noqa: BLE001 - not a peer id or not a multiaddr: skipped
                        continue
                    peers.setdefault(peer_id, [])
                    if bare not in peers[peer_id]:
                        peers[peer_id].append(bare)
        return Heard(asks, peers)
    except Exception:  # noqa: BLE001 - a malformed packet from the LAN
        return nothing


def _local_ipv4() -> list[str]:
    found = []
    for interface_addrs in psutil.net_if_addrs().values():
        for addr in interface_addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                found.append(addr.address)
    return found


class MdnsDiscovery:
    """Announce this node and find others on the LAN; ``run`` in a nursery."""

    def __init__(
        self,
        peer_id: ID,
        addrs: Callable[[], list[str]],
        found: Callable[[PeerInfo], Awaitable[object]],
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        port: int = PORT,
        group: str = GROUP,
    ) -> None:
        self.peer_id = peer_id
        self.addrs = addrs
        self.found = found
        self.interval_s = interval_s
        self.port = port
        self.group = group
        self.instance = secrets.token_hex(16)  # the spec's random peer name: our id is in the TXT only
        self.heard = 0  # peers heard of, ever (ourselves left out)
        self._dialed: dict[str, float] = {}
        self._dialing = 0
        self._answered: list[float] = []
        self._sock: trio.socket.SocketType | None = None

    def _open(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        joined = 0
        for local in _local_ipv4() or ["0.0.0.0"]:
            try:
                membership = socket.inet_aton(self.group) + socket.inet_aton(local)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
                joined += 1
            except OSError as error:
                log.debug("mDNS: cannot join %s on %s: %s", self.group, local, error)
        if not joined:
            raise OSError("mDNS: no interface joined the multicast group")
        return sock

    async def run(self, *, task_status: TaskStatus[MdnsDiscovery] = trio.TASK_STATUS_IGNORED) -> None:
        if not announced_addrs(self.addrs()):
            log.info("mDNS off: the node listens on no LAN address")
            task_status.started(self)
            return
        try:
            sock = self._open()
            await sock.bind(("", self.port))
        except OSError as error:
            log.warning("mDNS off: %s", error)
            task_status.started(self)
            return
        self._sock = sock
        with sock:
            task_status.started(self)
            log.info("mDNS: looking for peers on the LAN (%s)", SERVICE)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ask_periodically)
                while True:
                    data, _ = await sock.recvfrom(9000)
                    await self._heard(data, nursery)

    async def _send(self, packet: bytes) -> None:
        if self._sock is None:
            return
        try:
            await self._sock.sendto(packet, (self.group, self.port))
        except OSError as error:  # no route for multicast (yet): the next period tries again
            log.debug("mDNS send failed: %s", error)

    async def _ask_periodically(self) -> None:
        while True:
            await self._answer()  # unsolicited at start, as the spec allows: peers listening learn of us now
            await self._send(query_packet())
            await trio.sleep(self.interval_s)

    async def _answer(self) -> None:
        now = time.monotonic()
        self._answered = [at for at in self._answered if now - at < 1.0]
        if len(self._answered) >= ANSWERS_PER_S:
            return
        addrs = announced_addrs(self.addrs())
        if addrs:
            self._answered.append(now)
            await self._send(answer_packet(self.instance, str(self.peer_id), addrs))

    async def _heard(self, data: bytes, nursery: trio.Nursery) -> None:
        heard = parse_packet(data)
        if heard.asks_for_peers:
            await self._answer()
        mine = str(self.peer_id)
        now = time.monotonic()
        for peer_id, addrs in heard.peers.items():
            if peer_id == mine:
                continue
            if self._dialing >= MAX_DIALS_IN_FLIGHT:
                break
            last = self._dialed.get(peer_id)
            if last is not None and now - last < REDIAL_AFTER_S:
                continue
            if last is None:
                self.heard += 1
            if peer_id not in self._dialed and len(self._dialed) >= MAX_PEERS:
                del self._dialed[next(iter(self._dialed))]
            self._dialed[peer_id] = now
            info = PeerInfo(ID.from_base58(peer_id), [multiaddr.Multiaddr(addr) for addr in addrs])
            self._dialing += 1
            nursery.start_soon(self._found, info)

    async def _found(self, info: PeerInfo) -> None:
        try:
            await self.found(info)
        except Exception as error:  # noqa: BLE001 - a LAN peer we cannot reach now: heard of again later
            log.debug("mDNS peer %s: %s", info.peer_id, type(error).__name__)
        finally:
            self._dialing -= 1


def connect_found(host: IHost, timeout_s: float = 5.0) -> Callable[[PeerInfo], Awaitable[None]]:
    """What a node does with a peer heard of on the LAN: connect, unless connected already."""

    async def connect(info: PeerInfo) -> None:
        if info.peer_id in host.get_connected_peers():
            return
        with trio.fail_after(timeout_s):
            await host.connect(info)
        log.info("mDNS: connected to %s on the LAN", info.peer_id)

    return connect
