"""Discovery queries: who serves a capability, at what price, how fast do they answer.

Provider lookup in the DHT, then each provider's record fetched directly (which is
also the liveness check and the round-trip measurement) and verified, in parallel
with a bound; then filtered and ranked by price, then round-trip time.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from pydantic import BaseModel, Field

from dht.capability import fetch_sealed_record
from dht.offers import legacy_provider_key, provider_key
from dht.record_validator import RejectionCounter, legacy_record_key, record_key, sequence_of
from dht.records import CapabilityRecord, Reachability, RecordRejected, Rejection, verify_record
from dht.seq_book import SeqBook
from dht.service import DhtService
from runtime.errors import ClawnodeError, ErrorCode
from runtime.model_ids import MODEL_FEATURES, CapabilityName, ModelFeature

log = logging.getLogger(__name__)

PARALLEL_FETCHES = 8
MAX_PROVIDERS = 50
# Verifying a record (a signature, its schemas against its examples) is CPU work: done on worker
# threads, two at a time, so the event loop never waits on a stranger's record.
PARALLEL_VERIFICATIONS = 2
READY_WAIT_S = 5.0  # how long a lookup waits for a node's first DHT peer
# When the record copy this node holds names no address it has not tried already, the copies held by
# this many of the key's closest peers are read (each within the fetch timeout): a newer one may name
# the relays the peer reserved since.
NETWORK_READ_FANOUT = 6


class DiscoveryQuery(BaseModel):
    capability: CapabilityName
    max_price: int | None = Field(None, ge=0, description="highest price per unit, smallest asset unit")
    min_ctx: int | None = Field(None, ge=1, description="smallest context length in tokens")
    min_vram_gb: int | None = Field(None, ge=0)
    reachable: bool = Field(False, description="only providers that declare themselves publicly reachable")
    features: list[ModelFeature] = Field(
        default_factory=list,
        max_length=len(MODEL_FEATURES),
        description="only providers whose model serves all of these (tools, json_schema, logprobs, n)",
    )
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="only this GGUF file (sha256, hex)")
    limit: int = Field(20, ge=1, le=MAX_PROVIDERS)


class ProviderResult(BaseModel):
    peer_id: str
    capability: str
    price_per_unit: int
    unit: str
    asset: str
    chain: str
    context_length: int | None
    features: list[str] = Field(default_factory=list, description="what the model serves beyond free text")
    chat_format: str = ""
    sha256: str = Field("", description="the served GGUF file's sha256, when the record states it")
    vram_mb: int
    gpu_model: str | None
    reachability: Reachability
    rtt_ms: float
    is_self: bool
    record: CapabilityRecord


class DescribeResult(BaseModel):
    peer_id: str
    reachable: bool = Field(description="the peer answered directly just now")
    rtt_ms: float | None
    record: CapabilityRecord


@dataclass
class _Cached:
    record: CapabilityRecord
    rtt_s: float
    fetched_at: float


RELAYED_FETCH_FACTOR = 3  # the second try (through a relay, usually) gets this many times the timeout


class Discovery:
    def __init__(
        self,
        host: IHost,
        dht: DhtService,
        rejections: RejectionCounter,
        own_record: Callable[[], CapabilityRecord | None],
        *,
        cache_ttl_s: float = 2.0,
        fetch_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        seq_book: SeqBook | None = None,
    ) -> None:
        self.host = host
        self.dht = dht
        self.rejections = rejections
        self._own_record = own_record
        self.cache_ttl_s = cache_ttl_s
        self.fetch_timeout_s = fetch_timeout_s
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._providers: dict[str, tuple[float, list[ID]]] = {}
        # One lookup per capability and one fetch per peer at a time: concurrent
        # queries for the same thing wait for the one in flight and share its cache.
        self._lookup_locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self._fetch_locks: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        # The highest sequence seen per peer, shared with the DHT validator and kept across restarts.
        self.seq_book = seq_book if seq_book is not None else SeqBook()
        self._verifications = trio.CapacityLimiter(PARALLEL_VERIFICATIONS)

    async def _accept(self, data: bytes, expected_peer: str) -> CapabilityRecord:
        """Verify ``data`` as ``expected_peer``'s record (on a worker thread); count and raise a rejection."""
        held = self.seq_book.highest(expected_peer)
        verify = functools.partial(
            verify_record, data, now=self._clock(), held_seq=held - 1 if held is not None else None
        )
        try:
            record = await trio.to_thread.run_sync(verify, limiter=self._verifications)
            if record.peer_id != expected_peer:
                raise RecordRejected(Rejection.WRONG_SIGNER, "the record describes another peer")
            stale = self.seq_book.verdict(expected_peer, record.seq)  # raised meanwhile by another path
            if stale is not None:
                raise RecordRejected(stale, f"sequence {record.seq} is older than one already seen")
        except RecordRejected as rejected:
            self.rejections.count(rejected.reason)
            raise
        self.seq_book.note(expected_peer, record.seq)
        # A copy this node holds for the DHT is replaced by the newer one, so it serves no older one.
        self.dht.replace_held_value(record_key(expected_peer), data, record.seq)
        self._remember_relayed_addrs(record)
        return record

    def _remember_relayed_addrs(self, record: CapabilityRecord) -> None:
        """A private provider is dialable only through the relays its signed record names."""
        relayed = []
        for addr in record.addrs:
            if "/p2p-circuit" not in addr:
                continue
            try:
                relayed.append(multiaddr.Multiaddr(addr))
            except Exception:  # noqa: BLE001 - a malformed address in a valid record is skipped
                continue
        if relayed:
            self.host.get_peerstore().add_addrs(ID.from_base58(record.peer_id), relayed, 600)

    async def fetch_live(self, peer_id: ID) -> tuple[CapabilityRecord, float]:
        """A fresh, verified record straight from the peer, and the round trip it took."""
        async with self._fetch_locks[str(peer_id)]:
            return await self._fetch_live(peer_id)

    async def _fetch_live(self, peer_id: ID) -> tuple[CapabilityRecord, float]:
        key = str(peer_id)
        cached = self._cache.get(key)
        now = self._clock()
        if cached and now - cached.fetched_at < self.cache_ttl_s and cached.record.expires_at > now:
            return cached.record, cached.rtt_s
        try:
            data, rtt = await fetch_sealed_record(self.host, peer_id, self.fetch_timeout_s)
        except ClawnodeError:
            # A private peer is dialable only through the relays its record names, a mapped one
            # at the address it names: learn them from the DHT copy, then ask the peer itself
            # (once more even if nothing was new: a circuit set up under load can miss the
            # first deadline).
            if not await self._learn_addrs_from_record(peer_id):
                raise
            # A circuit costs a reservation lookup, the relay's dial and a second handshake: more time.
            data, rtt = await fetch_sealed_record(self.host, peer_id, self.fetch_timeout_s * RELAYED_FETCH_FACTOR)
        record = await self._accept(data, key)
        self._cache[key] = _Cached(record, rtt, now)
        return record, rtt

    async def _learn_addrs_from_record(self, peer_id: ID) -> bool:
        """Put the addresses the peer's own signed DHT record names in the peer store.

        False if it names none. The DHT's routing answers carry whatever address a peer
        was last seen at (often its LAN address); the record names its relays while it is
        private and its UPnP-mapped address once it has one.
        """
        tried = self._known_addrs(peer_id)
        record: CapabilityRecord | None = None
        stored = await self._stored_record(peer_id)
        if stored is not None:
            try:
                record = await self._accept(stored, str(peer_id))
            except RecordRejected:
                record = None
        if record is None or set(record.addrs) <= tried:
            # The copy this node holds (py-libp2p answers from it without asking anyone) names only
            # addresses that just failed, e.g. a LAN address from before the peer reserved its relays:
            # the peers closest to the key may hold a newer one.
            record = await self._newer_record_from_network(peer_id, record) or record
        if record is None:
            return False
        signed = []
        for addr in record.addrs:
            try:
                signed.append(multiaddr.Multiaddr(addr))
            except Exception:  # noqa: BLE001 - a malformed address in a valid record is skipped
                continue
        if signed:
            # In the record's order, ahead of what we knew: py-libp2p dials only the first TCP
            # address it stores for a peer, and the one routing answers gave is often a LAN one.
            peerstore = self.host.get_peerstore()
            try:
                known = [addr for addr in peerstore.addrs(peer_id) if addr not in signed]
            except Exception:  # noqa: BLE001 - an unknown peer
                known = []
            peerstore.clear_addrs(peer_id)
            peerstore.add_addrs(peer_id, signed + known, 600)
        return bool(signed)

    def _known_addrs(self, peer_id: ID) -> set[str]:
        try:
            return {str(addr) for addr in self.host.get_peerstore().addrs(peer_id)}
        except Exception:  # noqa: BLE001 - an unknown peer
            return set()

    async def _newer_record_from_network(self, peer_id: ID, held: CapabilityRecord | None) -> CapabilityRecord | None:
        """The newest valid copy of the peer's record that the key's closest peers hold, if it is
        newer than ``held`` (never this node's own copy); None if none is."""
        kad = self.dht.dht
        key = record_key(str(peer_id)).encode()
        try:
            closest = await kad.peer_routing.find_closest_peers_network(key)
        except Exception as error:  # noqa: BLE001 - a failed lookup finds nothing newer
            log.debug("closest peers for %s's record: lookup failed: %s", peer_id, type(error).__name__)
            return None
        found: list[bytes] = []

        async def ask(peer: ID) -> None:
            with trio.move_on_after(self.fetch_timeout_s):
                try:
                    value = await kad.value_store._get_from_peer(peer, key)
                except Exception as error:  # noqa: BLE001 - one silent peer does not spoil the read
                    log.debug("GET_VALUE to %s failed: %s", peer, type(error).__name__)
                    return
                if isinstance(value, bytes) and value not in found:
                    found.append(value)

        me = self.host.get_id()
        async with trio.open_nursery() as nursery:
            for peer in [peer for peer in closest if peer not in (me, peer_id)][:NETWORK_READ_FANOUT]:
                nursery.start_soon(ask, peer)
        floor = held.seq if held is not None else -1
        seqs = [await trio.to_thread.run_sync(sequence_of, value, limiter=self._verifications) for value in found]
        for seq, value in sorted(zip(seqs, found, strict=True), key=lambda pair: -(pair[0] or -1)):
            if seq is None or seq <= floor:
                break
            try:
                return await self._accept(value, str(peer_id))
            except RecordRejected:
                continue
        return None

    async def _stored_record(self, peer_id: ID) -> bytes | None:
        """The peer's record as the DHT has it (None: not found, or the lookup failed)."""
        for key in (record_key(str(peer_id)), legacy_record_key(str(peer_id))):  # the legacy one: older releases
            try:
                value = await self.dht.dht.get_value(key)
            except Exception as error:  # noqa: BLE001 - a failed lookup is "not found", whatever broke
                log.debug("record lookup for %s failed: %s", peer_id, type(error).__name__)
                continue
            if value is not None:
                return value
        return None

    async def providers_of(self, capability: str) -> list[ID]:
        async with self._lookup_locks[capability]:
            return await self._providers_of(capability)

    async def _providers_of(self, capability: str) -> list[ID]:
        cached = self._providers.get(capability)
        if cached is not None and self._clock() - cached[0] < self.cache_ttl_s:
            return cached[1]
        # A node just started asks as soon as it knows one DHT peer, rather than answer empty.
        await self.dht.wait_until_ready(READY_WAIT_S)
        # The bare digest (releases before issue 23 announced under it; nothing announces it now)
        # only when the multihash key names nobody: walking both on every find doubled its DHT
        # traffic for providers that, once any current release provides, are never the only ones.
        infos = await self.dht.find_providers(provider_key(capability), count=MAX_PROVIDERS)
        if not infos:
            infos = await self.dht.find_providers(legacy_provider_key(capability), count=MAX_PROVIDERS)
        seen: dict[ID, None] = {}
        for info in infos:
            seen.setdefault(info.peer_id, None)
            if info.addrs:
                self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 600)
        self._providers[capability] = (self._clock(), list(seen))
        return list(seen)

    async def find(self, query: DiscoveryQuery) -> list[ProviderResult]:
        me = self.host.get_id()
        candidates: list[tuple[CapabilityRecord, float]] = []
        own = self._own_record()
        if own is not None and own.capability(query.capability):
            candidates.append((own, 0.0))

        async def fetch(peer_id: ID, limiter: trio.CapacityLimiter) -> None:
            async with limiter:
                try:
                    candidates.append(await self.fetch_live(peer_id))
                except (ClawnodeError, RecordRejected) as error:
                    # Unreachable, stale, forged or poisoned: it falls out of the results.
                    log.debug("provider %s dropped: %s", peer_id, error)
                    self._cache.pop(str(peer_id), None)
                except Exception as error:  # noqa: BLE001 - one provider's trouble never fails the query
                    log.debug("provider %s dropped: %s", peer_id, type(error).__name__)
                    self._cache.pop(str(peer_id), None)

        limiter = trio.CapacityLimiter(PARALLEL_FETCHES)
        async with trio.open_nursery() as nursery:
            for peer_id in await self.providers_of(query.capability):
                if peer_id != me:
                    nursery.start_soon(fetch, peer_id, limiter)

        results = [
            result
            for record, rtt in candidates
            if (result := _result(record, rtt, query, is_self=record.peer_id == str(me))) is not None
        ]
        results.sort(key=lambda result: (result.price_per_unit, result.rtt_ms, result.peer_id))
        return results[: query.limit]

    async def describe(self, peer_id: ID) -> DescribeResult:
        """A peer's record: live from the peer, else the copy in the DHT."""
        own = self._own_record()
        if peer_id == self.host.get_id() and own is not None:
            return DescribeResult(peer_id=str(peer_id), reachable=True, rtt_ms=0.0, record=own)
        try:
            if not self.host.get_peerstore().addrs(peer_id):
                raise KeyError
        except Exception:  # noqa: BLE001 - py-libp2p raises its own error for an unknown peer
            # The peer's signed record names where it can be reached (relays while private);
            # the routing answers only where it was last seen.
            if not await self._learn_addrs_from_record(peer_id):
                try:
                    await self.dht.find_peer_addrs(peer_id)
                except Exception as error:  # noqa: BLE001 - the live fetch below then fails cleanly
                    log.debug("peer lookup for %s failed: %s", peer_id, type(error).__name__)
        try:
            record, rtt = await self.fetch_live(peer_id)
            return DescribeResult(peer_id=str(peer_id), reachable=True, rtt_ms=round(rtt * 1000, 2), record=record)
        except (ClawnodeError, RecordRejected):
            pass
        # Only when the peer cannot answer itself: the DHT's copy, never older than one seen before.
        stored = await self._stored_record(peer_id)
        if stored is None:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "no capability record for that peer")
        try:
            record = await self._accept(stored, str(peer_id))
        except RecordRejected:
            raise ClawnodeError(ErrorCode.NOT_FOUND, "no valid capability record for that peer") from None
        return DescribeResult(peer_id=str(peer_id), reachable=False, rtt_ms=None, record=record)


