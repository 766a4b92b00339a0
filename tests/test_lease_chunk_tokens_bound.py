"""A provider's chunks cannot make the consumer pay more than the call could ever be reserved.

A chunk's ``tokens`` field is the provider's word. Before, one two-character chunk claiming 100,000
tokens was counted in full, and the consumer countersigned a voucher for them: on an end frame when the
request declared no ``max_tokens``, on an error frame billing past an end frame's bound (the fallback paid
the chunks' tokens), and on a call the provider stopped answering (``count_left``). Every count is now
held to ``call_units_needed`` (the completion bound, ``max_tokens`` or ``DEFAULT_COMPLETION_CAP``, and
the prompt's estimate), what the provider's own rules reserve at most (``plan_call``). Real nodes on
loopback, a real SQLite ledger; the cheat is the provider's service and its metering, patched.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from node.config import MarketSection
from protocols.lease import serving
from protocols.machines import lease_consumer as c
from protocols.machines.lease_calls import call_units_needed, end_frame_verdict
from runtime.errors import ClawnodeError, ErrorCode
from runtime.service import Emit, Usage
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes

FAST = MarketSection(  # type: ignore[call-arg]
    receipt_every_units=5, receipt_every_s=1, countersign_timeout_s=2, abandon_after_s=30, claim_every_s=1
)

CLAIMED = 100_000  # tokens one chunk claims


@given(
    claimed=st.one_of(st.none(), st.integers(0, 10**6)),
    received=st.integers(0, 10**6),
    max_tokens=st.one_of(st.none(), st.integers(1, 4096)),
)
def test_no_count_passes_what_the_call_could_be_reserved(
    claimed: int | None, received: int, max_tokens: int | None
) -> None:
    body: dict[str, Any] = {"prompt": "hello there"}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    bound = call_units_needed(body)
    assert c.error_frame_units(claimed, received, body) <= bound
    if claimed is not None and end_frame_verdict(claimed, received, body) is None:
        assert claimed <= bound


class Inflating:
    """Streams one word whose chunk claims CLAIMED tokens, then ends ("end"), fails ("error") or goes
    deaf to the consumer's cancel ("stall")."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        await emit({"text": "hi", "tokens": CLAIMED})
        if self.mode == "error":
            raise ClawnodeError(ErrorCode.INTERNAL, "failed after the reply")
        if self.mode == "stall":
            with trio.CancelScope(shield=True):
                await trio.sleep(2)
        return Usage(units=CLAIMED, detail={"completion_tokens": CLAIMED})


async def _ignore(data: dict[str, Any]) -> None:
    return None


@pytest.mark.parametrize(
    ("mode", "body"),
    [
        ("end", {"prompt": "hi"}),  # no max_tokens declared
        ("error", {"prompt": "hi", "max_tokens": 8}),
        ("stall", {"prompt": "hi", "max_tokens": 8}),
    ],
)
async def test_chunk_tokens_past_the_call_bound_are_not_paid(
    monkeypatch: pytest.MonkeyPatch, mode: str, body: dict[str, Any]
) -> None:
    async with market_nodes([{"offers": (WORD_OFFER,), "market": FAST}, {}]) as (nodes, _):
        provider, consumer = nodes
        provider.services.register(WORDS, Inflating(mode))
        view = await consumer.market.open_lease(
            str(provider.host.get_id()), WORDS, budget=WORD_PRICE * 10**7, duration_s=60
        )
        held = consumer.market.held[view.lease_id]
        # The cheat's own code: it reserves and bills what its chunks claim, past its own rules.
        served = provider.market.served[view.lease_id]
        served.session.billable = lambda reserved, units: units  # type: ignore[method-assign]
        reserve_call = provider.ledger.reserve_call

        async def reserve_more(lease_id: str, call_id: str, *, reserved_units: int) -> Any:
            return await reserve_call(lease_id, call_id, reserved_units=10**6)

        provider.ledger.reserve_call = reserve_more  # type: ignore[method-assign]
        asked = [0]

        def aborted(reserved: int, streamed: int, prompt: int = 0) -> int:
            # The error frame bills past an end frame's bound, so the consumer falls back to its chunks.
            asked[0] += 1
            return 10**9 if asked[0] == 1 and mode == "error" else streamed

        monkeypatch.setattr(serving, "aborted_call_units", aborted)
        with contextlib.suppress(ClawnodeError):
            await consumer.market.stream_call(view.lease_id, body, _ignore, stall_s=0.5)
        bound = call_units_needed(body)
        assert held.seen_units <= bound
        # What it countersigns is held to what it counted (the receipt rule), so no voucher passes it either.
        assert held.committed <= WORD_PRICE * bound
