"""The local ledger: leases, metered usage, receipts, settlements, tasks, disputes and an audit chain in SQLite."""

from runtime.ledger.audit import AuditEntry, AuditReport
from runtime.ledger.errors import LedgerError
from runtime.ledger.ledger import Ledger
from runtime.ledger.models import (
    Dispute,
    EscrowRef,
    Evidence,
    Lease,
    LeaseOpen,
    QueueStats,
    ReceiptRecord,
    Settlement,
    Task,
    Totals,
    UsageRecorded,
)
from runtime.ledger.receipts import ReceiptBody, SignedReceipt, countersign, sign_as_provider, verify_countersigned
from runtime.ledger.store import LedgerStore

__all__ = [
    "AuditEntry",
    "AuditReport",
    "Dispute",
    "EscrowRef",
    "Evidence",
    "Lease",
    "LeaseOpen",
    "Ledger",
    "LedgerError",
    "LedgerStore",
    "QueueStats",
    "ReceiptBody",
    "ReceiptRecord",
    "Settlement",
    "SignedReceipt",
    "Task",
    "Totals",
    "UsageRecorded",
    "countersign",
    "sign_as_provider",
    "verify_countersigned",
]
