"""Is a lease worth its gas, and what does a transaction offer per gas? Pure verdicts the escrow client asks.

A lease costs about :data:`LEASE_GAS` on chain: the payer's lock (172k gas), the payee's claim
(58k) and, when not all of it was used, the refund (69k) — ``bench/ledger.py`` measures each. At an
L2's 0.05 gwei that is ~1.5·10¹³ wei, seven and a half times the value of a lease of 2,000 tokens at 1 gwei.
``escrow.max_gas_share`` (0: no limit, the default on development chains, whose gas costs nothing
real) refuses to lock a lease whose gas, at the chain's current gas price, would be more than that
share of the amount locked: ``E_INVALID_ARGUMENT`` ``gas_share``, before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.errors import ErrorCode

LEASE_GAS = 172_000 + 58_000 + 69_000  # lock + claim + refund, measured (bench/ledger.py, steady state)


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


@dataclass(frozen=True)
class Fees:
    """What a transaction offers per gas: EIP-1559 (``max_fee``, ``tip``) or, on a chain without a
    base fee, a legacy ``gas_price``."""

    max_fee: int | None = None
    tip: int | None = None
    gas_price: int | None = None

    def tx_fields(self) -> dict[str, int]:
        if self.gas_price is not None:
            return {"gasPrice": self.gas_price}
        assert self.max_fee is not None and self.tip is not None
        return {"maxFeePerGas": self.max_fee, "maxPriorityFeePerGas": self.tip}


def choose_fees(*, base_fee: int | None, gas_price: int, max_fee_cap: int) -> Fees | tuple[ErrorCode, str, str]:
    """The fees of the next transaction, or (code, reason, message) when the chain asks more than the cap.

    ``base_fee`` is the latest block's (None: a chain without EIP-1559), ``gas_price`` the chain's
    suggested price (``eth_gasPrice``: base fee + the tip it expects), ``max_fee_cap`` the configured
    most per gas (``escrow.max_fee_gwei``; 0: no cap). EIP-1559: the tip is what the chain suggests
    above the base fee, the fee cap two base fees plus the tip (room for six full blocks of rising
    base fee), both cut to the cap; a base fee already above the cap cannot be paid now:
    ``E_UNAVAILABLE`` ``fee_cap`` (retry later, or raise the cap).
    """
    if base_fee is None:
        if max_fee_cap and gas_price > max_fee_cap:
            return _over_cap(gas_price, max_fee_cap)
        return Fees(gas_price=gas_price)
    if max_fee_cap and base_fee > max_fee_cap:
        return _over_cap(base_fee, max_fee_cap)
    tip = max(0, gas_price - base_fee)
    max_fee = 2 * base_fee + tip
    if max_fee_cap:
        max_fee = min(max_fee, max_fee_cap)
        tip = min(tip, max_fee - base_fee)
    return Fees(max_fee=max_fee, tip=tip)


def _over_cap(asked: int, cap: int) -> tuple[ErrorCode, str, str]:
    return (
        ErrorCode.UNAVAILABLE,
        "fee_cap",
        f"the chain asks {asked} wei per gas, above escrow.max_fee_gwei ({cap} wei per gas): nothing was sent",
    )
