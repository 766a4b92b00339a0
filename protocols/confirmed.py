"""A buyer's escrow lock as a seller counts it: ``escrow.confirmations`` blocks deep.

The lease grant, a channel's opening and a task award all read the buyer's lock through
:func:`confirmed_lock`: a lock only the chain's head shows (its block may still be replaced) is
refused ``lock_unconfirmed`` (E_UNAVAILABLE, retryable; see
:func:`protocols.machines.escrow_lock.confirmation_verdict`) rather than read as no lock at all.
At ``escrow.confirmations = 1`` (the default) this is the head's state, as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.machines.escrow_lock import confirmation_verdict
from protocols.machines.verdict import enforce

if TYPE_CHECKING:  # web3 is slow to import; a node with no chain connected never needs it
    from runtime.escrow.client import EscrowClient, EscrowState


async def confirmed_lock(client: EscrowClient, payer: str, escrow_id: bytes) -> EscrowState:
    """The escrow ``payer`` locked under ``escrow_id``, as it stands ``client.confirmations`` blocks deep."""
    state = await client.chain.run(client.get_confirmed, payer, escrow_id)
    if client.confirmations > 1 and state.phase == "none":
        latest = await client.chain.run(client.get, payer, escrow_id)
        enforce(confirmation_verdict(state.phase, latest.phase, client.confirmations))
    return state