def _result(record: CapabilityRecord, rtt_s: float, query: DiscoveryQuery, *, is_self: bool) -> ProviderResult | None:
    capability = record.capability(query.capability)
    if capability is None:
        return None
    pricing = capability.pricing
    context = capability.model.context_length if capability.model else None
    if query.max_price is not None and pricing.price_per_unit > query.max_price:
        return None
    if query.min_ctx is not None and (context is None or context < query.min_ctx):
        return None
    if query.min_vram_gb is not None and record.hardware.vram_mb < query.min_vram_gb * 1024:
        return None
    if query.reachable and record.reachability != "public":
        return None
    served = capability.model.features if capability.model else []
    if not set(query.features) <= set(served):
        return None
    sha256 = capability.model.sha256 if capability.model else ""
    if query.sha256 is not None and sha256 != query.sha256:
        return None
    return ProviderResult(
        peer_id=record.peer_id,
        capability=capability.name,
        price_per_unit=pricing.price_per_unit,
        unit=pricing.unit,
        asset=pricing.asset,
        chain=pricing.chain,
        context_length=context,
        features=list(served),
        chat_format=capability.model.chat_format if capability.model else "",
        sha256=sha256,
        vram_mb=record.hardware.vram_mb,
        gpu_model=record.hardware.gpu_model,
        reachability=record.reachability,
        rtt_ms=round(rtt_s * 1000, 2),
        is_self=is_self,
        record=record,
    )
