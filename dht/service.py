"""The node's Kademlia DHT: join through bootstrap peers and the peer book, keep the
routing table fresh, and rejoin when the node finds itself alone."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.tools.anyio_service import background_trio_service

from bootstrap.peer_book import PeerBook
from dht.protocol_id import current_kad_protocol_id
from dht.record_validator import sequence_of

if TYPE_CHECKING:
    # py-libp2p depends on trio-typing, whose stale trio-stubs hide trio's own TaskStatus from mypy.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

DIAL_TIMEOUT_S = 5.0
PARALLEL_DIALS = 8
PEER_BOOK_DIAL_LIMIT = 50
PROVIDER_QUERY_FANOUT = 6
ADOPT_INTERVAL_S = 1.0


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
    ) -> None:
        self.host = host
        self.bootstrap = peer_infos_from_addrs(bootstrap_addrs)
        self.peer_book = peer_book
        self.refresh_interval_s = refresh_interval_s
        self.mode = DHTMode.SERVER if server_mode else DHTMode.CLIENT
        self.protocol_id = current_kad_protocol_id()
        self.validators = dict(validators or {})
        self.kad: KadDHT | None = None
        self.joined = trio.Event()

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
        self._keep_clients_out(self.kad)
        try:
            async with background_trio_service(self.kad), trio.open_nursery() as nursery:
                task_status.started(self)
                nursery.start_soon(self._adopt_periodically)
                await self.join()
                while True:
                    await trio.sleep(self.refresh_interval_s)
                    await self.refresh()
        finally:
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
            with trio.move_on_after(DIAL_TIMEOUT_S):
                try:
                    await self.host.connect(info)
                except Exception as error:  # noqa: BLE001 - an unreachable peer is normal
                    log.debug("dial %s failed: %s", info.peer_id, type(error).__name__)
                    return
                connected.append(info.peer_id)

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
            await self.adopt_connected_dht_peers()
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

    # --- client mode: private nodes stay out of everyone's routing table -------------------------

    def _speaks_dht(self, peer_id: ID) -> bool | None:
        """Whether identify says the peer serves our DHT (None: identify has not told us yet)."""
        try:
            protocols = self.host.get_peerstore().get_protocols(peer_id)
        except Exception:  # noqa: BLE001 - an unknown peer
            return None
        if not protocols:
            return None
        return self.protocol_id in protocols

    def _keep_clients_out(self, kad: KadDHT) -> None:
        """Refuse peers that do not serve the DHT, even when they query us.

        py-libp2p adds every peer that opens a DHT stream to us (``skip_server_mode_check``):
        private nodes that only ask would land in the table, be handed out as "closer peers",
        and every lookup would then wait out dials to their LAN addresses.
        """
        add_peer = kad.add_peer

        async def add_servers_only(peer_id: ID, skip_server_mode_check: bool = False) -> bool:
            if self._speaks_dht(peer_id) is False:
                return False
            return await add_peer(peer_id, skip_server_mode_check=skip_server_mode_check)

        kad.add_peer = add_servers_only  # type: ignore[method-assign]

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
        look things up. Peers learn the change from identify (push it after calling this).
        """
        kad = self.dht
        mode = DHTMode.SERVER if on else DHTMode.CLIENT
        if kad.mode == mode:
            return False
        kad.mode = mode
        if on:
            self.host.set_stream_handler(TProtocol(self.protocol_id), kad.handle_stream)
        else:
            self.host.remove_stream_handler(TProtocol(self.protocol_id))
        log.info("DHT %s", "server mode (publicly reachable)" if on else "client mode (private: not in others' tables)")
        return True

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

    async def _refresh_routing_table(self) -> None:
        try:
            await self.dht.refresh_routing_table()
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
        found: dict[ID, PeerInfo] = {info.peer_id: info for info in kad.provider_store.get_providers(key)}
        closest = await kad.peer_routing.find_closest_peers_network(key)
        limiter = trio.CapacityLimiter(PARALLEL_DIALS)

        async def ask(peer_id: ID) -> None:
            async with limiter:
                with trio.move_on_after(DIAL_TIMEOUT_S):
                    try:
                        answer, _ = await kad.provider_store._get_providers_from_peer_with_closers(peer_id, key)
                    except Exception as error:  # noqa: BLE001 - one silent peer does not spoil the lookup
                        log.debug("GET_PROVIDERS to %s failed: %s", peer_id, type(error).__name__)
                        return
                    for info in answer:
                        known = found.get(info.peer_id)
                        if known is None or (info.addrs and not known.addrs):
                            found[info.peer_id] = info

        others = [peer_id for peer_id in closest if peer_id != self.host.get_id()]
        async with trio.open_nursery() as nursery:
            for peer_id in others[:PROVIDER_QUERY_FANOUT]:
                nursery.start_soon(ask, peer_id)
        return list(found.values())[:count]

    async def find_peer_addrs(self, peer_id: ID) -> list[str]:
        info = await self.dht.find_peer(peer_id)
        return [str(addr) for addr in info.addrs] if info else []
