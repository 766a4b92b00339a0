"""What a provider may bill for calls that end without an end frame, on real nodes over loopback and
the real embedded chain: a call the consumer left without an end frame is allowed its prompt's
estimate only on the bill that covers it (``protocols.machines.left_calls``), and a call the engine
fails after decoding its prompt is billed that prompt by its error frame.

Each test failed on the code before its fix (its docstring says how).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from node.config import MarketSection
from node.daemon import Node
from protocols.machines import left_calls
from protocols.machines.lease import prompt_units_estimate
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.engine import LlamaModel
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.service import Emit, Usage
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, WordService, market_nodes, wait_for

FAST = MarketSection(  # type: ignore[call-arg]
    receipt_every_units=5, receipt_every_s=1, countersign_timeout_s=2, abandon_after_s=30, claim_every_s=1
)
LONG_PROMPT = " ".join(f"w{i}" for i in range(40))


class SlowWords(WordService):
    """Word echo at a model's pace (one word every 20 ms), so a consumer can leave mid-answer."""

    async def run(self, body: dict[str, Any], emit: Emit, *, on_cut: Callable[[int], None] | None = None) -> Usage:
        words = str(body["prompt"]).split()[: body.get("max_tokens", 10**6)]
        for word in words:
            await emit({"text": word})
            await trio.sleep(0.02)
        return Usage(units=len(words), detail={"prompt_tokens": 0, "completion_tokens": len(words)})


def _peer(node: Node) -> str:
    return str(node.host.get_id())


async def _reset_after(market: Any, lease_id: str, words: int) -> None:
    """Call with ``LONG_PROMPT`` and, once ``words`` words arrived, reset the stream and leave: no
    cancel frame reaches the provider and no end frame comes back."""
    leave = market._leave_call

    async def reset_first(held: Any, stream: Any, reader: Any, body: dict[str, Any], tokens: int) -> None:
        await stream.reset()
        await leave(held, stream, reader, body, tokens)

    market._leave_call = reset_first
    seen = 0
    try:
        with trio.CancelScope() as scope:

            async def count(_data: dict[str, Any]) -> None:
                nonlocal seen
                seen += 1
                if seen == words:
                    scope.cancel()

            await market.stream_call(lease_id, {"prompt": LONG_PROMPT}, count)
    finally:
        market._leave_call = leave


