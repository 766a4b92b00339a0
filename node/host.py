"""Build the libp2p host the way every clawnode node runs it.

Noise is the only security protocol offered: py-libp2p's default also accepts
``/plaintext/2.0.0`` and ``/secio/1.0.0``, which would let a peer talk to us
unencrypted. Yamux is the only muxer. ``max_connections_per_peer=1`` removes
py-libp2p's ~250 ms wait for a fallback dial on every connect.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import multiaddr
import psutil
from libp2p import generate_new_ed25519_identity, new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.identity.identify import identify as identify_module
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStore
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from nat.addresses import advertise_relayed, install_identify_hook, published
from nat.notifee import QuietNotifee
from node.conn_budget import keep_connection_budget
from node.conn_guard import ConnLimits, guard_inbound_connections
from node.dial_order import order_dials
from node.peer_data import bound_peer_data
from node.yamux_writes import bound_receive_buffers, make_frame_writes_whole
from runtime.errors import ClawnodeError, ErrorCode

log = logging.getLogger(__name__)

SECURITY_PROTOCOLS = (str(NOISE_PROTOCOL_ID),)
MUXER_PROTOCOLS = (str(YAMUX_PROTOCOL_ID),)


def clawnode_version() -> str:
    try:
        return version("clawnode")
    except PackageNotFoundError:
        return "0+unknown"


def agent_version() -> str:
    """What identify tells peers this node runs: ``clawnode/<version>``, as js-libp2p says ``js-libp2p/…``."""
    return f"clawnode/{clawnode_version()}"


def announce_clawnode_agent() -> None:
    """Make identify (and identify push) announce :func:`agent_version` instead of ``py-libp2p/<version>``.

    py-libp2p 0.8.1 reads the module global ``AGENT_VERSION`` each time it builds an identify
    message and offers no setting for it; one process runs one clawnode, so setting it once is right.
    """
    identify_module.AGENT_VERSION = agent_version()


def build_host(
    key_pair: KeyPair,
    *,
    max_connections: int = 300,
    peerstore: PeerStore | None = None,
    listen_addrs: Sequence[multiaddr.Multiaddr] = (),
    extra_addrs: Callable[[], list[str]] = list,
    conn_limits: ConnLimits | None = None,
    connection_budget: int | None = None,
) -> IHost:
    """A host offering Noise + Yamux only, whose inbound streams cannot crash it.

    ``listen_addrs`` must be the addresses later given to ``host.run()`` when one of
    them is QUIC: py-libp2p builds the QUIC transport only when it sees one here,
    and otherwise silently listens on nothing for it. ``extra_addrs`` are advertised too
    (identify, AutoNAT): the address a UPnP mapping gave us on the router. ``conn_limits``
    bound the inbound connections still in their handshake (``node.conn_guard``); only
    upgraded connections count against ``max_connections``. ``connection_budget``: keep about that
    many connections, closing idle ones (``node.conn_budget``); None keeps every connection up to
    ``max_connections``.
    """
    announce_clawnode_agent()
    make_frame_writes_whole()  # a cancelled writer never leaves half a Noise frame (node.yamux_writes)
    bound_receive_buffers()  # a peer writing past a stream's window is not buffered past it (same)
    # py-libp2p's auto-connector dials known peers while below these: never past the budget.
    keep = min(max_connections, connection_budget or max_connections)
    min_connections = min(8, keep)
    limits = conn_limits or ConnLimits()
    if limits.max_inbound is None:  # py-libp2p's own split: outbound dials keep min_connections
        limits = dataclasses.replace(limits, max_inbound=max(1, max_connections - min_connections))
    built: list[IHost] = []

    def addrs_factory(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        # Ranked by reachability (nat.addresses.rank_addrs): py-libp2p dials one TCP address per
        # peer, the first its peer store lists, and peers store ours in the order identify sends them.
        listen = [str(addr) for addr in advertised_addrs(candidates)]
        extra = [str(addr) for addr in _parse_extra(extra_addrs())]
        if not built:
            return _unique(_parse_extra(extra + listen))
        return _parse_extra(published(built[0], listen, extra))

    host = new_host(
        listen_addrs=list(listen_addrs) or None,
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        peerstore_opt=peerstore,
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,
            max_connections=max_connections,
            # py-libp2p dials every known peer until 50 connections by default;
            # a home node needs a handful, the DHT dials the rest on demand.
            min_connections=min_connections,
            low_watermark=min(16, keep),
            high_watermark=max_connections,
            # node.conn_guard closes an unfinished upgrade at handshake_timeout_s; this is a backstop.
            inbound_upgrade_timeout=limits.handshake_timeout_s + 1,
        ),
        addrs_factory=addrs_factory,
    )
    built.append(host)
    install_identify_hook()
    advertise_relayed(host)  # then our relays' circuit addresses, while we hold reservations
    _guard_inbound_streams(host)
    guard_inbound_connections(host.get_network(), limits)  # type: ignore[arg-type]
    bound_peer_data(host.get_peerstore())  # before heal_redials wraps add_addrs: what a stranger leaves
    heal_redials(host)  # before order_dials: its stable sort keeps the newest addresses first in a class
    order_dials(host)
    if connection_budget is not None:  # after heal_redials: a dial it lets through still asks the budget
        keep_connection_budget(host, connection_budget)
        top_up_to_low_watermark(host)
    return host


def top_up_to_low_watermark(host: IHost) -> None:
    """py-libp2p's auto-connector dials known peers only while the node holds fewer connections than
    ``low_watermark``, and only as many as reach it.

    py-libp2p 0.8.1 aims at the midpoint of ``low_watermark`` and ``high_watermark`` (158 here, with
    ``max_connections`` 300) and runs again on every disconnect: under a connection budget each peer
    it dialed was closed again by the budget, that close started the next round of dials, and at
    N = 200 (bench/dht_swarm.py) an idle swarm spent two thirds of a core per 100 nodes on Noise
    handshakes, so DHT streams took seconds to open and lookups ran out of time.
    """
    network: Any = host.get_network()
    connector = getattr(network, "auto_connector", None)
    if connector is None:
        return
    candidates_of = connector._get_candidate_peers

    async def up_to_low_watermark() -> list[ID]:
        missing = network.connection_config.low_watermark - network.get_total_connections()
        missing -= len(connector._in_flight_dials)
        if missing <= 0:
            return []
        candidates = [peer for peer in await candidates_of() if not connector._should_skip_peer(peer)]
        random.shuffle(candidates)
        return candidates[:missing]

    connector._get_candidate_peers = up_to_low_watermark


class _Unblock(QuietNotifee):
    """A peer that connects to us is reachable: lift py-libp2p's negative dial cache for it."""

    def __init__(self, unblock: Callable[[ID], None]) -> None:
        self._unblock = unblock

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._unblock(conn.muxed_conn.peer_id)


