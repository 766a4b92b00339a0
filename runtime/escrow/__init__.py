"""On-chain escrow for leases: the Vyper contract, its committed build, and a typed client.

The names below load on first use (PEP 562): web3 and eth_account take a large share of a
node's start, and a node that has no chain connected yet never needs them. ``from
runtime.escrow import faucet`` (a light submodule) therefore no longer pulls in web3.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOME = {
    "Chain": "chain",
    "ChainMode": "chain",
    "GAS_LIMITS": "client",
    "EscrowClient": "client",
    "EscrowState": "client",
    "TxResult": "client",
    "asset_id": "client",
    "escrow_key": "client",
    "panel_vote_digest": "client",
    "panel_vote_signer": "client",
    "parse_asset": "client",
    "voucher_digest": "client",
    "voucher_signer": "client",
    "EscrowError": "errors",
    "EscrowMode": "settings",
    "EscrowSettings": "settings",
    "connect_escrow": "settings",
}

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


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
