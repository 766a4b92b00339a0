"""A call whose end frame left is settled in the provider's ledger however late the frame left within
its write deadline: the consumer paces the end frame's write (it controls the stream's window), and a
settlement dropped at the deadline left the call's pending row for the next start to settle at 0 units,
so the call was served unpaid."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio

from protocols.lease import serving
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes


async def test_an_end_frame_written_at_its_deadline_is_still_settled_in_the_ledger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = serving.write_frame

    async def late_end(stream: Any, data: bytes, **kwargs: Any) -> None:
        await original(stream, data, **kwargs)
        if b'"type":"end"' in data:  # the frame went out just as its deadline came (the consumer's pace)
            deadline = trio.current_effective_deadline()
            while trio.current_time() < deadline:
                time.sleep(0.01)

    monkeypatch.setattr(serving, "END_WRITE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(serving, "write_frame", late_end)
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}]) as (nodes, _):
        provider, consumer = nodes
        peer = str(provider.host.get_id())
        view = await consumer.market.open_lease(peer, WORDS, budget=WORD_PRICE * 100, duration_s=60)
        result = await consumer.market.call(view.lease_id, {"prompt": "one two three"})
        assert result.units == 3
        served = provider.market.served[view.lease_id]
        with trio.fail_after(5):
            while served.session.units_metered != 3:
                await trio.sleep(0.02)
        await trio.sleep(0.1)
        assert await provider.ledger.pending_calls(view.lease_id) == []  # settled, not left for a restart at 0
        assert (await provider.ledger.get_lease(view.lease_id)).metered_units == 3  # what receipts are issued for
