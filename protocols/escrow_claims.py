"""One node's claims on the escrow ids its markets check or serve on: one escrow, one use.

A node that provides leases and sells tasks is paid through escrows others lock and name: a lease's own
lock, a payment channel many leases draw on, a task award's lock. Every check of such an escrow reads the
chain and then the ledger, and the ledger learns of a use only when the check writes its row; two opens
naming one escrow at the same moment would each read before the other's row exists. So each check claims
the escrow id here, in memory, before its first read, and a second claim is refused at once
(``lease_provider.escrow_claim_verdict``). One table per node (``node.daemon`` makes it and hands it to the
lease market and the task market): a lease market and a task market with a table each cannot see each
other's checks.

How long a claim stays: a lease's own lock while the lease is served, a channel while it is open (both
rebuilt from the ledger at restart by the lease market: ``_restore_served``, ``recover_channels``); a task
award's while it is checked, up to its lease row (the ledger then refuses every later use). A claim goes
when its check refuses. At most ``ESCROW_CLAIMS_MAX`` at once; a claim is never evicted.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.machines.lease_provider import ESCROW_CLAIMS_MAX, EscrowClaimFacts, EscrowUse, escrow_claim_verdict
from protocols.machines.verdict import enforce


@dataclass
class EscrowClaim:
    """A claim on one escrow id: what it is used as, by whom, and whether that use is still being checked."""

    held_as: EscrowUse
    holder: str  # the lease id (a lease's own lock), the channel id, or the task id (an award's lock)
    checking: bool = True


class EscrowClaims:
    """The claim table: escrow id -> its claim, bounded by ``limit``."""

    def __init__(self, limit: int = ESCROW_CLAIMS_MAX) -> None:
        self.limit = limit
        self._claims: dict[str, EscrowClaim] = {}

    def __len__(self) -> int:
        return len(self._claims)

    def get(self, escrow_id: str) -> EscrowClaim | None:
        return self._claims.get(escrow_id)

    def claim(self, escrow_id: str, wanted_as: EscrowUse, holder: str, *, drawn: bool = False) -> bool:
        """Claim the escrow a check names, before any read, or raise the refusal. False when a live channel
        already holds it (its next lease: the claim stays the channel's, kept when this lease's check fails).
        ``drawn``: a lease draws on that channel now, or one being checked would."""
        held = self._claims.get(escrow_id)
        enforce(
            escrow_claim_verdict(
                EscrowClaimFacts(
                    wanted_as=wanted_as,
                    held_as=None if held is None else held.held_as,
                    checking=held is not None and held.checking,
                    drawn=drawn,
                    claims=len(self._claims),
                    claims_max=self.limit,
                )
            )
        )
        if held is not None:
            return False
        self._claims[escrow_id] = EscrowClaim(wanted_as, holder)
        return True

    def kept(self, escrow_id: str, holder: str) -> None:
        """The check passed: the claim stays while the lease is served or the channel is open."""
        held = self._claims.get(escrow_id)
        if held is not None and held.holder == holder:
            held.checking = False

    def dropped(self, escrow_id: str, holder: str, *, checking_only: bool = False) -> None:
        """The check refused or ended (``checking_only``: only a claim still being checked), the lease ended or
        the channel closes: the claim goes (the ledger still knows the escrow was used)."""
        held = self._claims.get(escrow_id)
        if held is not None and held.holder == holder and (held.checking or not checking_only):
            del self._claims[escrow_id]

    def restored(self, escrow_id: str, held_as: EscrowUse, holder: str) -> None:
        """After a restart: a lease served on its own lock, or a channel still open, holds its escrow again."""
        self._claims[escrow_id] = EscrowClaim(held_as, holder, checking=False)
