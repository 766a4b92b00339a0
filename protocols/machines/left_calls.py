"""The consumer's allowance for the calls it left without the provider's last frame, and when it ends.

A call the consumer leaves without the provider's end or error frame (a reset, a stall, a cut
connection) is billed by the provider the chunks it wrote and the prompt its engine decoded
(``aborted_call_units``); the consumer counted the chunks it received, so it allows each such call
more on a receipt: what was in flight and the prompt's estimate (``receipt_tolerance`` of one call).
Before, those allowances were summed over the lease's life: a provider that billed little on left
calls could later put the sum of their unused allowances on one receipt. Now a left call's allowance
is used by the bill that covers it, and only by that bill:

* It stays *open* while the provider may not have metered the call yet: for
  :data:`LEFT_CALL_BILLED_S` after the consumer left it (the provider's wait for its engine's cut
  job, its frame writes, a receipt's push, with room).
* The first receipt countersigned after that *bills past* it (an honest provider's receipt issued
  then covers it): the call keeps, as ``credit``, only what that receipt claimed beyond what the
  consumer counted, within the call's allowance; the rest of its allowance is gone.

What the receipt claimed beyond our count is read generously (the provider's side of a doubt): the
units counted in the last :data:`RECEIPT_LAG_S` (end frames that may have left after the receipt was
issued) and the chunks of calls still open (perhaps not metered yet) are not taken as in it. An
honest provider's later receipts therefore always fit; a provider that billed a left call less than
its allowance cannot claim the difference later, beyond that doubt (at most the units counted in the
last :data:`RECEIPT_LAG_S`, and never more than the allowances closed).

Pure: facts (the clock, the consumer's count, the receipt) in, a new :class:`LeftCalls` or a
verdict out. The consumer's adapter (``protocols.lease.consumer``) keeps one per held lease.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from protocols.machines.lease_calls import (
    ABORTED_CALL_TOLERANCE_UNITS,
    prompt_units_estimate,
    receipt_claim_verdict,
)
from protocols.machines.verdict import Refusal
from runtime.errors import ClawnodeError, ErrorCode

# By then an honest provider has metered a call we left: its wait for the cut job (10 s,
# ``engine.SHUTDOWN_WAIT_S``), its error or end frame's write (at most 10 s) and the metering after
# it, and the push of a receipt issued after that (``PUSH_TIMEOUT_S``, 10 s); and that even when our
# cancel reached it late: a network cut can hold it in TCP's send buffer for as long as the
# connection lives (Linux gives up retransmitting after about 15 minutes). A receipt the provider
# issued before it metered the call, countersigned after this, would close the call's allowance and
# have every later receipt refused: 60 s let a 70 s outage do that to an honest provider. The
# allowance still cannot be saved up past this (a lump on a receipt hours later).
LEFT_CALL_BILLED_S = 900.0
# A receipt may miss units we counted this recently: end frames that left after it was issued, while
# its push was on its way (``PUSH_TIMEOUT_S``) or the provider was still writing the call's row.
RECEIPT_LAG_S = 15.0


@dataclass(frozen=True)
class LeftCall:
    """One call left without the provider's last frame, whose bill may still come."""

    left_at: float  # the consumer's clock when it left the call
    received: int  # the units of the chunks that arrived (already in the consumer's count)
    allowance: int  # what it may be billed beyond them: in flight, and its prompt's estimate


@dataclass(frozen=True)
class LeftCalls:
    """A held lease's left calls: those whose bill may still come (``open``), and what the receipts
    that billed past the others claimed for them beyond our count (``credit``)."""

    open: tuple[LeftCall, ...] = ()
    credit: int = 0
    recent: tuple[tuple[float, int], ...] = ()  # (second, units) counted within RECEIPT_LAG_S

    @property
    def tolerance(self) -> int:
        """The units a receipt may exceed our count by: the credit and every open call's allowance."""
        return self.credit + sum(call.allowance for call in self.open)


