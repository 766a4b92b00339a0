"""What a difference between the ledger and the chain means: a pure rule with a table.

The reconciliation (``runtime.settlement.reconcile``) reads the ledger's escrow rows (the locks it
sent or meant to send, the claims, releases and refunds it queued, retried or booked) and the chain's
view of each escrow, and asks ``judge`` what to do with each row. Everything here is plain data in,
a typed verdict out: no chain, no ledger, no clock.

Actions:

- ``ok``: the chain agrees (or the settlement queue is already doing the right thing);
- ``wait``: the ledger's row is still moving (a lock in flight): look again next pass;
- ``flag``: the chain does not know what the ledger holds (an escrow gone after a chain reset, a
  claim or refund the chain never saw): stop retrying it, alert, show it to the operator;
- ``refund``: a lock the ledger did not count as landed is on chain (its receipt wait timed out, a
  stale transaction landed later): queue its refund so no wei stays locked;
- ``resume``: a settlement that gave up because the escrow was not there (not yet, or the contract
  was wrong then) now has its escrow on chain: queue it again (every amount is cumulative, so a
  claim or refund sent again cannot pay twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RowKind = Literal["lock", "claim", "release", "refund"]
# A lock row: "intent" (written before sending), "sent" (signed, hash known), "unknown" (no receipt in
# time: may still land), "landed", "failed" (refused before it was sent, or mined and reverted).
# A settlement row: "pending", "landed", "failed".
RowState = Literal["intent", "sent", "unknown", "landed", "failed", "pending"]
ChainPhase = Literal["none", "active", "disputed", "closed"]
Action = Literal["ok", "wait", "flag", "refund", "resume"]

# Why a row is flagged; stable strings shown in status, audit and logs.
FLAG_REASONS = {
    "escrow_unknown": "the chain has no such escrow (a chain reset, or another chain)",
    "claim_unknown": "the chain released less than the ledger booked for this escrow",
    "refund_unknown": "the ledger booked a refund, but the escrow is still open on chain",
}


@dataclass(frozen=True)
class LedgerRow:
    """One escrow-related row of the ledger, as plain data."""

    kind: RowKind
    state: RowState
    lease_open: bool = False  # the lease is still open in the ledger (a lock may be in flight)
    last_error: str | None = None  # a settlement's last error (e.g. "not_found")
    lock_landed: bool | None = None  # refunds: whether the ledger holds the lease's lock as landed (None: no record)
    booked: int = 0  # claims/releases: what the ledger booked as paid out of this escrow (settled amount)


@dataclass(frozen=True)
class ChainEscrow:
    """The chain's view of one escrow (``phase`` "none" when the chain does not know it)."""

    phase: ChainPhase
    amount: int = 0
    released: int = 0


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str


ChainClass = Literal["none", "open", "closed"]


def _chain_class(chain: ChainEscrow) -> ChainClass:
    if chain.phase == "none":
        return "none"
    return "closed" if chain.phase == "closed" else "open"


