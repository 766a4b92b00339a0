"""The rule of a network's faucet: how fast it hands out development coin.

Each wallet is funded once and the faucet funds a bounded number of wallets
(``runtime/escrow/devchain.py``), but fresh addresses and peer ids cost a stranger nothing: without a
rate, one could take every grant in seconds and no later joiner could pay. So a node grants at most
:data:`GRANTS_PER_WINDOW` fund requests in any :data:`WINDOW_S` seconds (a node that passes requests
on to its bootstrap's faucet applies the same rule), and refuses the rest with ``E_RATE_LIMITED``
``faucet_busy``: a joining node refused starts unfunded, its log says why, and it asks again the
next time it joins (a restart). 1,024 grants then take over an hour to use up, not seconds.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.errors import ClawnodeError, ErrorCode

WINDOW_S = 60.0
GRANTS_PER_WINDOW = 16


def faucet_verdict(now: float, recent_grants: Sequence[float]) -> ClawnodeError | None:
    """``recent_grants``: when this node last granted fund requests (monotonic seconds). Pure; it
    lives beside the dev chain rather than in ``protocols/machines`` because ``bootstrap/`` (its
    adapter) may not import ``protocols/``."""
    if sum(1 for granted in recent_grants if now - granted < WINDOW_S) >= GRANTS_PER_WINDOW:
        return ClawnodeError(
            ErrorCode.RATE_LIMITED,
            f"the faucet funds at most {GRANTS_PER_WINDOW} wallets a minute; ask again later",
            "faucet_busy",
        )
    return None
