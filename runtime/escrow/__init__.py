"""On-chain escrow for leases: the Vyper contract, its committed build, and a typed client."""

from runtime.escrow.chain import Chain, ChainMode
from runtime.escrow.client import (
    GAS_LIMITS,
    EscrowClient,
    EscrowState,
    TxResult,
    asset_id,
    escrow_key,
    panel_vote_digest,
    panel_vote_signer,
    parse_asset,
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
    "asset_id",
    "connect_escrow",
    "escrow_key",
    "panel_vote_digest",
    "panel_vote_signer",
    "parse_asset",
    "voucher_digest",
    "voucher_signer",
]