# (row kind, row state, chain class) -> verdict. Cells that need a finer fact of the row are refined
# in ``judge`` (marked "refine").
_TABLE: dict[tuple[RowKind, RowState, ChainClass], tuple[Action, str]] = {
    # -- locks --
    ("lock", "intent", "none"): ("ok", "not_landed"),
    ("lock", "intent", "open"): ("refund", "lock_landed_unbooked"),
    ("lock", "intent", "closed"): ("refund", "lock_landed_unbooked"),
    ("lock", "sent", "none"): ("ok", "not_landed"),
    ("lock", "sent", "open"): ("refund", "lock_landed_unbooked"),
    ("lock", "sent", "closed"): ("refund", "lock_landed_unbooked"),
    ("lock", "unknown", "none"): ("ok", "not_landed"),
    ("lock", "unknown", "open"): ("refund", "lock_landed_unbooked"),
    ("lock", "unknown", "closed"): ("refund", "lock_landed_unbooked"),
    ("lock", "landed", "none"): ("flag", "escrow_unknown"),
    ("lock", "landed", "open"): ("ok", "agrees"),
    ("lock", "landed", "closed"): ("ok", "agrees"),
    ("lock", "failed", "none"): ("ok", "not_landed"),
    ("lock", "failed", "open"): ("refund", "lock_landed_unbooked"),
    ("lock", "failed", "closed"): ("refund", "lock_landed_unbooked"),
    # -- claims and releases (the payee's total) --
    ("claim", "pending", "none"): ("flag", "escrow_unknown"),
    ("claim", "pending", "open"): ("ok", "queued"),
    ("claim", "pending", "closed"): ("ok", "queued"),
    ("claim", "landed", "none"): ("flag", "escrow_unknown"),
    ("claim", "landed", "open"): ("ok", "refine"),
    ("claim", "landed", "closed"): ("ok", "refine"),
    ("claim", "failed", "none"): ("ok", "refine"),
    ("claim", "failed", "open"): ("ok", "refine"),
    ("claim", "failed", "closed"): ("ok", "gave_up"),
    ("release", "pending", "none"): ("flag", "escrow_unknown"),
    ("release", "pending", "open"): ("ok", "queued"),
    ("release", "pending", "closed"): ("ok", "queued"),
    ("release", "landed", "none"): ("flag", "escrow_unknown"),
    ("release", "landed", "open"): ("ok", "refine"),
    ("release", "landed", "closed"): ("ok", "refine"),
    ("release", "failed", "none"): ("ok", "refine"),
    ("release", "failed", "open"): ("ok", "refine"),
    ("release", "failed", "closed"): ("ok", "gave_up"),
    # -- refunds (the payer's rest) --
    ("refund", "pending", "none"): ("flag", "refine"),
    ("refund", "pending", "open"): ("ok", "queued"),
    ("refund", "pending", "closed"): ("ok", "queued"),
    ("refund", "landed", "none"): ("flag", "refine"),
    ("refund", "landed", "open"): ("flag", "refund_unknown"),
    ("refund", "landed", "closed"): ("ok", "agrees"),
    ("refund", "failed", "none"): ("ok", "refine"),
    ("refund", "failed", "open"): ("resume", "lock_landed_after_refund"),
    ("refund", "failed", "closed"): ("ok", "gave_up"),
}

# A settlement that gave up because the chain said the escrow is not there.
_GAVE_UP_NOT_THERE = frozenset({"not_found", "no_escrow_contract"})


def judge(row: LedgerRow, chain: ChainEscrow) -> Verdict:
    """What the ledger's ``row`` means against the chain's ``chain`` view of the same escrow."""
    if row.kind == "lock" and row.state in ("intent", "sent", "unknown") and row.lease_open:
        return Verdict("wait", "lock_in_flight")
    cell = _TABLE.get((row.kind, row.state, _chain_class(chain)))
    if cell is None:  # a combination that cannot occur (e.g. a lock row in state "pending")
        return Verdict("ok", "not_applicable")
    action, reason = cell
    if reason != "refine":
        return Verdict(action, reason)
    if row.kind in ("claim", "release"):
        if row.state == "failed" and chain.phase != "none":  # the escrow it gave up on is there now
            return (
                Verdict("resume", "escrow_back") if row.last_error in _GAVE_UP_NOT_THERE else Verdict("ok", "gave_up")
            )
        if row.state == "failed":  # chain "none": flag only a row that gave up because the escrow was not there
            gave_up_for_it = row.last_error in _GAVE_UP_NOT_THERE
            return Verdict("flag", "escrow_unknown") if gave_up_for_it else Verdict("ok", "gave_up")
        # landed, escrow known: the chain must have paid out at least what the ledger booked
        return Verdict("flag", "claim_unknown") if chain.released < row.booked else Verdict("ok", "agrees")
    # refunds against a chain that does not know the escrow: harmless when the lock never landed
    if row.lock_landed is False or (row.lock_landed is None and row.state == "failed"):
        return Verdict("ok", "nothing_locked")
    if row.state == "failed" and row.last_error not in _GAVE_UP_NOT_THERE:
        return Verdict("ok", "gave_up")
    return Verdict("flag", "escrow_unknown")
