"""The reconciliation: every ``every_s`` the ledger's escrow rows are compared with the chain.

A trio service beside the settlement queue. Each pass reads the ledger's escrow-related rows (locks
not yet final or changed lately, pending claims/releases/refunds, those that landed or failed within
``lookback_s``), reads each escrow once from the chain, and asks the pure rule
``runtime.escrow.reconcile.judge`` what each difference means:

- flagged (the chain does not know the escrow, or a claim/refund it never saw, e.g. after a dev chain
  reset): the row moves to ``flagged`` in the ledger (the queue stops retrying it), the
  ``clawnode_escrow_ledger_mismatches`` gauge and ``EscrowLedgerMismatch`` alert show it, and so do
  ``clawnode status`` and the status API (count and truncated escrow ids);
- a lock that landed while the ledger counted it as failed or unknown (its receipt wait timed out):
  its refund is queued (or a refund that gave up is resumed), so no wei stays locked;
- a claim, release or refund that gave up because its escrow was not there (not yet, or the
  contract was wrong then) is queued again once the escrow is on chain.

A pass is skipped while the chain is unreachable or the contract is not the escrow: nothing is
flagged for a chain that cannot be asked. Rows that landed are compared only in the first pass and
after the chain went back (another genesis block, or a head below the last one seen): on a chain
that only moves forward they cannot change, and each comparison is a read in the chain's lane.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from runtime.errors import ClawnodeError
from runtime.escrow import EscrowClient
from runtime.escrow.reconcile import ChainEscrow, LedgerRow, judge
from runtime.ledger import Ledger
from runtime.ledger.models import EscrowMismatches, ReconcileRow

log = logging.getLogger(__name__)

RECONCILE_EVERY_S = 60.0
# How far back landed and failed rows are compared (pending ones always are): a reset dev chain
# forgets everything, a real chain nothing, so a day of history bounds the reads of each pass.
RECONCILE_LOOKBACK_S = 86_400
# Rows of each source (locks, settlements) compared in one pass, newest first.
RECONCILE_ROWS = 256


@dataclass
class ReconcileReport:
    compared: int = 0
    flagged: int = 0
    refunds: int = 0
    resumed: int = 0
    skipped: str | None = None  # why the pass did not compare ("chain_unavailable", ...)
    full: bool = False  # rows that landed were compared too (first pass, or the chain went back)
    actions: list[tuple[str, str, str]] = field(default_factory=list)  # (action, row key, reason)


class Reconciler:
    def __init__(
        self,
        ledger: Ledger,
        client: EscrowClient,
        *,
        every_s: float = RECONCILE_EVERY_S,
        lookback_s: int = RECONCILE_LOOKBACK_S,
        wake_settlement: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.client = client
        self.every_s = every_s
        self.lookback_s = lookback_s
        self._wake_settlement = wake_settlement
        self._clock = clock
        self.mismatches = EscrowMismatches(count=0, escrow_ids=[])
        self.passes = 0
        self._seen: tuple[str, int] | None = None  # (genesis hash, head) at the last full comparison

    async def run(self) -> None:
        self.mismatches = await self.ledger.escrow_mismatches()  # what earlier runs flagged
        while True:
            try:
                await self.reconcile_once()
            except ClawnodeError as error:  # the chain or the ledger failed this pass; the next one tries again
                log.info("reconciliation pass ended early: %s", error.message)
            await trio.sleep(self.every_s)

    async def reconcile_once(self) -> ReconcileReport:
        report = ReconcileReport()
        chain = self.client.chain
        if chain.watched and not chain.health.ok:
            report.skipped = chain.health.state
            return report
        since = int(self._clock()) - self.lookback_s
        genesis, head = await chain.run(_chain_marker, chain.w3)
        seen = self._seen
        report.full = seen is None or seen[0] != genesis or head < seen[1]
        contract = self.client.address.lower()
        rows = [
            row
            for row in await self.ledger.reconcile_rows(since=since, limit=RECONCILE_ROWS, landed=report.full)
            if row.contract is None or row.contract.lower() == contract
        ]
        facts: dict[tuple[str, str], ChainEscrow] = {}
        for row in rows:
            key = (row.payer, row.escrow_id)
            if key not in facts:
                # Raises (chain_unavailable, no_escrow_contract): the pass ends, nothing is flagged.
                state = await chain.run(self.client.get, row.payer, bytes.fromhex(row.escrow_id[2:]))
                facts[key] = ChainEscrow(phase=state.phase, amount=state.amount, released=state.released)
        woke = False
        for row in rows:
            verdict = judge(_plain(row), facts[(row.payer, row.escrow_id)])
            report.compared += 1
            if verdict.action in ("ok", "wait"):
                continue
            report.actions.append((verdict.action, row.key, verdict.reason))
            if verdict.action == "flag":
                report.flagged += 1
                if row.source == "settlement":
                    await self.ledger.flag_settlement(row.key, reason=verdict.reason)
                else:
                    await self.ledger.flag_lock(row.payer, row.escrow_id, reason=verdict.reason)
                log.warning(
                    "escrow ledger mismatch: %s %s of escrow %s… flagged (%s); it is no longer retried",
                    row.kind,
                    row.state,
                    row.escrow_id[:10],
                    verdict.reason,
                )
            elif verdict.action == "refund":
                if row.lease_id is None:
                    continue  # no lease holds this escrow here: nothing to refund it under
                await self.ledger.refund_landed_lock(row.payer, row.escrow_id)
                report.refunds += 1
                woke = True
                log.warning(
                    "a lock counted as not landed is on chain (escrow %s…): its refund is queued", row.escrow_id[:10]
                )
            elif verdict.action == "resume":
                await self.ledger.resume_settlement(row.key)
                report.resumed += 1
                woke = True
                log.warning("escrow %s… is on chain after its %s gave up: resumed", row.escrow_id[:10], row.kind)
        if woke and self._wake_settlement is not None:
            self._wake_settlement()
        self.mismatches = await self.ledger.escrow_mismatches()
        self.passes += 1
        if report.full or seen is None:
            self._seen = (genesis, head)
        else:
            self._seen = (seen[0], max(seen[1], head))
        return report


def _chain_marker(w3: Any) -> tuple[str, int]:
    """Blocking: the chain's genesis block hash and its head number (a reset changes one or the other)."""
    return bytes(w3.eth.get_block(0)["hash"]).hex(), int(w3.eth.block_number)


def _plain(row: ReconcileRow) -> LedgerRow:
    state: Any = row.state
    return LedgerRow(
        kind=row.kind,
        state=state,
        lease_open=row.lease_open,
        last_error=row.last_error,
        lock_landed=row.lock_landed,
        booked=row.booked,
    )
