"""Full clawnode ``Node``s in one trio run, sharing one embedded EVM chain, for market tests.

The pieces live in ``node.localnet`` (``clawnode demo`` runs on them too); re-exported here.
"""

from __future__ import annotations

from node.localnet import (
    READY_TIMEOUT_S,
    WORD_OFFER,
    WORD_PRICE,
    WORDS,
    SharedChain,
    WordService,
    market_config,
    market_nodes,
    wait_for,
)

__all__ = [
    "READY_TIMEOUT_S",
    "WORDS",
    "WORD_OFFER",
    "WORD_PRICE",
    "SharedChain",
    "WordService",
    "market_config",
    "market_nodes",
    "wait_for",
]
