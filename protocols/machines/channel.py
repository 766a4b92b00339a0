"""Payment channels: one escrow per consumer–provider pair that many leases draw on.

A channel is one escrow lock (``lease_id_for(consumer, salt)``, the same binding as a lease's) with a
larger amount and a longer deadline than one lease needs. The contract counts what the payee is paid
cumulatively, so the leases of a channel follow one another on one number line: a lease drawn at
``base`` signs vouchers for ``base + amount`` (its receipt's amount), and the next lease starts where
the highest voucher signed so far ends. One lease at a time draws on a channel (``busy``): a second
lease while one is live would sign vouchers over the same range, so it gets a lock of its own.

Every rule here is pure: the adapters (``protocols/lease/channels.py``) fetch the facts (ledger, chain,
clock) and act on the verdict. The channel's life is the table :data:`CHANNEL_MACHINE`.

On chain a channel costs one lock, one claim (the provider, with the highest voucher, when the
channel is idle or its deadline nears) and one refund of the rest (anyone, after deadline + window),
instead of a lock, a claim and a refund per lease.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from protocols.machines.escrow_lock import LockState, LockTerms, lock_verdict
from protocols.machines.lease_provider import escrow_bound_verdict
from protocols.machines.table import Machine, Transition
from protocols.machines.verdict import Refusal
from runtime.errors import ErrorCode

CONSUMER = "consumer"
PROVIDER = "provider"
SYSTEM = "system"


class ChannelState(StrEnum):
    OPENING = "channel_opening"  # the lock is being sent (written down first)
    OPEN = "channel_open"  # idle: the next lease may draw on it
    BUSY = "channel_busy"  # one lease draws on it now
    TOPPING_UP = "channel_topping_up"  # more coin is being added
    CLOSING = "channel_closing"  # no new lease: the claim and the refund are under way
    CLOSED = "channel_closed"  # settled on chain
    FAILED = "channel_failed"  # the lock never landed


class ChannelEvent(StrEnum):
    LOCKED = "locked"
    LOCK_FAILED = "lock_failed"
    DRAW = "draw"  # a lease starts drawing on it
    RETURN = "return"  # that lease ended
    TOP_UP = "top_up"
    TOPPED_UP = "topped_up"
    TOP_UP_FAILED = "top_up_failed"
    CLOSE = "close"
    FREEZE = "freeze"  # the escrow was seen disputed or closed under a live lease
    SETTLED = "settled"


S, E = ChannelState, ChannelEvent
_BOTH = frozenset({CONSUMER, PROVIDER})
_ANY = frozenset({CONSUMER, PROVIDER, SYSTEM})

# Persisted states (the ledger's ``channels.state``): busy and topping-up live in memory only; a
# restart finds a channel open, opening or closing.
PERSISTED_STATES = (S.OPENING, S.OPEN, S.CLOSING, S.CLOSED, S.FAILED)

CHANNEL_MACHINE: Machine[ChannelState, ChannelEvent] = Machine(
    "channel",
    [
        Transition(S.OPENING, E.LOCKED, S.OPEN, frozenset({CONSUMER})),
        Transition(S.OPENING, E.LOCK_FAILED, S.FAILED, frozenset({CONSUMER, SYSTEM})),
        Transition(S.OPEN, E.DRAW, S.BUSY, _BOTH),
        Transition(S.BUSY, E.RETURN, S.OPEN, _ANY),
        Transition(S.OPEN, E.TOP_UP, S.TOPPING_UP, frozenset({CONSUMER})),
        Transition(S.TOPPING_UP, E.TOPPED_UP, S.OPEN, frozenset({CONSUMER})),
        Transition(S.TOPPING_UP, E.TOP_UP_FAILED, S.OPEN, frozenset({CONSUMER, SYSTEM})),
        Transition(S.OPEN, E.CLOSE, S.CLOSING, _ANY),
        Transition(S.BUSY, E.FREEZE, S.CLOSING, _ANY),
        Transition(S.OPEN, E.FREEZE, S.CLOSING, _ANY),
        Transition(S.CLOSING, E.SETTLED, S.CLOSED, _ANY),
    ],
    initial=S.OPENING,
    terminal=(S.CLOSED, S.FAILED),
)


@dataclass(frozen=True)
class ChannelPolicy:
    """``[market]``'s channel keys."""

    leases_per_lock: int = 10  # a new channel locks this many lease budgets
    duration_s: int = 86_400  # a new channel's lock lasts this long
    idle_close_s: int = 600  # the consumer closes a channel unused this long
    claim_idle_s: int = 300  # the provider claims a channel unused this long
    margin_s: int = 600  # no lease may end within this of the deadline; closing starts then


