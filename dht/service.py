"""The node's Kademlia DHT: join through bootstrap peers and the peer book, keep the
routing table fresh, and rejoin when the node finds itself alone."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.identity.identify_push.identify_push import ID_PUSH, push_identify_to_peers
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.tools.anyio_service import background_trio_service

from bootstrap.peer_book import PeerBook
from dht.lookup import Lookup, far_keys, key_of
from dht.lookup_guard import InboundSlots, SilentPeers, may_ask, serves_dht
from dht.protocol_id import current_kad_protocol_id
from dht.record_validator import sequence_of
from nat.addresses import ip_bucket, is_loopback_ip

if TYPE_CHECKING:
    # py-libp2p depends on trio-typing, whose stale trio-stubs hide trio's own TaskStatus from mypy.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

PARALLEL_DIALS = 8
PEER_BOOK_DIAL_LIMIT = 50
PROVIDER_QUERY_FANOUT = 6
PROVIDER_ANSWER_TIMEOUT_S = 5.0
K_CLOSEST = 20  # the peers a provider record is sent to (Kademlia's k)
# The peers closest to a provider key, once looked up, are asked again for this long (and at most
# this many keys are remembered): ``DhtService.find_providers``.
CLOSEST_CACHE_S = 30.0
CLOSEST_CACHE_KEYS = 256
MAX_PENDING_OFFERS = 16  # lookups' closest peers being offered to the routing table at once
ADOPT_INTERVAL_S = 1.0
# Seconds a DHT query (or the join) waits to reach a peer it is not connected to; py-libp2p waited
# its whole 10 s query timeout. A peer not reached in that time is not asked again for a while
# (``lookup_guard.SilentPeers``). Config: dht.dial_timeout_s.
DEFAULT_DIAL_TIMEOUT_S = 4.0
ANNOUNCE_TIMEOUT_S = 10.0
# An inbound DHT stream is served at most this long (a query and its answer take milliseconds; our
# own and py-libp2p's senders open a stream per request), by at most this many streams a peer at once
# (``lookup_guard.InboundSlots``: why).
INBOUND_STREAM_S = 10.0
INBOUND_STREAMS_PER_PEER = 8
# A stream past a peer's share waits this long for one of its streams to end before it is reset: an
# honest node's provide and publish send a dozen at once (a reset FIND_NODE reads as an answer naming
# nobody, a reset PUT_VALUE is not sent again).
INBOUND_SLOT_WAIT_S = 2.0
# py-libp2p serves 12 inbound DHT streams at once for every peer together; with one peer holding up to
# ``INBOUND_STREAMS_PER_PEER``, the others share the rest.
INBOUND_STREAMS = 32
# The peers behind one remote IP (an IPv6 /64) hold at most this many of them together (loopback
# and relayed streams excepted): identities are free, so the per-peer share alone let one host with
# four of them hold every slot.
INBOUND_STREAMS_PER_IP = 16
# ``DhtService.provide``: an ADD_PROVIDER not sent within this long is given up (py-libp2p's query timeout),
# and one that failed (not reached, its stream refused or timed out) is sent again after these pauses.
# On a busy swarm (bench/discovery.py's setup, 40 nodes at load 10) 130 of 210 sends failed so, and
# providers that told nobody stayed unfindable until the next republish, minutes later.
ADD_PROVIDER_TIMEOUT_S = 10.0
ADD_PROVIDER_RETRY_S = (2.0, 6.0)
# The join also walks to one random key in each of this many buckets farthest from us (the half of
# the key space that does not hold us, then a quarter, ...): the self lookup only meets peers close to
# us, and a table with nobody in the far half sent every lookup of a node there to the edge of our own
# half, where it ended among peers that knew nobody past it (bench/dht_swarm.py --trace: "held by",
# the target's ten closest all held it, the walk asked ranks 86-91 of 199).
FAR_BUCKETS = 4
JOIN_DIAL_FACTOR = 2.5  # the join gives each peer this many times dial_timeout_s (10 s by default)


@dataclass(frozen=True)
class JoinReport:
    tried: int
    connected: int


def peer_infos_from_addrs(addrs: Iterable[str]) -> list[PeerInfo]:
    """Group ``/.../p2p/<id>`` multiaddrs by peer."""
    grouped: dict[ID, list[multiaddr.Multiaddr]] = {}
    for text in addrs:
        info = info_from_p2p_addr(multiaddr.Multiaddr(text))
        grouped.setdefault(info.peer_id, []).extend(info.addrs)
    return [PeerInfo(peer_id, found) for peer_id, found in grouped.items()]


def inbound_bucket(stream: INetStream) -> str | None:
    """The per-IP bucket an inbound stream counts in (``nat.addresses.ip_bucket``), or None: loopback
    (every local node and test swarm shares it), a relayed stream, no socket underneath."""
    try:
        if stream.muxed_conn.get_connection_type() is ConnectionType.RELAYED:
            return None  # the relay's address: every peer reaching us through it would share one bucket
        remote = stream.get_remote_address()
    except Exception:  # noqa: BLE001 - a stream without a socket underneath
        return None
    if not remote:
        return None
    address = str(remote[0])
    return None if is_loopback_ip(address) else ip_bucket(address)


class DhtService:
    def __init__(
        self,
        host: IHost,
        *,
        bootstrap_addrs: list[str],
        peer_book: PeerBook,
        refresh_interval_s: float,
        server_mode: bool = True,
        validators: Mapping[str, Validator] | None = None,
        dial_timeout_s: float = DEFAULT_DIAL_TIMEOUT_S,
    ) -> None:
        self.host = host
        self.bootstrap = peer_infos_from_addrs(bootstrap_addrs)
        self.peer_book = peer_book
        self.refresh_interval_s = refresh_interval_s
        self.mode = DHTMode.SERVER if server_mode else DHTMode.CLIENT
        self.protocol_id = current_kad_protocol_id()
        self.validators = dict(validators or {})
        self.dial_timeout_s = dial_timeout_s
        self.kad: KadDHT | None = None
        # ready: one DHT peer is in the routing table, so publishing and lookups can start;
        # joined: the whole join (every bootstrap and remembered peer tried, self lookup) is done.
        self.ready = trio.Event()
        self.joined = trio.Event()
        self.silent: SilentPeers[ID] = SilentPeers()
        self.inbound: InboundSlots[ID] = InboundSlots(INBOUND_STREAMS_PER_PEER, INBOUND_STREAMS_PER_IP)
        self._inbound_freed = trio.Event()  # set (and replaced) as an inbound DHT stream ends
        self.lookup: Lookup | None = None
        # py-libp2p's full refresh, run only when this service asks (``_own_maintenance``)
        self._kad_refresh: Callable[[], Awaitable[None]] | None = None
        self._closest: dict[bytes, tuple[float, list[ID]]] = {}
        self._pending_offers = 0
        self._nursery: trio.Nursery | None = None

    @property
    def dht(self) -> KadDHT:
        if self.kad is None:
            raise RuntimeError("the DHT is not running")
        return self.kad

    def routing_table_size(self) -> int:
        return self.kad.routing_table.size() if self.kad else 0

    async def run(self, *, task_status: TaskStatus[DhtService] = trio.TASK_STATUS_IGNORED) -> None:
        # Strict: a value outside a namespace we validate is refused, so the DHT is
        # not free storage for anyone who connects.
        self.kad = KadDHT(
            self.host,
            self.mode,
            validator=NamespacedValidator(self.validators, strict_validation=True),
            strict_validation=True,
        )
        self._guard_lookups(self.kad)
        self._own_maintenance(self.kad)
        self.kad._inbound_limiter = trio.CapacityLimiter(INBOUND_STREAMS)  # 12 in py-libp2p 0.8.1
        if self.kad.mode == DHTMode.SERVER:  # KadDHT registered its own handler: ours bounds it
            self.host.set_stream_handler(TProtocol(self.protocol_id), self._serve_inbound)
        restore_push_handler = self._watch_identify_push()
        try:
            async with background_trio_service(self.kad), trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self)
                nursery.start_soon(self._adopt_periodically)
                await self.join()
                while True:
                    await trio.sleep(self.refresh_interval_s)
                    await self.refresh()
        finally:
            self._nursery = None
            restore_push_handler()
            with trio.CancelScope(shield=True):
                self.remember_peers()
                await self.peer_book.save()
            self.kad = None

    def _candidates(self) -> list[PeerInfo]:
        me = self.host.get_id()
        seen: set[ID] = {me}
        candidates: list[PeerInfo] = []
        for info in self.bootstrap:
            if info.peer_id not in seen:
                seen.add(info.peer_id)
                candidates.append(info)
        for peer_id_text, addrs in self.peer_book.most_recent(PEER_BOOK_DIAL_LIMIT):
            peer_id = ID.from_base58(peer_id_text)
            if peer_id not in seen:
                seen.add(peer_id)
                candidates.append(PeerInfo(peer_id, [multiaddr.Multiaddr(a) for a in addrs]))
        return candidates

    async def _dial(self, info: PeerInfo, limiter: trio.CapacityLimiter, connected: list[ID]) -> None:
        async with limiter:
            # Longer than a lookup's dial: a bootstrap or remembered peer is worth a slow handshake
            # (on a loaded 2-core box a TCP + Noise + Yamux upgrade took over 4 s, and every join dial
            # was cut short: "0 of 5 known peers answered"); `ready` comes with the first one anyway.
            with trio.move_on_after(self.dial_timeout_s * JOIN_DIAL_FACTOR) as deadline:
                try:
                    await self.host.connect(info)
                except Exception as error:  # noqa: BLE001 - an unreachable peer is normal
                    log.debug("dial %s failed: %s", info.peer_id, type(error).__name__)
                    return
                connected.append(info.peer_id)
                # Publishing and lookups start with the first DHT peer, not when every dial is done.
                await self.dht.add_peer(info.peer_id)
                self._note_ready()
            if deadline.cancelled_caught:
                self._went_silent(info.peer_id)  # the self lookup that follows does not wait on it again

    async def join(self) -> JoinReport:
        """Connect to bootstrap peers and remembered peers, then fill the routing table."""
        candidates = self._candidates()
        connected: list[ID] = []
        limiter = trio.CapacityLimiter(PARALLEL_DIALS)
        async with trio.open_nursery() as nursery:
            for info in candidates:
                nursery.start_soon(self._dial, info, limiter, connected)
        for peer_id in connected:
            await self.dht.add_peer(peer_id)
        if connected:
            await self.look_up_self()
            await self.fill_far_buckets(connected)
            await self.adopt_connected_dht_peers()
        self._note_ready()
        self.remember_peers()
        await self.peer_book.save()
        self.joined.set()
        log.info("joined the DHT: %d of %d known peers answered", len(connected), len(candidates))
        return JoinReport(tried=len(candidates), connected=len(connected))

    async def refresh(self) -> None:
        if self.routing_table_size() == 0 or not self.host.get_connected_peers():
            await self.join()
            return
        await self.adopt_connected_dht_peers()
        await self._refresh_routing_table()
        self.remember_peers()
        await self.peer_book.save()

    async def adopt_connected_dht_peers(self) -> int:
        """Add connected peers that speak our DHT but are missing from the routing table.

        py-libp2p adds a peer when it opens a DHT stream to us, but only if its
        addresses are already known; a stream that beats identify leaves the peer
        out, and nobody would look it up again until it happened to query us.
        """
        kad = self.dht
        peerstore = self.host.get_peerstore()
        in_table = set(kad.routing_table.get_peer_ids())
        adopted = 0
        for peer_id in self.host.get_connected_peers():
            if peer_id in in_table:
                continue
            try:
                speaks_dht = self.protocol_id in peerstore.get_protocols(peer_id) and bool(peerstore.addrs(peer_id))
            except Exception:  # noqa: BLE001 - identify has not finished for this peer
                continue
            if speaks_dht and await kad.add_peer(peer_id):
                adopted += 1
        return adopted

    async def _adopt_periodically(self) -> None:
        # Cheap (no network): soon after identify completes, a new DHT peer is in the
        # table, so the next node to ask us about it hears of it; a peer that turned
        # client (private) leaves it.
        while True:
            await trio.sleep(ADOPT_INTERVAL_S)
            await self.adopt_connected_dht_peers()
            self.drop_clients()
            self._note_ready()

    async def wait_until_ready(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for the first DHT peer; not at all once the join ended without one
        (a node alone answers from what it has at once)."""
        if self.ready.is_set() or self.joined.is_set():
            return
        with trio.move_on_after(timeout_s):
            async with trio.open_nursery() as nursery:

                async def until(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until, self.ready)
                nursery.start_soon(until, self.joined)

    def _note_ready(self) -> None:
        if not self.ready.is_set() and self.routing_table_size() > 0:
            self.ready.set()

    # --- client mode: private nodes stay out of everyone's routing table -------------------------

    def _protocols(self, peer_id: ID) -> list[str] | None:
        try:
            return [str(p) for p in self.host.get_peerstore().get_protocols(peer_id)]
        except Exception:  # noqa: BLE001 - an unknown peer
            return None

    def _speaks_dht(self, peer_id: ID) -> bool | None:
        """Whether identify says the peer serves our DHT (None: identify has not told us yet)."""
        return serves_dht(self._protocols(peer_id), self.protocol_id)

    def may_ask(self, peer_id: ID) -> bool:
        """Whether lookups ask ``peer_id`` now, and whether it may be in the routing table."""
        # A silent peer that holds a connection to us now (it came back, it dialled us) is reachable.
        silent = self.silent.is_silent(peer_id, trio.current_time()) and peer_id not in self.host.get_connected_peers()
        return may_ask(self._protocols(peer_id), self.protocol_id, silent=silent)

    def _went_silent(self, peer_id: ID) -> None:
        self.silent.note(peer_id, trio.current_time())
        if self.kad is not None and self.kad.routing_table.remove_peer(peer_id):
            log.debug("%s let a DHT query time out: out of the routing table", peer_id)

    async def _reach(self, peer_id: ID) -> bool:
        """Connect to ``peer_id`` for a DHT query within ``dial_timeout_s``; False if that failed.

        A peer that cannot be reached in that time goes silent: its address leads nowhere (a LAN
        address seen from outside, a node that left). Once connected, the query itself keeps
        py-libp2p's own timeout: a connected peer that is slow is busy, not gone.
        """
        if peer_id in self.host.get_connected_peers():
            return True
        try:
            addrs = self.host.get_peerstore().addrs(peer_id)
        except Exception:  # noqa: BLE001 - an unknown peer: nowhere to dial
            return False
        if not addrs:
            return False
        with trio.move_on_after(self.dial_timeout_s):
            try:
                await self.host.connect(PeerInfo(peer_id, addrs))
            except Exception as error:  # noqa: BLE001 - refused, unroutable: py-libp2p's failure path
                log.debug("DHT dial to %s failed: %s", peer_id, type(error).__name__)
                return False
            return True
        self._went_silent(peer_id)
        return False

    def _guarded(self, step: Callable[..., Awaitable[Any]], failed: Callable[[], Any]) -> Any:
        """``step(peer_id, ...)``, one of py-libp2p's per-peer queries: skipped for a peer not to be
        asked, and for one that cannot be reached within ``dial_timeout_s`` (which goes silent)."""

        async def guarded(peer_id: ID, *args: Any, **kwargs: Any) -> Any:
            if not self.may_ask(peer_id) or not await self._reach(peer_id):
                return failed()
            return await step(peer_id, *args, **kwargs)

        return guarded

    def _guard_lookups(self, kad: KadDHT) -> None:
        """Keep peers that do not serve the DHT, or went silent, out of the table and out of lookups.

        py-libp2p adds every peer that opens a DHT stream to us, and every peer a routing answer
        names, to the routing table: private nodes that only ask would be handed out as "closer
        peers", and every lookup would wait on dials to their LAN addresses. Each per-peer step
        first reaches the peer within ``dial_timeout_s`` instead of py-libp2p's 10 s; a peer not
        reached leaves the table and is not asked again (``SILENT_HOLD_S``) unless it queries us.
        """
        table = kad.routing_table
        add_to_table = table.add_peer

        async def add_if_askable(peer_obj: PeerInfo | ID, *, skip_server_mode_check: bool = False) -> bool:
            peer_id = peer_obj.peer_id if isinstance(peer_obj, PeerInfo) else peer_obj
            if skip_server_mode_check:
                self.silent.clear(peer_id)  # it just opened a DHT stream to us: alive
            if not self.may_ask(peer_id):
                return False
            return await add_to_table(peer_obj, skip_server_mode_check=skip_server_mode_check)

        table.add_peer = add_if_askable  # type: ignore[method-assign]

        routing = kad.peer_routing
        # Our own iterative lookup (dht/lookup.py: why py-libp2p's is replaced), on this instance only:
        # py-libp2p's find_peer, get_value, put_value, provide and find_providers all call it.
        self.lookup = Lookup(
            self.host,
            self.protocol_id,
            local_closest=table.find_local_closest_peers,
            may_ask=self.may_ask,
            reach=self._reach,
            answered=self._answered,
            offer_later=self._offer_later,
        )
        routing.find_closest_peers_network = self.lookup.closest_peers  # type: ignore[method-assign,assignment]
        routing.find_peer = self.find_peer  # type: ignore[method-assign]
        routing._query_peer_for_closest = self._guarded(routing._query_peer_for_closest, list)  # type: ignore[method-assign]
        values, providers = kad.value_store, kad.provider_store
        values._store_at_peer = self._guarded(values._store_at_peer, lambda: False)  # type: ignore[method-assign]
        values._get_from_peer = self._guarded(values._get_from_peer, lambda: None)  # type: ignore[method-assign]
        providers._send_add_provider = self._guarded(providers._send_add_provider, lambda: False)  # type: ignore[method-assign]
        providers._get_providers_from_peer_with_closers = self._guarded(  # type: ignore[method-assign]
            providers._get_providers_from_peer_with_closers, lambda: ([], [])
        )

    def _watch_identify_push(self) -> Callable[[], None]:
        """A peer that pushes a protocol list without our DHT (it turned client) leaves the routing
        table as the push arrives. Returns what puts py-libp2p's handler back."""
        mux = self.host.get_mux()
        original = mux.handlers.get(ID_PUSH)
        if original is None:
            return lambda: None

        async def handle_push(stream: INetStream) -> None:
            peer_id = stream.muxed_conn.peer_id
            try:
                await original(stream)
            finally:
                if self.kad is not None and self._speaks_dht(peer_id) is False:
                    if self.kad.routing_table.remove_peer(peer_id):
                        log.debug("%s turned DHT client: out of the routing table", peer_id)

        self.host.set_stream_handler(ID_PUSH, handle_push)

        def restore() -> None:
            if mux.handlers.get(ID_PUSH) is handle_push:
                self.host.set_stream_handler(ID_PUSH, original)

        return restore

    def drop_clients(self) -> int:
        """Remove peers that stopped serving the DHT (identify push) from the routing table."""
        kad = self.dht
        dropped = 0
        for peer_id in kad.routing_table.get_peer_ids():
            if self._speaks_dht(peer_id) is False and kad.routing_table.remove_peer(peer_id):
                dropped += 1
        return dropped

    @property
    def serving(self) -> bool:
        return self.kad is not None and self.kad.mode == DHTMode.SERVER

    def serve(self, on: bool) -> bool:
        """Serve the DHT (public nodes) or only query it (private nodes); True if that changed.

        Unlike ``KadDHT.switch_mode`` this keeps our routing table: a client still needs it to
        look things up. Connected peers learn the change at once: the new protocol list is pushed
        to them (identify push), and ours drop a peer whose list lacks the DHT as it arrives.
        """
        kad = self.dht
        mode = DHTMode.SERVER if on else DHTMode.CLIENT
        if kad.mode == mode:
            return False
        kad.mode = mode
        if on:
            self.host.set_stream_handler(TProtocol(self.protocol_id), self._serve_inbound)
        else:
            self.host.remove_stream_handler(TProtocol(self.protocol_id))
        if self._nursery is not None:
            self._nursery.start_soon(self.announce_protocols)
        log.info("DHT %s", "server mode (publicly reachable)" if on else "client mode (private: not in others' tables)")
        return True

    async def _serve_inbound(self, stream: INetStream) -> None:
        """py-libp2p's DHT handler, for at most ``INBOUND_STREAMS_PER_PEER`` streams of one peer at once
        and ``INBOUND_STREAMS_PER_IP`` of one remote IP (one more waits up to ``INBOUND_SLOT_WAIT_S`` for
        one of them to end) and ``INBOUND_STREAM_S`` each: the slots py-libp2p shares between every peer
        are no longer held by one stranger's idle streams."""
        kad = self.dht
        peer_id = stream.muxed_conn.peer_id
        bucket = inbound_bucket(stream)
        deadline = trio.current_time() + INBOUND_SLOT_WAIT_S
        while not self.inbound.take(peer_id, bucket):
            if trio.current_time() >= deadline:
                with contextlib.suppress(Exception):
                    await stream.reset()
                return
            with trio.move_on_at(deadline):
                await self._inbound_freed.wait()
        try:
            with trio.move_on_after(INBOUND_STREAM_S) as cut:
                await kad.handle_stream(stream)
            if cut.cancelled_caught:
                with contextlib.suppress(Exception):
                    await stream.reset()
        finally:
            self.inbound.give_back(peer_id, bucket)
            self._inbound_freed.set()
            self._inbound_freed = trio.Event()

    async def announce_protocols(self) -> None:
        """Push our protocol list (identify push) to every connected peer; best effort."""
        with trio.move_on_after(ANNOUNCE_TIMEOUT_S):
            try:
                await push_identify_to_peers(self.host)
            except Exception as error:  # noqa: BLE001 - peers learn it on their next identify
                log.debug("identify push failed: %s", type(error).__name__)

    async def look_up_self(self) -> None:
        """Kademlia's join: look up our own id and keep the peers met on the way.

        py-libp2p's full refresh also walks a random id in every non-empty bucket,
        one after another; that belongs to the periodic refresh, not to joining.
        """
        kad = self.dht
        try:
            closest = await kad.peer_routing.find_closest_peers_network(self.host.get_id().to_bytes())
        except Exception as error:  # noqa: BLE001 - the periodic refresh tries again
            log.debug("self lookup failed: %s", type(error).__name__)
            return
        peerstore = self.host.get_peerstore()
        for peer_id in closest:
            try:
                addrs = peerstore.addrs(peer_id)
                if addrs:
                    await kad.routing_table.add_peer(PeerInfo(peer_id, addrs))
            except Exception as error:  # noqa: BLE001 - a peer we cannot add is skipped
                log.debug("could not add %s: %s", peer_id, type(error).__name__)

    async def fill_far_buckets(self, seeds: list[ID], buckets: int = FAR_BUCKETS, seeds_per_key: int = 3) -> None:
        """Ask ``seeds`` (the peers the join reached) for the peers closest to one random key in each
        of the ``buckets`` buckets farthest from us, and put those in the routing table (``FAR_BUCKETS``:
        why). One query a key to each of ``seeds_per_key`` seeds (the next ones for the next key) over
        the join's connections, no walk: walks from our own table started at the edge of our half,
        whose peers know nobody past it either, and a walk from the seeds dialed a dozen far peers a
        key, which doubled the join's handshakes. Every seed was asked every key (a join that reached
        50 peers sent 200 queries for 4 keys), and the peers named were added one after another, each
        up to ``dial_timeout_s`` (a full bucket pings its oldest peer): they are added
        ``PARALLEL_DIALS`` at once."""
        if self.lookup is None or not seeds:
            return
        lookup = self.lookup
        named: dict[ID, None] = {}

        async def ask(peer_id: ID, key: bytes) -> None:
            with trio.move_on_after(ANNOUNCE_TIMEOUT_S):
                try:
                    named.update(dict.fromkeys(await lookup.ask_once(peer_id, key)))
                except Exception as error:  # noqa: BLE001 - the periodic refresh fills the table later
                    log.debug("far bucket query to %s failed: %s", peer_id, type(error).__name__)

        per_key = min(max(seeds_per_key, 1), len(seeds))
        async with trio.open_nursery() as nursery:
            keys = far_keys(key_of(self.host.get_id().to_bytes()), buckets, random.Random())
            for index, key in enumerate(keys):
                for step in range(per_key):
                    nursery.start_soon(ask, seeds[(index * per_key + step) % len(seeds)], key)
        limiter = trio.CapacityLimiter(PARALLEL_DIALS)

        async def add(peer_id: ID) -> None:
            async with limiter:
                with trio.move_on_after(self.dial_timeout_s):  # a full bucket pings its oldest peer
                    await self._answered(peer_id)

        async with trio.open_nursery() as nursery:
            for peer_id in named:
                nursery.start_soon(add, peer_id)

    def _own_maintenance(self, kad: KadDHT) -> None:
        """Refresh the routing table and republish only when this service asks.

        py-libp2p's maintenance loop also refreshed the whole table, one walk per bucket, as the DHT
        started (beside the join's own lookups) and every 10 minutes after; and its first round after
        ten minutes walked again for every value put and key provided here, whose "last republished"
        it had never noted (it republishes each after 22 h). The join and ``refresh_interval_s``
        refresh the table, and the publisher announces again at half its record's lifetime. In a
        swarm of nodes started one after another, each node's extra walks began ten minutes after its
        start, and 200 nodes doing so in one process stalled every lookup there for minutes
        (bench/discovery.py, N = 200: every query timed out from then on). The loop's clean-up still
        runs, and its republish of values still comes 22 h after the last put here; it never
        republishes a provider key, since ``provide`` does not register one with it.
        """
        self._kad_refresh = kad.refresh_routing_table

        async def left_to_the_service() -> None:
            return None

        kad.refresh_routing_table = left_to_the_service  # type: ignore[method-assign]
        values = kad.value_store
        put = values.put

        def put_noted(key: bytes, value: bytes, validity: float = 0.0) -> None:
            put(key, value, validity)
            noted = values._last_republish
            noted[key] = time.time()
            if len(noted) > len(values.store) + 256:  # py-libp2p never drops a key gone from its store
                for gone in [k for k in noted if k not in values.store]:
                    del noted[gone]

        values.put = put_noted  # type: ignore[method-assign]

    async def _refresh_routing_table(self) -> None:
        try:
            await (self._kad_refresh or self.dht.refresh_routing_table)()
        except Exception as error:  # noqa: BLE001 - a refresh that fails is retried next period
            log.debug("routing table refresh failed: %s", type(error).__name__)

    def remember_peers(self) -> None:
        if self.kad is None:
            return
        peerstore = self.host.get_peerstore()
        known = set(self.kad.routing_table.get_peer_ids()) | set(self.host.get_connected_peers())
        for peer_id in known:
            try:
                addrs = peerstore.addrs(peer_id)
            except Exception:  # noqa: BLE001 - a peer without addresses is not worth keeping
                continue
            self.peer_book.remember(str(peer_id), [str(addr).split("/p2p/")[0] for addr in addrs])

    def add_validator(self, namespace: str, validator: Validator) -> None:
        """Validate values under ``/namespace/...``; call before :meth:`run`."""
        if self.kad is not None:
            raise RuntimeError("validators are fixed once the DHT runs")
        self.validators[namespace] = validator

    def held_value(self, key: str) -> bytes | None:
        """The value this node stores for ``key``, if any (no network)."""
        if self.kad is None:
            return None
        record = self.kad.value_store.get(key.encode())
        return record.value if record is not None else None

    def replace_held_value(self, key: str, value: bytes, seq: int) -> bool:
        """Replace the copy this node holds for ``key`` by ``value`` (already verified, sequence ``seq``)
        if the held one is older; True if it did. A key this node holds nothing for stays empty."""
        if self.kad is None:
            return False
        held = self.held_value(key)
        if held is None or held == value:
            return False
        held_seq = sequence_of(held)
        if held_seq is not None and held_seq >= seq:
            return False
        self.kad.value_store.put(key.encode(), value)
        return True

    async def find_providers(self, key: bytes, count: int = 50) -> list[PeerInfo]:
        """Every provider of ``key`` that the peers closest to it know, plus our own.

        py-libp2p's ``find_providers`` answers from the local store alone as soon
        as it holds any provider for the key, so a node that stores part of the
        list (one of the key's closest peers, or a provider itself) never sees the
        rest. Here the local list is merged with what each of the key's closest
        peers answers; ``provide()`` sent the record to those same peers.
        """
        kad = self.dht
        me = self.host.get_id()
        found: dict[ID, PeerInfo] = {info.peer_id: info for info in kad.provider_store.get_providers(key)}
        # Peer -> the peers its answer named closer to the key, or None: it did not answer.
        answers: dict[ID, list[ID] | None] = {}
        limiter = trio.CapacityLimiter(PARALLEL_DIALS)

        async def ask(peer_id: ID) -> None:
            answers[peer_id] = None
            async with limiter:
                with trio.move_on_after(PROVIDER_ANSWER_TIMEOUT_S):
                    try:
                        answer, closer = await kad.provider_store._get_providers_from_peer_with_closers(peer_id, key)
                    except Exception as error:  # noqa: BLE001 - one silent peer does not spoil the lookup
                        log.debug("GET_PROVIDERS to %s failed: %s", peer_id, type(error).__name__)
                        return
                    if answer or closer:
                        answers[peer_id] = closer[:K_CLOSEST]
                    for info in answer:
                        known = found.get(info.peer_id)
                        if known is None or (info.addrs and not known.addrs):
                            found[info.peer_id] = info

        async def ask_all(peers: Iterable[ID]) -> None:
            async with trio.open_nursery() as nursery:
                for peer_id in peers:
                    if peer_id != me and peer_id not in answers:
                        nursery.start_soon(ask, peer_id)

        cached = self._closest.get(key)
        if cached is not None and trio.current_time() - cached[0] < CLOSEST_CACHE_S:
            others = [peer_id for peer_id in cached[1] if peer_id != me][:PROVIDER_QUERY_FANOUT]
            await ask_all(others)
            answered = sum(answers.get(peer_id) is not None for peer_id in others)
            if answered < len(others) // 2 + 1:
                self._closest.pop(key, None)  # half the remembered peers did not answer: walk again next time
        else:
            # A walk first, not rounds of GET_PROVIDERS to the closest peers this node knows: those
            # rounds were faster (p50 0.29 s against 0.84 s cold, 40 nodes) but settled on peers that
            # did not hold every announcement, and every bench run with them found the exact provider
            # list less often (bench/README.md, discovery.py).
            closest = await self._closest_cached(key)
            await ask_all([peer_id for peer_id in closest if peer_id != me][:PROVIDER_QUERY_FANOUT])
        return list(found.values())[:count]

    def known_closest(self, key: bytes, count: int = K_CLOSEST) -> list[ID]:
        """The peers closest to ``key`` this node knows without asking anyone: a lookup's result it
        still remembers (``CLOSEST_CACHE_S``), else its routing table's closest."""
        cached = self._closest.get(key)
        if cached is not None and trio.current_time() - cached[0] < CLOSEST_CACHE_S:
            return cached[1][:count]
        return self.dht.routing_table.find_local_closest_peers(key, count)

    async def provide(self, key: bytes) -> int:
        """Announce this node as a provider of ``key`` to the peers closest to it; how many were told.

        py-libp2p's ``provide`` walks to the closest peers first and only then sends its ADD_PROVIDERs,
        ten at a time: on a busy loop the walk alone took 0.5-3 s (bench/discovery.py, 40 nodes), and
        the announcement reached nobody until it ended. Here the peers this node already knows to be
        closest (``known_closest``) are told at once while the walk runs; a peer that answers the walk
        while among the key's closest it knows is told as it answers (``Lookup.closest_peers``'
        ``near``: at most ``K_CLOSEST`` of them), not after the walk's last answers; the walk's
        closest not told yet are told when it ends. Each peer is told once a call (at most
        ``3 * K_CLOSEST`` peers); a send that failed visibly (the stream refused or timed out) is repeated after each of
        ``ADD_PROVIDER_RETRY_S`` while the peer may still be asked (one not reached within the dial
        timeout went silent and is not: ``lookup_guard``), and each try is bounded by
        ``ADD_PROVIDER_TIMEOUT_S`` and by the DHT guard's dial timeout. py-libp2p's sender reads no
        echo, so an announcement a receiver resets after accepting the stream still goes unseen.
        """
        kad = self.dht
        store = kad.provider_store
        me = self.host.get_id()
        # Not in py-libp2p's ``providing_keys``: it re-announces those every 22 h and never forgets one,
        # so a withdrawn capability came back; the publisher announces what is offered (``publish``).
        store.add_provider(key, PeerInfo(me, list(self.host.get_addrs())))
        told: set[ID] = {me}
        delivered = 0

        async def tell(peer_id: ID) -> None:
            nonlocal delivered
            for delay in (0.0, *ADD_PROVIDER_RETRY_S):
                await trio.sleep(delay)
                if not self.may_ask(peer_id):
                    return  # not reached within the dial timeout (now silent), or it left the DHT
                with trio.move_on_after(ADD_PROVIDER_TIMEOUT_S):
                    try:
                        if await store._send_add_provider(peer_id, key):
                            delivered += 1
                            return
                    except Exception as error:  # noqa: BLE001 - one peer's trouble does not spoil the rest
                        log.debug("ADD_PROVIDER to %s failed: %s", peer_id, type(error).__name__)

        def tell_all(nursery: trio.Nursery, peers: Iterable[ID]) -> None:
            for peer_id in peers:
                if peer_id not in told:
                    told.add(peer_id)
                    nursery.start_soon(tell, peer_id)

        async with trio.open_nursery() as nursery:
            tell_all(nursery, [peer for peer in self.known_closest(key) if self.may_ask(peer)])
            told_early = 0

            def tell_near(peer_id: ID) -> None:  # answered the walk among the key's closest it knows
                nonlocal told_early
                if told_early < K_CLOSEST and peer_id not in told:
                    told_early += 1
                    tell_all(nursery, [peer_id])

            try:
                if self.lookup is not None:
                    closest = await self.lookup.closest_peers(key, K_CLOSEST, near=tell_near)
                else:
                    closest = await kad.peer_routing.find_closest_peers_network(key)
            except Exception as error:  # noqa: BLE001 - those told already hold it; the next publish walks again
                log.debug("closest peers for a provide: lookup failed: %s", type(error).__name__)
                closest = []
            self._remember_closest(key, closest)
            tell_all(nursery, closest[:K_CLOSEST])
        return delivered

    def _remember_closest(self, key: bytes, closest: list[ID]) -> None:
        if closest:
            self._closest.pop(key, None)
            self._closest[key] = (trio.current_time(), closest)
            while len(self._closest) > CLOSEST_CACHE_KEYS:
                del self._closest[next(iter(self._closest))]

    async def _closest_cached(self, key: bytes) -> list[ID]:
        """The peers closest to ``key``: a lookup, remembered for ``CLOSEST_CACHE_S``.

        Asking who provides a capability again and again (each query, each node) would walk the DHT
        again each time to reach the same few peers; their provider lists are asked each time, so a
        new provider is seen as soon as it announced itself to them. Bounded (``CLOSEST_CACHE_KEYS``).
        """
        now = trio.current_time()
        cached = self._closest.get(key)
        if cached is not None and now - cached[0] < CLOSEST_CACHE_S:
            return cached[1]
        closest = await self.dht.peer_routing.find_closest_peers_network(key)
        self._remember_closest(key, closest)
        return closest

    def _offer_later(self, peers: list[ID]) -> None:
        """Offer ``peers`` (the closest a lookup ended with) to the routing table in the background;
        dropped while ``MAX_PENDING_OFFERS`` batches are still being offered, or the DHT is not running."""
        if self._nursery is None or self._pending_offers >= MAX_PENDING_OFFERS or not peers:
            return
        self._pending_offers += 1
        self._nursery.start_soon(self._offer, peers)

    async def _offer(self, peers: list[ID]) -> None:
        try:
            for peer_id in peers:
                with trio.move_on_after(self.dial_timeout_s):  # a full bucket pings its oldest peer
                    await self._answered(peer_id)
        finally:
            self._pending_offers -= 1

    async def _answered(self, peer_id: ID) -> None:
        """A peer that answered a lookup's FIND_NODE is alive and serves the DHT: into the table."""
        if self.kad is not None and not self.kad.routing_table.peer_in_table(peer_id):
            try:
                await self.kad.routing_table.add_peer(peer_id)
            except Exception as error:  # noqa: BLE001 - a table that refuses it (full bucket, subnet cap)
                log.debug("could not add %s: %s", peer_id, type(error).__name__)

    async def find_peer(self, peer_id: ID) -> PeerInfo | None:
        """The addresses of ``peer_id``: from the routing table or peer store, else a lookup that stops
        as soon as an answer names it (py-libp2p's went on until the closest set was stable)."""
        if peer_id == self.host.get_id():
            return PeerInfo(peer_id, self.host.get_addrs())
        known = self.dht.routing_table.get_peer_info(peer_id)
        if known is not None:
            return known
        peerstore = self.host.get_peerstore()
        try:
            addrs = peerstore.addrs(peer_id)
        except Exception:  # noqa: BLE001 - unknown peer
            addrs = []
        if not addrs:
            if self.lookup is None:
                raise RuntimeError("the DHT is not running")
            await self.lookup.closest_peers(peer_id.to_bytes(), stop_at=peer_id)
            try:
                addrs = peerstore.addrs(peer_id)
            except Exception:  # noqa: BLE001 - nobody named it
                addrs = []
        return PeerInfo(peer_id, addrs) if addrs else None

    async def find_peer_addrs(self, peer_id: ID) -> list[str]:
        info = await self.find_peer(peer_id)
        return [str(addr) for addr in info.addrs] if info else []
