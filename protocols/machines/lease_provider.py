"""The provider's decisions on what a consumer sends before and beside the metering: the quote asked
for, the signed open, the payment behind it (post-paid terms, or the consumer's own escrow lock read
on chain), a renewal, the voucher in a countersignature, and whether an escrow an open names is
free to check at all (``escrow_claim_verdict``: one escrow, one use, claimed before any read).

The rule of the market wing: every decision that can refuse is a pure function here or in the other
modules of ``protocols.machines``, taking what the adapter fetched (the request, the envelopes'
signers, the chain's escrow state, the clock) as plain data and answering with a typed verdict
(:class:`~protocols.machines.verdict.Refusal` or ``None``); ``protocols.lease.provider`` only fetches,
asks and acts. The metering rhythm (reserve, meter, receipts, pause, abandon, expiry) is
:class:`~protocols.machines.lease.LeaseSession`; ``protocols.machines.lease`` re-exports these names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from protocols.machines.escrow_lock import LockState, LockTerms, check_escrow_lock
from protocols.machines.verdict import Refusal, enforce
from runtime.errors import ClawnodeError, ErrorCode

CHAIN_DOWN = "this node's escrow chain is not connected"


# -- quotes and opens ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QuoteAsk:
    """A quote request as the provider sees it, with what it knows of itself."""

    capability: str
    offered: bool  # the capability is in our offers
    served: bool  # and a service runs it now
    duration_s: int
    max_lease_s: int
    escrow_connected: bool  # our escrow chain answers (its terms are known)
    trusted: bool  # the peer may lease post-paid


def quote_verdict(f: QuoteAsk) -> Refusal | None:
    """Whether to quote: an offered capability that is served, a duration within ``max_lease_s``, and
    an escrow chain to lock on (a trusted peer may lease post-paid without one)."""
    if not f.offered:
        return Refusal(ErrorCode.NOT_FOUND, "not_offered", f"this node does not offer {f.capability}")
    if not f.served:
        return Refusal(ErrorCode.UNAVAILABLE, "not_served", f"{f.capability} is offered but not being served")
    if f.duration_s > f.max_lease_s:
        return Refusal(
            ErrorCode.INVALID_ARGUMENT, "lease_too_long", f"leases last at most {f.max_lease_s} s on this node"
        )
    if not f.escrow_connected and not f.trusted:
        return Refusal(ErrorCode.UNAVAILABLE, "no_escrow_chain", CHAIN_DOWN + "; try again later")
    return None


def open_signer_verdict(sender: str, signer: str) -> Refusal | None:
    """The open must be signed by the peer that sends it (checked before its payload is read)."""
    if signer != sender:
        return Refusal(
            ErrorCode.FORBIDDEN, "open_wrong_signer", "the lease open is signed by another peer than the sender"
        )
    return None


@dataclass(frozen=True)
class OpenFacts:
    """A signed open and the quote inside it, as the provider read them, and its memory of used quotes."""

    sender: str
    me: str
    quote_signer: str
    quote_consumer: str
    valid_until: int
    now: int
    quote_used: bool  # this quote already opened a lease
    used_quotes_full: bool  # the set of used quotes is full even after forgetting the expired ones
    budget: int
    price_per_unit: int


def open_verdict(f: OpenFacts) -> Refusal | None:
    """Whether an open may become a lease: our quote, made out to the sender, still valid, not used
    before (and room to remember it), and a budget that covers at least one unit."""
    if f.quote_signer != f.me:
        return Refusal(ErrorCode.FORBIDDEN, "quote_not_ours", "the quote was not signed by this node")
    if f.quote_consumer != f.sender:
        return Refusal(ErrorCode.FORBIDDEN, "quote_other_peer", "the quote was made out to another peer")
    if f.valid_until < f.now:
        return Refusal(ErrorCode.EXPIRED, "quote_expired", "the quote has expired; ask for a new one")
    if f.quote_used:
        return Refusal(ErrorCode.CONFLICT, "quote_used", "this quote was already used to open a lease")
    if f.used_quotes_full:
        return Refusal(ErrorCode.UNAVAILABLE, "too_many_opens", "too many leases opened lately; try again later")
    if f.budget < f.price_per_unit:
        return Refusal(ErrorCode.INVALID_ARGUMENT, "budget_below_unit", "the budget does not cover a single unit")
    return None


@dataclass(frozen=True)
class PaymentFacts:
    """How an open says it pays, before the lock is read on chain."""

    postpaid: bool  # the open's mode
    quote_escrowed: bool  # the quote named escrow terms
    trusted: bool
    budget: int
    postpaid_cap: int
    has_lock: bool  # the open names a lock
    lease_id_is_escrow_id: bool
    chain_connected: bool


def payment_verdict(f: PaymentFacts) -> Refusal | None:
    """Post-paid only for a trusted peer on a post-paid quote and within its cap; an escrowed open
    names its lock under the lease id, and our chain must be there to read it (then ``check_lock``)."""
    if f.postpaid:
        if f.quote_escrowed or not f.trusted:
            return Refusal(ErrorCode.FORBIDDEN, "postpaid_untrusted", "post-paid leases are for trusted peers only")
        if f.budget > f.postpaid_cap:
            return Refusal(ErrorCode.INSUFFICIENT_FUNDS, "over_postpaid_cap", "the budget exceeds the post-paid cap")
        return None
    if not f.quote_escrowed or not f.has_lock:
        return Refusal(
            ErrorCode.INVALID_ARGUMENT, "lock_missing", "an escrowed lease needs the quote's terms and a lock"
        )
    if not f.chain_connected:
        return Refusal(ErrorCode.UNAVAILABLE, "no_escrow_chain", CHAIN_DOWN)
    if not f.lease_id_is_escrow_id:
        return Refusal(ErrorCode.INVALID_ARGUMENT, "lease_id_not_escrow_id", "the lease id must be the escrow id")
    return None


# -- renewals ------------------------------------------------------------------------------------


def renew_verdict(expires_at: int, now: int, max_lease_s: int) -> Refusal | None:
    """A renewal may push the expiry at most ``max_lease_s`` past now (the session then checks that it
    extends the lease at all, ``LeaseSession.renew``)."""
    if expires_at > now + max_lease_s:
        return Refusal(ErrorCode.INVALID_ARGUMENT, "lease_too_long", f"leases last at most {max_lease_s} s")
    return None


def renew_lock_verdict(chain_connected: bool, lock_deadline: int | None, expires_at: int) -> Refusal | None:
    """An escrowed lease is renewed only while its lock, read on chain, outlasts the new expiry."""
    if not chain_connected:
        return Refusal(ErrorCode.UNAVAILABLE, "no_escrow_chain", CHAIN_DOWN)
    if lock_deadline is not None and lock_deadline < expires_at:
        return Refusal(ErrorCode.INSUFFICIENT_FUNDS, "lock_too_short", "the escrow lock ends before the renewed lease")
    return None


# -- countersignatures: what the provider accepts ----------------------------------------------


def check_countersignature(
    *, escrowed: bool, amount: int, voucher: str | None, voucher_signer: str | None, payer: str | None
) -> None:
    """Provider side: a countersigned receipt counts only with a voucher the escrow's payer signed
    for exactly its amount (``voucher_signer`` is who the adapter recovered for that amount)."""
    if not escrowed or amount == 0:
        return
    if voucher is None:
        raise ClawnodeError(ErrorCode.FORBIDDEN, "the countersignature carries no escrow voucher")
    if payer is None or voucher_signer is None or voucher_signer.lower() != payer.lower():
        raise ClawnodeError(ErrorCode.UNAUTHENTICATED, "the voucher is not the escrow payer's for this amount")


# -- grants: the escrow lock a lease is opened on ------------------------------------------------


LEASE_ID_DOMAIN = b"clawnode-lease-id\x00"
LEASE_SALT_BYTES = 32


def lease_id_for(consumer: bytes, salt: bytes) -> bytes:
    """The escrow id (= lease id) a consumer may lock under: bound to its peer id (bytes) by a hash, so
    a stranger who sees it on chain cannot lock its own escrow under it and take the lease first."""
    if len(salt) != LEASE_SALT_BYTES:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"a lease salt is {LEASE_SALT_BYTES} bytes")
    return hashlib.sha256(LEASE_ID_DOMAIN + len(consumer).to_bytes(2, "big") + consumer + salt).digest()


@dataclass(frozen=True)
class LockFacts:
    """What the provider read about a lease's escrow lock, and what the quote and open say."""

    lease_id: str
    escrow_id: str  # 0x-hex, from the open
    consumer: bytes  # the sender's peer id (bytes): the Noise session says who opens
    salt: bytes | None  # from the open: escrow_id must be lease_id_for(consumer, salt)
    lock_payer: str  # from the open
    wallet: str | None  # the consumer's wallet, bound to its peer id by the wallet's signature
    wallet_bound: bool  # the binding's signature holds for the consumer's peer id
    phase: str
    payee: str
    arbiter: str
    amount: int
    released: int
    deadline: int
    window: int
    chain_now: int
    quote_payee: str
    quote_arbiter: str
    quote_window: int
    budget: int
    duration_s: int
    token: str = "0x" + "00" * 20  # the lock's ERC-20 (zero: the coin)
    quote_token: str | None = None  # the quote's
    channel_escrow: bool = False  # our channel book holds this escrow id (or a channel lease is being checked on it)


