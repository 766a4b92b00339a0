"""Keeps this node's capability record published: in the DHT under ``/clawnode/<peer-id>``,
as a provider of each capability's key, and over ``/clawnode/capability/1.0.0``.

The record is republished at half its lifetime, and at once (with a higher
sequence number) whenever the offers change.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import PrivateKey
from pydantic import ValidationError

from dht.capability import CAPABILITY_PROTOCOL, capability_handler
from dht.offers import Offer, provider_key
from dht.record_validator import record_key
from dht.records import (
    CapabilityRecord,
    Hardware,
    Reachability,
    RecordRejected,
    Rejection,
    SandboxOffer,
    WalletBinding,
    seal_record,
)
from dht.schema_safety import SchemaBudgetExceeded
from dht.service import K_CLOSEST, DhtService
from nat.addresses import record_addrs
from runtime.errors import ClawnodeError, ErrorCode

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

# The longest the first DHT publish waits for the addresses that make a home node reachable (its
# relay reservations). A record published without them names only a LAN address: a peer that
# fetched it dialled that address and waited out its fetch timeout (5 s) before reading a newer copy.
FIRST_PUBLISH_WAIT_S = 3.0
PENDING_POLL_S = 0.1
MAX_PUBLISHES_IN_FLIGHT = 2
# A capability announced to fewer of its key's closest peers than this (or than the DHT peers this
# node knows, in a smaller network) is announced again after each of ``THIN_RETRY_S`` until it reaches
# that many, then at the periodic republish. On a busy loop a node's dials time out and the peers it
# could not reach go silent (``lookup_guard``) for a minute; an announcement made then reached a
# handful of peers, none of them among the closest a query asks (bench/discovery.py, N = 200: one
# provider held by 12 peers, none of the key's 6 closest, was missing from every query for its
# capability until the republish, minutes later).
WELL_ANNOUNCED = K_CLOSEST // 2
THIN_RETRY_S = (20.0, 40.0, 80.0, 160.0)


def well_announced(delivered: int, dht_peers: int) -> bool:
    """Whether an announcement that reached ``delivered`` peers needs no early retry, this node
    knowing ``dht_peers`` DHT peers (its routing table)."""
    return delivered >= max(1, min(WELL_ANNOUNCED, dht_peers))


async def _first_of(*events: trio.Event | None) -> None:
    """Return when any of ``events`` is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            if event is not None:
                nursery.start_soon(wait, event)


def validation_summary(error: ValidationError) -> str:
    """Which fields failed and how, without the values (an owner's offer may hold anything)."""
    parts = []
    for item in error.errors()[:4]:
        where = ".".join(str(p) for p in item["loc"]) or "offer"
        # Our own validators' messages name fields and rules; pydantic's others are only typed.
        parts.append(f"{where}: {item['msg'][:160]}" if item["type"] == "value_error" else f"{where} ({item['type']})")
    return "; ".join(parts)


def seal_refusal(build: Callable[[], CapabilityRecord], private_key: PrivateKey) -> RecordRejected | None:
    """Why the record ``build()`` makes could not be published (None: it seals).

    The verdict on an offer: building the descriptors and sealing the record are the exact steps
    publishing takes, so an offer that passes here cannot fail later for what it says.
    """
    try:
        seal_record(build(), private_key)
    except RecordRejected as rejected:
        return rejected
    except SchemaBudgetExceeded:
        return RecordRejected(Rejection.UNSAFE_SCHEMA, "checking its examples against its schema took too long")
    except ValidationError as error:
        return RecordRejected(Rejection.SCHEMA, validation_summary(error))
    except ValueError as error:
        # Offer.descriptor's own refusals name the offer's kind and fields, never its values.
        return RecordRejected(Rejection.SCHEMA, str(error)[:200])
    except Exception as error:  # noqa: BLE001 - whatever else an offer trips: refused, never raised
        return RecordRejected(Rejection.MALFORMED, type(error).__name__)
    return None


