"""A consumer reads its own request frame back before the call (so it checks, and hands an arbiter, the
request as the provider reads it); a frame larger than ``PARSE_ON_LOOP_BYTES`` is parsed on a worker
thread, not on the trio loop, where a 0.9 MB body held every other call of the node for tens of
milliseconds. Real nodes: a 300 KB request is served whole, and its frame was parsed off the loop."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from protocols.lease import consumer as consumer_module
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes


async def test_a_large_request_frame_is_parsed_back_off_the_trio_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[tuple[int, bool]] = []  # (frame bytes, parsed on the trio thread) per consumer parse
    real_loads = json.loads
    trio_thread = threading.current_thread()

    def loads(data: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(data, bytes) and data.startswith(b'{"type":"call"'):
            parsed.append((len(data), threading.current_thread() is trio_thread))
        return real_loads(data, *args, **kwargs)

    monkeypatch.setattr(consumer_module.json, "loads", loads)
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}]) as (nodes, _):
        provider, consumer = nodes
        lease = await consumer.market.open_lease(str(provider.host.get_id()), WORDS, budget=WORD_PRICE * 100)
        small = await consumer.market.call(lease.lease_id, {"prompt": "one two three"})
        large = await consumer.market.call(lease.lease_id, {"prompt": "word " * 60_000, "max_tokens": 3})
    assert [c["text"] for c in small.chunks] == ["one", "two", "three"]
    assert [c["text"] for c in large.chunks] == ["word"] * 3 and large.units == 3
    bound = consumer_module.PARSE_ON_LOOP_BYTES
    # Each frame parsed back once: the small one on the loop, the large one off it.
    assert [(size > bound, on_loop) for size, on_loop in parsed] == [(False, True), (True, False)]