def build_dialer_host(max_connections: int) -> IHost:
    """A throwaway host with a fresh identity, for AutoNAT's dial-backs (``AutoNat(build_dialer=…)``)."""
    return build_host(generate_new_ed25519_identity(), max_connections=max_connections)


def heal_redials(host: IHost) -> None:
    """A restarted peer is dialed again at once, at the address it has now.

    py-libp2p 0.8.1 refuses every dial to a peer for 60 s after one dial to it failed (the swarm's
    negative cache), even while that peer holds a connection to us, and dials one TCP address per
    peer, the first its peer store lists: the old one, dead after a restart on a new port. So a
    provider killed and restarted stayed unreachable for ~60 s (the router paid a backup meanwhile,
    and a lease call failed with StreamFailure). Here:

    * a connection from or to the peer (it came back and dialed us, identify, a relay) lifts the
      block, and a dial to a peer we hold an open connection to is never blocked;
    * news about its addresses (``add_addrs``: its signed record read again, a DHT answer, identify)
      lifts it too, and addresses added later are listed first within their dial class (stable
      within one ``add_addrs``, so a record's own order is kept); ``clear_addrs`` forgets them.
    """
    network = host.get_network()
    unblock: Callable[[ID], None] | None = getattr(network, "unblock_peer", None)
    if unblock is None:  # a py-libp2p without the negative cache
        return
    network.register_notifee(_Unblock(unblock))
    dial_peer = network.dial_peer

    async def dial_peer_connected_first(peer_id: ID) -> list[INetConn]:
        # py-libp2p checks the block before the connections it holds: a peer connected to us
        # (it dialed us after its restart) was still refused for the rest of the 60 s.
        if any(not conn.is_closed for conn in network.get_connections(peer_id)):
            unblock(peer_id)
        return await dial_peer(peer_id)

    network.dial_peer = dial_peer_connected_first  # type: ignore[method-assign]
    peerstore = host.get_peerstore()
    add_addrs, clear_addrs, stored = peerstore.add_addrs, peerstore.clear_addrs, peerstore.addrs
    added: dict[ID, dict[str, int]] = {}
    batches = iter(range(1, 1 << 62))

    def add_addrs_noting(peer_id: ID, addrs: Sequence[multiaddr.Multiaddr], ttl: int = 0) -> None:
        add_addrs(peer_id, addrs, ttl)
        if peer_id not in added and len(added) >= 10_000:  # bounded like the peer store itself
            del added[next(iter(added))]
        seen = added.setdefault(peer_id, {})
        batch = next(batches)
        for addr in addrs:
            seen.setdefault(str(addr), batch)
        if len(seen) > 64:  # a peer flooding addresses: keep the newest only
            for old in sorted(seen, key=seen.__getitem__)[: len(seen) - 64]:
                del seen[old]
        unblock(peer_id)

    def clear_addrs_forgetting(peer_id: ID) -> None:
        clear_addrs(peer_id)
        added.pop(peer_id, None)

    def newest_first(peer_id: ID) -> list[multiaddr.Multiaddr]:
        seen = added.get(peer_id, {})
        return sorted(stored(peer_id), key=lambda addr: -seen.get(str(addr), 0))

    peerstore.add_addrs = add_addrs_noting  # type: ignore[method-assign]
    peerstore.clear_addrs = clear_addrs_forgetting  # type: ignore[method-assign]
    peerstore.addrs = newest_first  # type: ignore[method-assign]


