"""The settlement queue: pending escrow settlements kept in the ledger, retried until they land once."""

from runtime.settlement.queue import Backoff, FlushReport, SettlementQueue
from runtime.settlement.settler import EscrowSettler, Outcome

__all__ = ["Backoff", "EscrowSettler", "FlushReport", "Outcome", "SettlementQueue"]
