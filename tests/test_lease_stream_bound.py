"""A hostile provider cannot stream a consumer without end: chunks that claim no tokens (so cost
nothing) filled the consumer's memory for the whole call timeout (300 s at up to 1 MiB a frame).
The consumer now stops reading a call at a byte bound made from what the call may be billed
(``lease_calls.call_bytes_verdict``), as a provider fault the router fails over from."""

from __future__ import annotations

from typing import Any

import pytest

from node.daemon import Node
from protocols.machines import lease_calls
from runtime.errors import ClawnodeError, ErrorCode
from runtime.service import Emit, ServiceRegistry, Usage
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes

FRAME_TEXT = 200_000
FRAMES = 40  # 8 MB in all


class FloodService:
    """A stranger's provider: large chunks that say they carry no token, then a tiny bill."""

    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        for _ in range(FRAMES):
            await emit({"text": "x" * FRAME_TEXT, "tokens": 0})
        return Usage(units=1, detail={"completion_tokens": 1})


def _peer(node: Node) -> str:
    return str(node.host.get_id())


async def test_a_provider_streaming_past_the_calls_bound_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_calls, "CALL_BYTES_SLACK", 1 << 20)  # 1 MiB beside the units' share
    body = {"prompt": "one", "max_tokens": 4}
    bound = lease_calls.call_units_needed(body) * lease_calls.CALL_BYTES_PER_UNIT + (1 << 20)
    services = ServiceRegistry()
    services.register(WORDS, FloodService())
    async with market_nodes([{"offers": (WORD_OFFER,), "services": services}, {}]) as (nodes, _):
        provider, consumer = nodes
        view = await consumer.market.open_lease(_peer(provider), WORDS, budget=WORD_PRICE * 50, duration_s=60)
        delivered = 0

        async def on_chunk(data: dict[str, Any]) -> None:
            nonlocal delivered
            delivered += len(data.get("text", ""))

        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.stream_call(view.lease_id, body, on_chunk)
        assert caught.value.code == ErrorCode.INTERNAL  # a provider fault: the router tries another
        assert caught.value.reason == "stream_too_large"
        assert delivered <= bound < FRAMES * FRAME_TEXT
