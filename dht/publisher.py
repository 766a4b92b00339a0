"""Keeps this node's capability record published: in the DHT under ``/clawnode/<peer-id>``,
as a provider of each capability's key, and over ``/clawnode/capability/1.0.0``.

The record is republished at half its lifetime, and at once (with a higher
sequence number) whenever the offers change.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio
from libp2p.abc import IHost
from libp2p.crypto.keys import PrivateKey

from dht.offers import Offer, capability_key
from dht.record_validator import record_key
from dht.records import CapabilityRecord, Hardware, Reachability, WalletBinding, seal_record
from dht.service import DhtService
from protocols.capability import CAPABILITY_PROTOCOL, capability_handler

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.dht = dht
        self._private_key = private_key
        self.wallet = wallet
        self.hardware = hardware
        self.record_ttl_s = record_ttl_s
        self._reachability = reachability
        self._extra_addrs = extra_addrs  # e.g. relayed addresses while private (nat/relay.py)
        self._clock = clock
        self._offers = {offer.name: offer for offer in offers}
        for offer in offers:
            offer.descriptor()  # an offer that cannot become a descriptor fails at start, not at publish
        self._changed = trio.Event()
        self._seq = 0
        self.record: CapabilityRecord | None = None
        self.sealed: bytes | None = None
        self.published_at: float | None = None

    @property
    def offers(self) -> list[Offer]:
        return list(self._offers.values())

    def set_offer(self, offer: Offer) -> None:
        offer.descriptor()
        self._offers[offer.name] = offer
        self._changed.set()

    def remove_offer(self, name: str) -> bool:
        removed = self._offers.pop(name, None) is not None
        if removed:
            self._changed.set()
        return removed

    def republish(self) -> None:
        """Rebuild the record served directly now, and publish it (its addresses or reachability changed)."""
        self.record = self.build_record()
        self.sealed = seal_record(self.record, self._private_key)
        self._changed.set()

    def _next_seq(self) -> int:
        # Milliseconds since the epoch keep sequence numbers rising across restarts
        # without storing them; +1 covers two changes within one millisecond.
        self._seq = max(self._seq + 1, int(self._clock() * 1000))
        return self._seq

    def build_record(self) -> CapabilityRecord:
        now = int(self._clock())
        return CapabilityRecord(
            peer_id=str(self.host.get_id()),
            seq=self._next_seq(),
            issued_at=now,
            expires_at=now + self.record_ttl_s,
            reachability=self._reachability(),
            addrs=([str(addr).split("/p2p/")[0] for addr in self.host.get_addrs()] + self._extra_addrs())[:16],
            hardware=self.hardware,
            capabilities=[offer.descriptor() for offer in self._offers.values()],
            wallet=self.wallet,
        )

    async def publish(self) -> None:
        record = self.build_record()
        sealed = seal_record(record, self._private_key)
        self.record, self.sealed = record, sealed
        if not record.capabilities:
            # Nothing to sell: served to whoever asks, but no DHT traffic for it.
            return
        kad = self.dht.dht
        failures: list[str] = []

        async def attempt(step: Callable[[str], Awaitable[object]], key: str) -> None:
            try:
                await step(key)
            except Exception as error:  # noqa: BLE001 - served directly meanwhile; retried next round
                failures.append(type(error).__name__)

        # Concurrently: one after another, a newly added capability waited behind the
        # record and every older offer (seconds each in a busy swarm).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, lambda key: kad.put_value(key, sealed), record_key(record.peer_id))
            for capability in record.capabilities:
                nursery.start_soon(attempt, kad.provide, capability_key(capability.name))
        if failures:
            log.info("publishing the capability record partly failed: %s", ", ".join(sorted(set(failures))))
            return
        self.published_at = self._clock()
        log.info("published capability record seq %d with %d offers", record.seq, len(record.capabilities))

    async def run(self, *, task_status: TaskStatus[CapabilityPublisher] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.set_stream_handler(CAPABILITY_PROTOCOL, capability_handler(lambda: self.sealed))
        self.record = self.build_record()
        self.sealed = seal_record(self.record, self._private_key)
        task_status.started(self)
        try:
            await self.dht.joined.wait()
            while True:
                self._changed = trio.Event()
                await self.publish()
                with trio.move_on_after(self.record_ttl_s / 2):
                    await self._changed.wait()
        finally:
            self.host.remove_stream_handler(CAPABILITY_PROTOCOL)