LEASE_ID_NOT_BOUND = "the lease id is not derived from the consumer's peer id"


def escrow_bound_verdict(consumer: bytes, salt: bytes | None, escrow_id: str, *, channel: bool) -> Refusal | None:
    """The escrow an open names must be the sender's: its id is ``lease_id_for(sender, salt)`` with the salt
    the open carries (a lease's own lock, or the pair's payment channel). Pure and cheap, so the adapter asks
    it before it claims the escrow (``escrow_claim_verdict``) and before any read: a stranger who saw a
    buyer's lock on chain and names it is refused at once, holding no claim that would refuse the buyer's
    own open (``escrow_in_use``) while its chain reads ran. ``check_lock`` and ``channel_lock_verdict`` ask
    it again with the rest of the facts."""
    if salt is not None and len(salt) == LEASE_SALT_BYTES and lease_id_for(consumer, salt).hex() == escrow_id[2:]:
        return None
    if channel:
        return Refusal(ErrorCode.FORBIDDEN, "channel_not_bound", "the channel id is not derived from the consumer")
    return Refusal(ErrorCode.FORBIDDEN, "lease_id_not_bound", LEASE_ID_NOT_BOUND)


def check_lock(f: LockFacts) -> None:
    """The grant's verdict on the lock: the consumer's own, paying us, holding the budget long enough."""
    if f.escrow_id[2:] != f.lease_id:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the lease id must be the escrow id")
    if f.wallet is None or not f.wallet_bound:
        raise ClawnodeError(ErrorCode.FORBIDDEN, "the open carries no wallet bound to the consumer's peer id")
    if f.wallet.lower() != f.lock_payer.lower():
        raise ClawnodeError(ErrorCode.FORBIDDEN, "the escrow lock is paid by another wallet than the consumer's")
    enforce(escrow_bound_verdict(f.consumer, f.salt, f.escrow_id, channel=False))
    if f.channel_escrow:
        # A channel's id is derived as a lease's is: its leases' vouchers already draw on this lock.
        raise ClawnodeError(ErrorCode.CONFLICT, "the escrow is a payment channel's", "lease_is_a_channel")
    check_escrow_lock(  # the checks the task market shares
        LockState(f.phase, f.payee, f.arbiter, f.amount, f.released, f.deadline, f.window, f.token),
        LockTerms(
            "lease", f.quote_payee, f.quote_arbiter, f.budget, f.quote_window, f.chain_now + f.duration_s, f.quote_token
        ),
    )


