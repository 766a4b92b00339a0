"""On-chain escrow for leases: the Vyper contract, its committed build, and a typed client."""

from runtime.escrow.chain import Chain, ChainMode
from runtime.escrow.client import (
    GAS_LIMITS,
    EscrowClient,
    EscrowState,
    TxResult,
    escrow_key,
    voucher_digest,
    voucher_signer,
)
from runtime.escrow.errors import EscrowError
from runtime.escrow.settings import EscrowMode, EscrowSettings, connect_escrow

__all__ = [
    "GAS_LIMITS",
    "Chain",
    "ChainMode",
    "EscrowClient",
    "EscrowError",
    "EscrowMode",
    "EscrowSettings",
    "EscrowState",
    "TxResult",
    "connect_escrow",
    "escrow_key",
    "voucher_digest",
    "voucher_signer",
]
