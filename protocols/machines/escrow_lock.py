"""The escrow-lock check both markets share: is the lock on chain the one that was agreed?

A lease's grant (``protocols.machines.lease.check_lock``) and a task's award on the bidder's side
(``protocols.machines.task_checks.check_award``) both read one escrow lock from the chain and ask
the same questions of it: still active, paying the agreed payee under the agreed arbiter, holding
the agreed amount, with the agreed dispute window, lasting long enough. The market-specific checks
(whose wallet pays, how the id is bound) stay with each market.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from protocols.machines.verdict import Refusal, enforce
from runtime.errors import ErrorCode


@dataclass(frozen=True)
class LockState:
    """An escrow lock as the chain shows it."""

    phase: str  # none | active | disputed | closed
    payee: str
    arbiter: str
    amount: int
    released: int
    deadline: int  # chain time
    window: int
    token: str = "0x" + "00" * 20  # the ERC-20 locked; the zero address: the chain's coin


@dataclass(frozen=True)
class LockTerms:
    """What the lock must be: from the quote (a lease) or the signed award (a task)."""

    subject: Literal["lease", "task"]
    payee: str
    arbiter: str
    amount: int
    window: int
    lasts_until: int  # chain time the lock must not end before
    token: str | None = None  # the ERC-20 agreed; None: the chain's coin


def escrow_frozen(phase: str) -> bool:
    """An escrow that no longer pays its payee on a voucher: disputed, closed or gone."""
    return phase != "active"


def lock_verdict(lock: LockState, terms: LockTerms) -> Refusal | None:
    """``None`` when the lock holds what was agreed; otherwise the first thing wrong with it."""
    if escrow_frozen(lock.phase):
        return Refusal(
            ErrorCode.INSUFFICIENT_FUNDS, "lock_not_active", f"no active escrow lock was found for this {terms.subject}"
        )
    if lock.payee.lower() != terms.payee.lower() or lock.arbiter.lower() != terms.arbiter.lower():
        return Refusal(
            ErrorCode.FORBIDDEN, "lock_wrong_parties", "the escrow lock names another payee or arbiter than agreed"
        )
    if int(lock.token, 16) != (0 if terms.token is None else int(terms.token, 16)):
        return Refusal(
            ErrorCode.INSUFFICIENT_FUNDS, "lock_wrong_asset", "the escrow lock holds another asset than agreed"
        )
    if lock.amount - lock.released < terms.amount:
        return Refusal(ErrorCode.INSUFFICIENT_FUNDS, "lock_short", "the escrow lock holds less than agreed")
    if lock.window != terms.window:
        return Refusal(
            ErrorCode.INVALID_ARGUMENT,
            "lock_wrong_window",
            "the escrow lock's dispute window differs from the agreed one",
        )
    if lock.deadline < terms.lasts_until:
        return Refusal(
            ErrorCode.INVALID_ARGUMENT, "lock_too_short", f"the escrow lock ends before the {terms.subject} would"
        )
    return None


LOCK_UNCONFIRMED = "lock_unconfirmed"


def confirmation_verdict(confirmed_phase: str, latest_phase: str, confirmations: int) -> Refusal | None:
    """A lock the chain's head shows but that is not yet ``escrow.confirmations`` blocks deep does not count
    yet: refused with a retryable reason (the buyer sends the same open again a little later), never read as
    "no lock" (which would blame the buyer's funds)."""
    if confirmed_phase == "none" and latest_phase != "none":
        return Refusal(
            ErrorCode.UNAVAILABLE,
            LOCK_UNCONFIRMED,
            f"the escrow lock is not yet {confirmations} blocks deep (escrow.confirmations); retry shortly",
        )
    return None


def check_escrow_lock(lock: LockState, terms: LockTerms) -> None:
    """:func:`lock_verdict`, raised."""
    enforce(lock_verdict(lock, terms))


def trusted_arbiter_verdict(arbiter: str, trusted_arbiter: str | None) -> Refusal | None:
    """A lease's lock (its own or a payment channel's) only under the arbiter this node trusts (its own
    escrow terms' arbiter): the arbiter decides a disputed escrow alone, so one the provider names (a
    second wallet of its own) could resolve the whole amount locked to the provider. A task's single
    arbiter is trusted as a (peer id, wallet) pair: ``task_checks.award_arbiter_verdict``."""
    if trusted_arbiter is None:
        return Refusal(
            ErrorCode.UNAVAILABLE,
            "no_trusted_arbiter",
            "this node knows no arbiter of its own (no escrow chain connected, or none configured): "
            "set escrow.arbiter to the arbiter you trust",
        )
    if arbiter.lower() != trusted_arbiter.lower():
        return Refusal(
            ErrorCode.FORBIDDEN,
            "quote_untrusted_arbiter",
            "the provider's escrow names another arbiter than the one this node trusts (escrow.arbiter)",
        )
    return None
