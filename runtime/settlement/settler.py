"""Carries one queued settlement to the escrow contract, idempotently.

Before sending anything it reads the escrow: when the effect is already there (an earlier attempt
landed, then the node crashed before writing that down; or the payer released on its own), the
settlement is reported landed without a second transaction. Every amount is cumulative, so even a
transaction sent twice cannot pay twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from runtime.escrow import EscrowClient, EscrowError
from runtime.escrow.client import EscrowState
from runtime.ledger.models import Settlement

# Reasons worth trying again later: the chain was down or slow, the refund is not due yet, the
# state moved under us (the next attempt reads it afresh), or the escrow is disputed (frozen until
# the arbiter resolves it, after which the claim or refund is closed out with what the chain says).
RETRY_REASONS = frozenset(
    {"chain_unavailable", "receipt_timeout", "too_early", "reverted", "rejected", "already_released", "disputed"}
)


@dataclass(frozen=True)
class Outcome:
    kind: Literal["landed", "retry", "failed"]
    reason: str | None = None
    tx_hash: str | None = None
    released_total: int | None = None
    refunded: int | None = None


class EscrowSettler:
    """Settles with one wallet's ``EscrowClient``; call ``settle`` on the chain's worker thread."""

    def __init__(self, client: EscrowClient) -> None:
        self.client = client

    def settle(self, settlement: Settlement, on_signed: Callable[[str], None]) -> Outcome:
        try:
            return self._settle(settlement, on_signed)
        except EscrowError as error:
            if error.reason in RETRY_REASONS:
                return Outcome("retry", error.reason)
            return Outcome("failed", error.reason)

    def _settle(self, s: Settlement, on_signed: Callable[[str], None]) -> Outcome:
        client = self.client
        if s.kind == "withdraw":
            if s.tx_hash is not None and client.tx_status(s.tx_hash) == "success":
                return Outcome("landed", tx_hash=s.tx_hash)
            if client.credit_of(client.account.address) == 0:
                return Outcome("landed", tx_hash=s.tx_hash)
            return Outcome("landed", tx_hash=client.withdraw(on_signed=on_signed).tx_hash)

        payer = str(s.params.get("payer", client.account.address))
        escrow_id = bytes.fromhex(str(s.params["escrow_id"])[2:])
        state = client.get(payer, escrow_id)
        if state.phase == "none":
            return Outcome("failed", "not_found")

        if s.kind == "claim" and s.params.get("close"):
            return self._close_channel(s, payer, escrow_id, state, on_signed)

        if s.kind in ("claim", "release"):
            if state.released >= s.amount:
                return Outcome("landed", tx_hash=s.tx_hash, released_total=state.released)
            if state.phase == "disputed":
                # Frozen until the arbiter resolves; then the next attempt closes it out.
                return Outcome("retry", "disputed")
            if state.phase == "closed" and (s.last_error == "disputed" or state.released > 0):
                # Closed for good (the arbiter resolved the dispute we waited on, or the rest went back
                # after the payee was paid in part): what the chain released is final, so book that;
                # the ledger counts only what it had not counted yet.
                return Outcome("landed", reason="closed", tx_hash=s.tx_hash, released_total=state.released)
            if state.phase != "active":
                return Outcome("failed", state.phase)
            if s.kind == "claim":
                voucher = bytes.fromhex(str(s.params["voucher"])[2:])
                result = client.claim(payer, escrow_id, s.amount, voucher, on_signed=on_signed)
            else:
                result = client.release(escrow_id, s.amount, on_signed=on_signed)
            after = client.get(payer, escrow_id)
            return Outcome("landed", tx_hash=result.tx_hash, released_total=after.released)

        # refund
        if state.phase == "closed":
            return Outcome(
                "landed", tx_hash=s.tx_hash, released_total=state.released, refunded=state.amount - state.released
            )
        if state.phase == "disputed":
            return Outcome("retry", "disputed")  # the arbiter's resolution closes it; then it lands
        result = client.refund(payer, escrow_id, on_signed=on_signed)
        return Outcome(
            "landed", tx_hash=result.tx_hash, released_total=state.released, refunded=state.amount - state.released
        )

    def _close_channel(
        self, s: Settlement, payer: str, escrow_id: bytes, state: EscrowState, on_signed: Callable[[str], None]
    ) -> Outcome:
        """The provider closes a payment channel: its highest voucher paid and the rest credited back to the
        payer in one ``settle`` (runtime/ledger/channels.py); on a contract without ``settle``, the voucher
        is claimed and the payer's refund after deadline + window returns the rest."""
        client = self.client
        if state.phase == "closed":
            return Outcome("landed", reason="closed", tx_hash=s.tx_hash, released_total=state.released)
        if state.phase == "disputed":
            return Outcome("retry", "disputed")
        voucher = bytes.fromhex(str(s.params["voucher"])[2:]) if s.params.get("voucher") else b""
        owed = s.amount > state.released and bool(voucher)
        settle = getattr(client, "settle", None)
        if settle is not None:
            result = settle(payer, escrow_id, s.amount if owed else 0, voucher if owed else b"", on_signed=on_signed)
        elif owed:
            result = client.claim(payer, escrow_id, s.amount, voucher, on_signed=on_signed)
        else:
            return Outcome("landed", reason="nothing_owed", tx_hash=s.tx_hash, released_total=state.released)
        after = client.get(payer, escrow_id)
        return Outcome("landed", tx_hash=result.tx_hash, released_total=after.released)
