"""The settlement queue: pending settlements live in the ledger and are retried until they land.

A trio service (``await nursery.start(queue.run)``). It flushes when woken (``wake()``, e.g. when a
lease ends) and every ``interval_s``; a settlement that fails for a passing reason (chain down,
refund not due yet) is retried with exponential backoff and jitter, one that can never succeed
(bad signature, escrow closed) is marked failed and audited. Because the queue lives in the ledger
and every step is idempotent, a crash at any point loses nothing and a restart lands each
settlement exactly once. ``stats()`` gives its length and oldest age for metrics.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from runtime.escrow import Chain
from runtime.ledger import Ledger
from runtime.ledger.models import QueueStats, Settlement
from runtime.settlement.settler import EscrowSettler, Outcome

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    base_s: float = 1.0
    max_s: float = 300.0
    jitter: float = 0.2

    def delay(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: base * 2**attempts, capped, +-jitter."""
        raw = min(self.max_s, self.base_s * (2 ** min(attempts, 30)))
        return raw * (1 + random.uniform(-self.jitter, self.jitter))


@dataclass(frozen=True)
class FlushReport:
    landed: int = 0
    retried: int = 0
    failed: int = 0


class SettlementQueue:
    def __init__(
        self,
        ledger: Ledger,
        chain: Chain,
        settler: EscrowSettler,
        *,
        interval_s: float = 5.0,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.chain = chain
        self.settler = settler
        self.interval_s = interval_s
        self.backoff = backoff or Backoff()
        self._clock = clock
        self._wake = trio.Event()

    async def run(self, *, task_status: TaskStatus[SettlementQueue] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        while True:
            await self.flush()
            with trio.move_on_after(await self._sleep_s()):
                await self._wake.wait()
            self._wake = trio.Event()

    def wake(self) -> None:
        """Flush now (a lease ended, a receipt was countersigned)."""
        self._wake.set()

    async def stats(self) -> QueueStats:
        return await self.ledger.queue_stats()

    async def flush(self) -> FlushReport:
        """Try every due settlement once."""
        landed = retried = failed = 0
        for settlement in await self.ledger.due_settlements(int(self._clock())):
            outcome = await self._attempt(settlement)
            if outcome.kind == "landed":
                landed += 1
            elif outcome.kind == "retry":
                retried += 1
            else:
                failed += 1
        return FlushReport(landed, retried, failed)

    async def _attempt(self, settlement: Settlement) -> Outcome:
        store = self.ledger.store

        def on_signed(tx_hash: str) -> None:
            store.mark_submitted(settlement.settlement_id, tx_hash)

        outcome = await self.chain.run(self.settler.settle, settlement, on_signed)
        sid = settlement.settlement_id
        if outcome.kind == "landed":
            await self.ledger.mark_landed(
                sid, tx_hash=outcome.tx_hash, released_total=outcome.released_total, refunded=outcome.refunded
            )
        elif outcome.kind == "retry":
            delay = self.backoff.delay(settlement.attempts)
            await self.ledger.mark_retry(
                sid, error=outcome.reason or "unknown", next_attempt_at=math.ceil(self._clock() + delay)
            )
            log.info("settlement %s will be retried in %.0f s (%s)", sid, delay, outcome.reason)
        else:
            await self.ledger.mark_failed(sid, error=outcome.reason or "unknown")
            log.warning("settlement %s failed: %s", sid, outcome.reason)
        return outcome

    async def _sleep_s(self) -> float:
        due = await self.ledger.next_due_at()
        if due is None:
            return self.interval_s
        return max(0.0, min(self.interval_s, due - self._clock()))