def quotes_to_forget(used: dict[str, int], now: float) -> list[str]:
    """Used quotes whose validity has ended: a reuse is refused as expired, so they need no memory."""
    return [quote_id for quote_id, valid_until in used.items() if valid_until < now]


# -- one escrow, one use: the claim an open or an award takes before its reads ------------------

# Escrow ids a node holds claims on at once (``protocols.escrow_claims``, one table for the lease and the
# task market): opens and awards being checked, leases it serves on their own lock, and its payment
# channels still open. A claim is never evicted (that would let the escrow be taken twice); a new open
# beyond this is refused until a check ends, a lease ends or a channel closes.
ESCROW_CLAIMS_MAX = 65536

# A lease's own lock, a payment channel many leases draw on, or a task award's lock (the seller's lease row
# for the task is written under it).
EscrowUse = Literal["lease", "channel", "task"]


@dataclass(frozen=True)
class EscrowClaimFacts:
    """What the node's in-memory claims say of the escrow an open or award names, before any chain or ledger read."""

    wanted_as: EscrowUse  # what the open or award names it as
    held_as: EscrowUse | None  # what a claim holds it as now; None: unclaimed
    checking: bool  # that claim is an open or award still being checked (no grant yet)
    drawn: bool  # a lease we serve draws on it now, or one being checked would (a channel's)
    claims: int  # claims held now
    claims_max: int = ESCROW_CLAIMS_MAX


def escrow_claim_verdict(f: EscrowClaimFacts) -> Refusal | None:
    """Whether an open or a task award may check (and claim) the escrow it names. The per-lease, the
    channel and the award check all read the chain and the ledger before they decide, and the ledger
    learns of a use only when its row is written: a second open or award naming an escrow another is
    checking, or a live lease or channel holds, is refused here at once (an award with the task market's
    own reason, ``lock_of_another_task``). A live channel's next lease is the one reuse allowed (one lease
    at a time). The ledger checks after the reads (``check_lock``'s ``channel_escrow``,
    ``channel_lock_verdict``'s ``lease_escrow``, the seller's ``award_lock_free_verdict``) still refuse
    what ended before."""
    if f.held_as is None:
        if f.claims >= f.claims_max:
            return Refusal(
                ErrorCode.UNAVAILABLE, "escrow_claims_full", "this node checks or serves as many escrows as it may"
            )
        return None
    if f.wanted_as == "task":
        return Refusal(ErrorCode.CONFLICT, "lock_of_another_task", "the award's lock already pays another of ours")
    if f.wanted_as == "channel" and f.held_as == "channel":
        if f.drawn or f.checking:
            return Refusal(ErrorCode.CONFLICT, "channel_busy", "another lease still draws on this channel")
        return None
    if f.checking:
        return Refusal(
            ErrorCode.CONFLICT, "escrow_in_use", "another open or task award naming this escrow is being checked"
        )
    if f.held_as in ("lease", "task"):
        if f.wanted_as == "channel":
            return Refusal(ErrorCode.CONFLICT, "channel_is_a_lease", "the escrow is a lease's own, not a channel")
        return Refusal(ErrorCode.CONFLICT, "escrow_in_use", "the escrow is the lock of a lease this node serves")
    return Refusal(ErrorCode.CONFLICT, "lease_is_a_channel", "the escrow is a payment channel's")