# -- the consumer: draw, top up, open, close ---------------------------------------------------------


@dataclass(frozen=True)
class ChannelView:
    """One channel as the consumer's ledger and memory have it."""

    state: ChannelState
    amount: int  # locked on chain, top-ups included
    committed: int  # the highest voucher signed on it (cumulative)
    deadline: int  # chain time


@dataclass(frozen=True)
class DrawFacts:
    channel: ChannelView | None  # the pair's newest channel, if any
    budget: int  # the lease's budget
    duration_s: int  # the lease's duration
    chain_now: int
    top_up_supported: bool  # the contract has top_up (runtime/escrow/client.py)
    policy: ChannelPolicy


@dataclass(frozen=True)
class Draw:
    """Draw on the channel: the lease's vouchers are ``base + amount``."""

    base: int


@dataclass(frozen=True)
class TopUp:
    """Add ``amount`` to the channel, then draw at ``base``."""

    amount: int
    base: int


@dataclass(frozen=True)
class OpenChannel:
    """Lock a new channel of ``amount`` (the old one, if any, is closed by :func:`close_verdict`)."""

    amount: int
    reason: str


@dataclass(frozen=True)
class PerLease:
    """No channel for this lease: it locks its own escrow, as without channels."""

    reason: str


DrawVerdict = Draw | TopUp | OpenChannel | PerLease


def channel_amount(budget: int, policy: ChannelPolicy) -> int:
    return budget * max(1, policy.leases_per_lock)


def draw_verdict(f: DrawFacts) -> DrawVerdict:
    """How the next lease with this provider is paid."""
    ch = f.channel
    amount = channel_amount(f.budget, f.policy)
    if f.duration_s + f.policy.margin_s > f.policy.duration_s:
        return PerLease("lease_outlasts_channels")
    if ch is None or ch.state in (S.CLOSING, S.CLOSED, S.FAILED):
        return OpenChannel(amount, "no_channel")
    if ch.state != S.OPEN:
        return PerLease("channel_busy")  # one lease at a time: a second would sign over the same range
    if ch.deadline < f.chain_now + f.duration_s + f.policy.margin_s:
        return OpenChannel(amount, "channel_ending")
    left = ch.amount - ch.committed
    if left >= f.budget:
        return Draw(ch.committed)
    if f.top_up_supported:
        return TopUp(amount - left, ch.committed)
    return OpenChannel(amount, "channel_spent")


@dataclass(frozen=True)
class CloseFacts:
    state: ChannelState
    amount: int
    committed: int
    deadline: int
    chain_now: int
    idle_s: float  # since its last lease ended
    newer_channel: bool  # the pair has a newer channel: this one takes no more leases
    policy: ChannelPolicy


@dataclass(frozen=True)
class Close:
    reason: str


def close_verdict(f: CloseFacts) -> Close | None:
    """The consumer's: close an idle, ending, spent or replaced channel (never one a lease draws on)."""
    if f.state != S.OPEN:
        return None
    if f.newer_channel:
        return Close("replaced")
    if f.chain_now >= f.deadline - f.policy.margin_s:
        return Close("ending")
    if f.committed >= f.amount:
        return Close("spent")
    if f.idle_s >= f.policy.idle_close_s:
        return Close("idle")
    return None


def voucher_verdict(*, current: bool, base: int, amount: int, channel_amount: int) -> Refusal | None:
    """The consumer signs a voucher for ``base + amount`` only while its lease is the channel's
    current one (a later lease starts at the highest voucher so far) and within what is locked."""
    if not current:
        return Refusal(
            ErrorCode.CONFLICT, "channel_moved_on", "the channel serves a newer lease; this one is settled as it was"
        )
    if base + amount > channel_amount:
        return Refusal(ErrorCode.INSUFFICIENT_FUNDS, "channel_short", "the voucher would exceed the channel's lock")
    return None