class CapabilityPublisher:
    def __init__(
        self,
        host: IHost,
        dht: DhtService,
        private_key: PrivateKey,
        *,
        wallet: WalletBinding,
        hardware: Hardware,
        offers: list[Offer],
        record_ttl_s: int = 600,
        reachability: Callable[[], Reachability] = lambda: "unknown",
        extra_addrs: Callable[[], list[str]] = list,
        addrs_pending: Callable[[], bool] = lambda: False,
        sandbox: SandboxOffer | None = None,
        first_publish_wait_s: float = FIRST_PUBLISH_WAIT_S,
        clock: Callable[[], float] = time.time,
        load: Callable[[], dict[str, dict[str, int]]] = dict,
    ) -> None:
        self.host = host
        self._load = load  # live load in the capability protocol's answer (RecordReply.load)
        self.dht = dht
        self._private_key = private_key
        self.wallet = wallet
        self.hardware = hardware
        self.record_ttl_s = record_ttl_s
        self._reachability = reachability
        self._extra_addrs = extra_addrs  # e.g. relayed addresses while private (nat/relay.py)
        # True while the addresses that make this node reachable are still coming (a home node's
        # relay reservations, a second or so after start): the first DHT publish waits for them.
        self._addrs_pending = addrs_pending
        self.first_publish_wait_s = first_publish_wait_s
        self._clock = clock
        self.sandbox = sandbox  # the sandboxed task kinds this node runs, and its caps
        self._seq = 0
        self._offers: dict[str, Offer] = {}
        # Offers (stored in offers.json, configured, or a loaded model's) whose record cannot be
        # sealed: left out with the reason, never a failed start. Name → "reason: detail".
        self.skipped: dict[str, str] = {}
        for offer in offers:
            refusal = self.offer_refusal(offer)
            if refusal is None:
                self._offers[offer.name] = offer
            else:
                self.skipped[offer.name] = str(refusal)
                log.warning("offer %s is not published: %s", offer.name, refusal.reason.value)
        self._changed = trio.Event()
        self.record: CapabilityRecord | None = None
        self.sealed: bytes | None = None
        self.published_at: float | None = None
        self.publish_refusals = 0  # records that could not be sealed at publish time (the last one kept)
        # Capability name -> the addresses it was last announced (provided) with; one per offer.
        self._provided: dict[str, tuple[str, ...]] = {}
        self._thin_retries = 0  # early retries of thin announcements since the last well-announced one
        self._thin_retry_waiting = False
        self._nursery: trio.Nursery | None = None

    @property
    def offers(self) -> list[Offer]:
        return list(self._offers.values())

    def offer_refusal(self, offer: Offer) -> RecordRejected | None:
        """Why the record with ``offer`` added (or replaced) could not be published; None if it can."""
        candidate = {**self._offers, offer.name: offer}
        seq = max(self._seq + 1, int(self._clock() * 1000))  # as long as the next real one
        return seal_refusal(lambda: self._make_record(list(candidate.values()), seq=seq), self._private_key)

    def set_offer(self, offer: Offer) -> None:
        """Offer ``offer`` from now on; ``E_INVALID_ARGUMENT`` (naming the reason) if its record cannot be sealed."""
        refusal = self.offer_refusal(offer)
        if refusal is not None:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"offer refused ({refusal})")
        self._offers[offer.name] = offer
        self.skipped.pop(offer.name, None)
        self._changed.set()

    def remove_offer(self, name: str) -> bool:
        removed = self._offers.pop(name, None) is not None
        removed = self.skipped.pop(name, None) is not None or removed
        if removed:
            self._changed.set()
        return removed

    def republish(self) -> None:
        """Rebuild the record served directly now, and publish it (its addresses or reachability changed)."""
        self._reseal()
        self._changed.set()

    def _reseal(self) -> bool:
        """Build and seal the current record; on a refusal keep serving the last one (False)."""
        try:
            record = self._build_within_budget()
            sealed = seal_record(record, self._private_key)
        except RecordRejected as rejected:
            # e.g. more relayed addresses than fit: the last good record stays served.
            self.publish_refusals += 1
            log.warning("the capability record cannot be sealed, keeping the last one: %s", rejected.reason.value)
            return False
        self.record, self.sealed = record, sealed
        return True

    def _build_within_budget(self) -> CapabilityRecord:
        """``build_record``, tried once more when checking an offer's examples against its schema ran out of
        its CPU budget: every offer passed that check when it was set (``offer_refusal``), so running out
        now is this thread being held up (most likely a garbage collection in a large heap: not
        confirmed), not the schema. Before, the exception escaped and stopped the node (the full suite
        saw it once, at load 1)."""
        try:
            return self.build_record()
        except SchemaBudgetExceeded:
            pass
        try:
            return self.build_record()
        except SchemaBudgetExceeded:
            raise RecordRejected(
                Rejection.UNSAFE_SCHEMA, "checking an offer's examples against its schema took too long"
            ) from None

    def _next_seq(self) -> int:
        # Milliseconds since the epoch keep sequence numbers rising across restarts
        # without storing them; +1 covers two changes within one millisecond.
        self._seq = max(self._seq + 1, int(self._clock() * 1000))
        return self._seq

    def build_record(self) -> CapabilityRecord:
        return self._make_record(list(self._offers.values()), seq=self._next_seq())

    def _make_record(self, offers: list[Offer], *, seq: int) -> CapabilityRecord:
        now = int(self._clock())
        reachability = self._reachability()
        return CapabilityRecord(
            peer_id=str(self.host.get_id()),
            seq=seq,
            issued_at=now,
            expires_at=now + self.record_ttl_s,
            reachability=reachability,
            # Ranked by reachability (nat.addresses): confirmed, relayed while private, then the rest;
            # loopback only when the node has nothing else.
            addrs=record_addrs(self.host, self._extra_addrs(), reachability)[:16],
            hardware=self.hardware,
            capabilities=[offer.descriptor() for offer in offers],
            wallet=self.wallet,
            sandbox=self.sandbox,
        )

    async def publish(self, *, full: bool = True) -> None:
        """Publish the current record, and announce this node as a provider of its capabilities:
        all of them when ``full`` (the periodic republish, the join), else only those not announced
        yet at the node's current addresses (a change of offers)."""
        if not self._reseal() or self.record is None or self.sealed is None:
            return
        record, sealed = self.record, self.sealed
        if not record.capabilities:
            # Nothing to sell: served to whoever asks, but no DHT traffic for it.
            return
        kad = self.dht.dht
        failures: list[str] = []
        addrs = tuple(sorted(str(addr) for addr in self.host.get_addrs()))
        names = {capability.name for capability in record.capabilities}
        for name in [name for name in self._provided if name not in names]:
            del self._provided[name]  # withdrawn: announced afresh if it comes back
        # A change of offers announces only the capabilities not announced yet (at these addresses):
        # a price change needs no DHT write (finds fetch the record from the provider), and
        # announcing every older capability again tripled a new offer's DHT work on a busy loop.
        due = [name for name in names if full or self._provided.get(name) != addrs]

        async def attempt(step: Callable[[str], Awaitable[object]], key: str) -> None:
            try:
                await step(key)
            except Exception as error:  # noqa: BLE001 - served directly meanwhile; retried next round
                failures.append(type(error).__name__)

        thin: list[str] = []

        async def provide_under_multihash(name: str) -> None:
            # The multihash itself, not through KadDHT.provide: its key parsing tries a CID first.
            if well_announced(await self.dht.provide(provider_key(name)), self.dht.routing_table_size()):
                self._provided[name] = addrs
            else:  # announced again by the next publish (``THIN_RETRY_S``), a full one's included
                self._provided.pop(name, None)
                thin.append(name)

        # Concurrently: one after another, a newly added capability waited behind the
        # record and every older offer (seconds each in a busy swarm).
        async with trio.open_nursery() as nursery:
            for name in sorted(due):
                nursery.start_soon(attempt, provide_under_multihash, name)
            nursery.start_soon(attempt, lambda key: kad.put_value(key, sealed), record_key(record.peer_id))
        self._retry_thin(thin)
        if failures:
            log.info("publishing the capability record partly failed: %s", ", ".join(sorted(set(failures))))
            return
        self.published_at = self._clock()
        log.info("published capability record seq %d with %d offers", record.seq, len(record.capabilities))

    def _retry_thin(self, thin: list[str]) -> None:
        """After a publish: a publish of what is not announced yet after the next of ``THIN_RETRY_S``
        when some announcement was thin (one wait at a time), else the retries start over."""
        if not thin:
            self._thin_retries = 0
            return
        if self._thin_retry_waiting or self._nursery is None or self._thin_retries >= len(THIN_RETRY_S):
            return
        wait_s = THIN_RETRY_S[self._thin_retries]
        self._thin_retries += 1
        self._thin_retry_waiting = True
        log.info("%d capability announcements reached few peers; announced again in %.0f s", len(thin), wait_s)

        async def retry() -> None:
            await trio.sleep(wait_s)
            self._thin_retry_waiting = False
            self._changed.set()

        self._nursery.start_soon(retry)

    async def _wait_for_addrs(self) -> None:
        """Before the first DHT publish: wait (at most ``first_publish_wait_s``) while the addresses
        that make this node reachable are still coming."""
        with trio.move_on_after(self.first_publish_wait_s):
            while self._addrs_pending():
                await trio.sleep(PENDING_POLL_S)

    async def _publish_in(self, scope: trio.CancelScope, running: deque[trio.CancelScope], full: bool) -> None:
        try:
            with scope:
                await self.publish(full=full)
        finally:
            if scope in running:
                running.remove(scope)

    async def run(self, *, task_status: TaskStatus[CapabilityPublisher] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(CAPABILITY_PROTOCOL, capability_handler(lambda: self.sealed, self._load))
        self._reseal()
        task_status.started(self)
        try:
            # With the first DHT peer, not after the whole join: a fresh node is findable in
            # seconds. Published once more when the join is done, to the peers it met on the way.
            # (A node with no one to join publishes when its join ends, into its own store.)
            await _first_of(self.dht.ready, self.dht.joined)
            await self._wait_for_addrs()
            # A change starts the next publish at once, beside the one in flight (which waits on the
            # slowest of the key's closest peers: seconds when one must be dialled); a home node's
            # record naming its relays used to wait behind the one published a second earlier
            # without them, while peers could read only that one. At most MAX_PUBLISHES_IN_FLIGHT:
            # a further change cuts the oldest short (a newer record supersedes it).
            # The first publish, the periodic one and the one after the join announce every
            # capability again; one for a change of offers only what is new (``publish``).
            running: deque[trio.CancelScope] = deque()
            full = True
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                while True:
                    self._changed = trio.Event()
                    joined = self.dht.joined.is_set()
                    if len(running) >= MAX_PUBLISHES_IN_FLIGHT:
                        running.popleft().cancel()
                    scope = trio.CancelScope()
                    running.append(scope)
                    nursery.start_soon(self._publish_in, scope, running, full)
                    with trio.move_on_after(self.record_ttl_s / 2) as period:
                        await _first_of(self._changed, None if joined else self.dht.joined)
                    full = period.cancelled_caught or (not joined and self.dht.joined.is_set())
        finally:
            self._nursery = None
            self.host.remove_stream_handler(CAPABILITY_PROTOCOL)