def _guard_inbound_streams(host: IHost) -> None:
    """Contain every failure of an inbound stream to that stream.

    py-libp2p lets an exception raised by a protocol handler (its own DHT's
    included) propagate out of ``host.run()``, so any peer sending garbage could
    stop the node. All inbound streams enter through the swarm's one common
    handler; wrapping it guards every protocol, present and future.
    """
    network = host.get_network()
    negotiate_and_handle: Callable[[INetStream], Awaitable[None]] = network.common_stream_handler  # type: ignore[attr-defined]

    async def guarded(stream: INetStream) -> None:
        try:
            await negotiate_and_handle(stream)
        except Exception as error:  # noqa: BLE001 - a remote peer's fault, not ours
            log.debug(
                "inbound stream on %s failed: %s",
                stream.get_protocol(),
                type(error).__name__,
            )
            try:
                await stream.reset()
            except Exception:  # noqa: BLE001 - already broken
                pass

    network.set_stream_handler(guarded)


def _local_ipv4_addresses() -> list[str]:
    found = []
    for interface_addrs in psutil.net_if_addrs().values():
        for addr in interface_addrs:
            if addr.family == socket.AF_INET:
                found.append(addr.address)
    return found or ["127.0.0.1"]


def advertised_addrs(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Listening on 0.0.0.0 is not an address anyone can dial: advertise each local IPv4 instead."""
    result: list[multiaddr.Multiaddr] = []
    for addr in candidates:
        text = str(addr)
        if text.startswith("/ip4/0.0.0.0/"):
            rest = text[len("/ip4/0.0.0.0") :]
            result.extend(multiaddr.Multiaddr(f"/ip4/{ip}{rest}") for ip in _local_ipv4_addresses())
        else:
            result.append(addr)
    return result


def _unique(addrs: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    seen: set[str] = set()
    return [addr for addr in addrs if not (str(addr) in seen or seen.add(str(addr)))]  # type: ignore[func-returns-value]


def _parse_extra(addrs: list[str]) -> list[multiaddr.Multiaddr]:
    parsed = []
    for addr in addrs:
        try:
            parsed.append(multiaddr.Multiaddr(addr))
        except Exception:  # noqa: BLE001 - a malformed address is not advertised
            continue
    return parsed


def ensure_tcp_ports_free(listen_addrs: Sequence[multiaddr.Multiaddr]) -> None:
    """Refuse to start on a TCP port another process listens on.

    py-libp2p binds with SO_REUSEPORT (for hole punching), so a second node on the
    same port would start without an error and silently share the port's
    connections with the first. A bind without SO_REUSEPORT fails when the port
    has a listener, which is the check.
    """
    for addr in listen_addrs:
        text = str(addr)
        if "/tcp/" not in text or not text.startswith(("/ip4/", "/ip6/")):
            continue
        family = socket.AF_INET6 if text.startswith("/ip6/") else socket.AF_INET
        host = text.split("/")[2]
        port = int(text.split("/tcp/")[1].split("/")[0])
        if port == 0:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                raise ClawnodeError(
                    ErrorCode.UNAVAILABLE, f"cannot listen on {text}: the port is in use (node.listen)"
                ) from None


def parse_multiaddrs(values: Sequence[str]) -> list[multiaddr.Multiaddr]:
    return [multiaddr.Multiaddr(value) for value in values]
