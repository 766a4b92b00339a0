"""Can this node pay that provider? A pure verdict over the two nodes' payment networks.

A lease is paid by an escrow lock on the provider's chain, in the provider's escrow contract. A
consumer can only lock where its own wallet is: on its own chain (CAIP-2 ``eip155:<chain id>``), in
its own contract. Two nodes on different chains (or different contracts on one chain) cannot pay
each other, whatever else they agree on; trying costs a quote round trip and ends in a refusal
that blames the wrong thing (a lock the provider cannot see). So discovery splits providers by
this verdict before anyone is asked: the payable ones are ranked and tried, the others are only
listed ("3 providers on other chains").

The facts are plain data: what the provider's signed capability record says of the capability
(``Prerequisites.escrow_chain`` / ``escrow_contract``), and the chain and contract this node's
escrow client is connected to (``None`` while it is not connected, or when escrow is off).

The verdict refuses only on positive knowledge: a record that names no escrow (an older node, or
one whose chain is not connected yet) and a consumer whose own chain is not connected are left to
the quote, which says what it needs (a post-paid quote to a trusted peer needs no chain at all).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.machines.verdict import Refusal
from runtime.errors import ErrorCode


@dataclass(frozen=True)
class PaymentNetwork:
    """Where a node's escrow lives: a CAIP-2 chain id and the escrow contract's address."""

    chain: str  # "eip155:<decimal chain id>"
    contract: str  # 0x + 40 hex


@dataclass(frozen=True)
class ProviderTerms:
    """What a provider's record says of how it is paid for one capability."""

    escrow_chain: str | None
    escrow_contract: str | None


def caip2(chain_id: int) -> str:
    """The CAIP-2 id of an EVM chain."""
    return f"eip155:{chain_id}"


def payable_verdict(ours: PaymentNetwork | None, theirs: ProviderTerms) -> Refusal | None:
    """``None`` when this node can (or may yet) pay the provider; else why it never can.

    Refusals (``E_UNAVAILABLE``): ``other_chain`` (the provider's escrow is on another chain),
    ``other_contract`` (same chain, another escrow contract).
    """
    if ours is None or theirs.escrow_chain is None or theirs.escrow_contract is None:
        return None
    if theirs.escrow_chain != ours.chain:
        return Refusal(
            ErrorCode.UNAVAILABLE,
            "other_chain",
            f"the provider is paid on {theirs.escrow_chain}; this node's escrow is on {ours.chain}",
        )
    if theirs.escrow_contract.lower() != ours.contract.lower():
        return Refusal(
            ErrorCode.UNAVAILABLE,
            "other_contract",
            f"the provider is paid through another escrow contract on {ours.chain}",
        )
    return None


def unpayable_summary(reasons: list[str]) -> str | None:
    """One line for the providers left out, e.g. ``3 providers on other chains`` (None: none left out)."""
    chains = sum(1 for reason in reasons if reason == "other_chain")
    contracts = sum(1 for reason in reasons if reason == "other_contract")
    parts = []
    if chains:
        parts.append(f"{chains} provider{'s' if chains != 1 else ''} on other chains")
    if contracts:
        parts.append(f"{contracts} provider{'s' if contracts != 1 else ''} on other escrow contracts")
    return ", ".join(parts) if parts else None
