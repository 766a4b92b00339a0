"""Is a lease worth its gas? A pure verdict the escrow client asks before it locks.

A lease costs about :data:`LEASE_GAS` on chain: the payer's lock (161k gas), the payee's claim
(53k) and, when not all of it was used, the refund (64k) — ``bench/ledger.py`` measures each. At an
L2's 0.05 gwei that is ~1.4·10¹³ wei, seven times the value of a lease of 2,000 tokens at 1 gwei.
``escrow.max_gas_share`` (0: no limit, the default on development chains, whose gas costs nothing
real) refuses to lock a lease whose gas, at the chain's current gas price, would be more than that
share of the amount locked: ``E_INVALID_ARGUMENT`` ``gas_share``, before anything is sent.
"""

from __future__ import annotations

from runtime.errors import ErrorCode

LEASE_GAS = 161_000 + 53_000 + 64_000  # lock + claim + refund, measured (bench/ledger.py)


def gas_share(*, amount: int, gas_price: int, gas: int = LEASE_GAS) -> float:
    """The lease's gas cost as a share of ``amount`` (inf for nothing locked)."""
    cost = gas * gas_price
    return float("inf") if amount <= 0 else cost / amount


def gas_share_refusal(*, amount: int, gas_price: int, max_share: float) -> tuple[ErrorCode, str, str] | None:
    """``None`` when the lock is worth its gas (or no limit is set); else (code, reason, message)."""
    if max_share <= 0:
        return None
    share = gas_share(amount=amount, gas_price=gas_price)
    if share <= max_share:
        return None
    cost = LEASE_GAS * gas_price
    shown = "all" if share == float("inf") else f"{share:.2%}"
    return (
        ErrorCode.INVALID_ARGUMENT,
        "gas_share",
        f"the lease's gas (~{cost} wei at {gas_price} wei/gas) would take {shown} of the {amount} wei locked; "
        f"escrow.max_gas_share allows {max_share:.2%} (lock a larger budget, or raise the share)",
    )