async def test_a_left_calls_unused_allowance_cannot_be_billed_later(monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer leaves three calls without their end frames; the provider bills them their words
    and has that countersigned once they are billed past, then puts the three calls' unused prompt
    allowances (about 300 units each) on its next receipt. Before: the consumer summed the allowances
    of every call it ever left and countersigned that receipt. Now each call's allowance was used by
    the bill that covered it, and the inflated receipt is refused."""
    monkeypatch.setattr(left_calls, "LEFT_CALL_BILLED_S", 1.0)  # an honest provider meters a cut call at once here
    monkeypatch.setattr(left_calls, "RECEIPT_LAG_S", 0.5)
    async with market_nodes([{"offers": (WORD_OFFER,), "market": FAST}, {}]) as (nodes, _):
        provider, consumer = nodes
        provider.services.register(WORDS, SlowWords())
        view = await consumer.market.open_lease(_peer(provider), WORDS, budget=WORD_PRICE * 10_000, duration_s=60)
        lease_id = view.lease_id
        held = consumer.market.held[lease_id]
        served = provider.market.served[lease_id]
        for _ in range(3):
            await _reset_after(consumer.market, lease_id, 5)
        await wait_for(lambda: served.session.units_reserved == 0 and served.in_flight == 0, 5, what="cut calls")
        assert (held.seen_units, held.aborted_calls) == (15, 3)
        billed = served.session.units_metered  # the words written: the 15 read and any in flight
        assert 15 <= billed <= 15 + 3 * left_calls.ABORTED_CALL_TOLERANCE_UNITS
        # Past the time an honest provider needs to meter them, a finished call and its receipt.
        await trio.sleep(1.2)
        result = await consumer.market.call(lease_id, {"prompt": "one two three"})
        assert result.units == 3
        assert await provider.market._push_receipt(lease_id)
        honest = await provider.ledger.countersigned_amount(lease_id)
        assert honest == (billed + 3) * WORD_PRICE
        # The cheat: the three calls' unused allowances, written into its own ledger as one more call.
        unused = 3 * (left_calls.ABORTED_CALL_TOLERANCE_UNITS + prompt_units_estimate({"prompt": LONG_PROMPT}))
        bank = unused - (billed - 15)
        served.session.meter(bank, provider.market.clock())
        await provider.ledger.reserve_call(lease_id, "banked", reserved_units=bank)
        await provider.ledger.settle_call(lease_id, "banked", units=bank)
        countersigned = await provider.market._push_receipt(lease_id)
        print(f"3 left calls billed {billed} units; then {bank} more claimed: countersigned {countersigned}")
        assert not countersigned
        assert await provider.ledger.countersigned_amount(lease_id) == honest
        # All the three calls keep: what was billed beyond the words read, and the finished call's 3 units
        # (counted just before the receipt that billed past them: perhaps not in it, the provider's doubt).
        assert held.left.open == () and held.left.tolerance <= billed - 15 + 3


PROMPT = [10 + i % 300 for i in range(300)]  # token ids: the prompt is these 300 tokens exactly
# A JSON Schema the request checks take, whose pattern makes a grammar llama.cpp's parser refuses: the
# engine builds a choice's grammar for its first token, after the prompt was decoded.
UNPARSABLE = {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "^[^\\s\\S]$"}}}


async def test_a_request_the_engine_refuses_after_its_prompt_pays_that_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grammar llama.cpp cannot parse is refused before any of the prompt is decoded, so nothing is
    billed. A request error no check foresees, met only once the prompt is decoded (here: the same
    grammar with that check switched off), fails with no chunk; before, its error frame billed the
    chunks before it, none, so a stranger could have prompts of any length decoded for free, call after
    call. Now the error frame bills the prompt the engine decoded, the consumer counts it (within the
    prompt's estimate) and countersigns it."""
    model = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    spec = ModelSpec(name="tiny", path=str(model), price_per_unit=1000, n_threads=1, n_ctx=512)  # type: ignore[call-arg]
    async with market_nodes([{"models": (spec,), "market": FAST}, {}]) as (nodes, _):
        provider, consumer = nodes
        view = await consumer.market.open_lease(_peer(provider), "model:tiny", budget=10**9, duration_s=60)
        held = consumer.market.held[view.lease_id]
        served = provider.market.served[view.lease_id]
        body = {"prompt": PROMPT, "max_tokens": 8, "response_format": UNPARSABLE}

        async def refused() -> None:
            with pytest.raises(ClawnodeError) as caught:
                await consumer.market.call(view.lease_id, body)
            assert caught.value.code == ErrorCode.INVALID_ARGUMENT and "grammar" in caught.value.message

        await refused()
        await wait_for(lambda: served.session.units_reserved == 0 and served.in_flight == 0, 5, what="the call")
        assert served.session.units_metered == held.seen_units == 0  # refused before its prompt was decoded

        monkeypatch.setattr(LlamaModel, "check_grammar", lambda self, grammar, param: None)
        for _ in range(2):
            await refused()
        await wait_for(lambda: served.session.units_reserved == 0 and served.in_flight == 0, 5, what="the calls")
        print(f"2 calls refused after their prompt: metered {served.session.units_metered}, counted {held.seen_units}")
        assert served.session.units_metered == held.seen_units == 2 * len(PROMPT)
        assert held.aborted_calls == 0  # both ended with the provider's error frame
        assert await provider.market._push_receipt(view.lease_id)
        assert await provider.ledger.countersigned_amount(view.lease_id) == 2 * len(PROMPT) * 1000