# -- the provider: accept a lease on a channel, claim ---------------------------------------------


@dataclass(frozen=True)
class ChannelLockFacts:
    """What the provider read about a channel a lease would draw on, and what the quote and open say."""

    escrow_id: str  # 0x-hex
    consumer: bytes  # the sender's peer id (bytes)
    salt: bytes | None  # the channel's salt: escrow_id must be lease_id_for(consumer, salt)
    lock_payer: str
    wallet: str | None
    wallet_bound: bool
    base: int  # where the consumer says this lease starts
    high_water: int  # the highest voucher we hold on this channel (cumulative)
    busy: bool  # a lease we serve still draws on this channel
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
    margin_s: int
    token: str = "0x" + "00" * 20  # the channel's ERC-20 (zero: the coin)
    quote_token: str | None = None  # the quote's
    lease_escrow: bool = False  # our ledger holds a lease whose own escrow this is (its id is the lease's)


def channel_lock_verdict(f: ChannelLockFacts) -> Refusal | None:
    """The grant's verdict on a channel: the consumer's own, paying us, with the lease's budget free above
    every voucher we already hold, lasting past the lease by the margin, and no other lease drawing on it."""
    if f.wallet is None or not f.wallet_bound:
        return Refusal(
            ErrorCode.FORBIDDEN, "wallet_not_bound", "the open carries no wallet bound to the consumer's peer id"
        )
    if f.wallet.lower() != f.lock_payer.lower():
        return Refusal(ErrorCode.FORBIDDEN, "lock_wrong_payer", "the channel is paid by another wallet")
    bound = escrow_bound_verdict(f.consumer, f.salt, f.escrow_id, channel=True)
    if bound is not None:
        return bound
    if f.lease_escrow:
        # A per-lease escrow's id is derived as a channel's is: its lease's vouchers already draw on it from 0.
        return Refusal(ErrorCode.CONFLICT, "channel_is_a_lease", "the escrow is a lease's own, not a channel")
    if f.busy:
        return Refusal(ErrorCode.CONFLICT, "channel_busy", "another lease still draws on this channel")
    if f.base < f.high_water or f.base < f.released:
        return Refusal(ErrorCode.CONFLICT, "channel_base_behind", "the lease would start below vouchers already given")
    # Above ``base`` the channel must hold the budget, until the lease's end plus the margin (the
    # provider claims before the deadline; the payer may take the rest back after it).
    lasts_until = f.chain_now + f.duration_s + f.margin_s
    return lock_verdict(
        LockState(f.phase, f.payee, f.arbiter, f.amount, f.base, f.deadline, f.window, f.token),
        LockTerms("lease", f.quote_payee, f.quote_arbiter, f.budget, f.quote_window, lasts_until, f.quote_token),
    )


@dataclass(frozen=True)
class ClaimFacts:
    high_water: int  # the highest voucher held
    claimed: int  # what a claim already asked for (or landed)
    busy: bool
    idle_s: float
    deadline: int
    window: int
    chain_now: int
    policy: ChannelPolicy


@dataclass(frozen=True)
class Claim:
    cumulative: int
    reason: str


def claim_verdict(f: ClaimFacts) -> Claim | None:
    """The provider's: claim the highest voucher once, when the channel is idle or its deadline nears
    (the payer may take the rest back after deadline + window, so the claim must land before that)."""
    if f.high_water <= f.claimed:
        return None
    if f.chain_now >= f.deadline - f.policy.margin_s:
        return Claim(f.high_water, "ending")
    if not f.busy and f.idle_s >= f.policy.claim_idle_s:
        return Claim(f.high_water, "idle")
    return None


def lease_share(released: int, base: int, final: int) -> int:
    """What of a channel's cumulative ``released`` pays the lease drawn at ``base`` that reached ``final``."""
    return max(0, min(released - base, final))