def left_call_allowance(body: Any) -> int:
    """What a call we left without the provider's last frame may be billed beyond the chunks that
    arrived: what was in flight (:data:`ABORTED_CALL_TOLERANCE_UNITS`) and its prompt's estimate."""
    return ABORTED_CALL_TOLERANCE_UNITS + prompt_units_estimate(body)


def _recent(state: LeftCalls, now: float) -> tuple[tuple[float, int], ...]:
    return tuple((at, units) for at, units in state.recent if at > now - RECEIPT_LAG_S)


def counted(state: LeftCalls, now: float, units: int) -> LeftCalls:
    """We counted ``units`` of a call that ended with the provider's frame (an end or error frame).
    Kept only while a left call is open (no receipt bills past one sooner than
    :data:`LEFT_CALL_BILLED_S` after it was left, so what was counted before then never matters),
    a second at a time: a busy lease keeps at most :data:`RECEIPT_LAG_S` entries."""
    if units < 0:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "units must be >= 0")
    if not state.open:
        return replace(state, recent=()) if state.recent else state
    recent = _recent(state, now)
    if not units:
        return replace(state, recent=recent)
    at = math.floor(now) + 1.0  # the end of its second: kept that much longer, on the provider's side
    if recent and recent[-1][0] == at:
        return replace(state, recent=(*recent[:-1], (at, recent[-1][1] + units)))
    return replace(state, recent=(*recent, (at, units)))


def left(state: LeftCalls, now: float, received: int, body: Any) -> LeftCalls:
    """We left a call without the provider's last frame, having received ``received`` units of it."""
    if received < 0:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "received must be >= 0")
    call = LeftCall(left_at=now, received=received, allowance=left_call_allowance(body))
    return replace(state, open=(*state.open, call), recent=_recent(state, now))


def receipt_verdict(
    state: LeftCalls, receipt_units: int, receipt_amount: int, seen_units: int, price_per_unit: int
) -> Refusal | None:
    """Whether a receipt may be countersigned: within our count (``seen_units``) plus the left calls'
    tolerance (:attr:`LeftCalls.tolerance`), priced at units times price."""
    return receipt_claim_verdict(receipt_units, receipt_amount, seen_units, price_per_unit, state.tolerance)


def countersigned(state: LeftCalls, now: float, receipt_units: int, seen_units: int) -> LeftCalls:
    """We countersigned a receipt for ``receipt_units`` (cumulative) with ``seen_units`` counted: the
    open calls left at least :data:`LEFT_CALL_BILLED_S` ago are billed past. They add to the credit
    what the receipt claimed beyond what is surely in it (our count, less the units counted in the
    last :data:`RECEIPT_LAG_S` and the chunks of calls still open) and beyond the credit so far,
    within their allowances."""
    if receipt_units < 0 or seen_units < 0:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "units must be >= 0")
    recent = _recent(state, now)
    closing = [call for call in state.open if call.left_at <= now - LEFT_CALL_BILLED_S]
    if not closing:
        return replace(state, recent=recent)
    still_open = tuple(call for call in state.open if call.left_at > now - LEFT_CALL_BILLED_S)
    surely_in = seen_units - sum(units for _, units in recent) - sum(call.received for call in still_open)
    claimed = receipt_units - surely_in - state.credit
    credit = state.credit + max(0, min(claimed, sum(call.allowance for call in closing)))
    return LeftCalls(open=still_open, credit=credit, recent=recent)


def refused(state: LeftCalls, left_at: float) -> LeftCalls:
    """A call left at ``left_at`` failed its spot check: its units were taken back, so it keeps no
    allowance either (a caught provider would else still be paid it on a receipt)."""
    kept = list(state.open)
    for index, call in enumerate(kept):
        if call.left_at == left_at:
            del kept[index]
            break
    return replace(state, open=tuple(kept))
