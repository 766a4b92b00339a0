"""A call served without a commitment by design never uses up its provider's forgiven unproved cut.

Pure rules (``protocols.machines.lease_consumer``) and the predicate the consumer feeds them
(``runtime.verify.provider.verifiable``): an honest provider whose tool call (never proved: tools,
grammars, ``n`` > 1, penalties carry no commitment) fails after its text must still have its one
forgiven cut left for a verifiable call it cannot prove (a broken connection). And the consumer's own
wiring, on real nodes with the tiny model: a stalled call with a penalty, then a verifiable call whose
connection is cut after its reply, is let go, not failed ``no_proof``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import trio
from hypothesis import given
from hypothesis import strategies as st

from protocols.machines.lease_consumer import CUT_ENDINGS, CallEnding, cut_forgiven, unproved_cut
from runtime.errors import ClawnodeError
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import check
from runtime.verify.provider import verifiable
from tests.support.market import market_nodes
from tests.test_verify_cancel_proof import _pausing_mid_reply, _spec
from tests.test_verify_stall import STALL_S, _pausing_after_text, _stream_ready

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
TOOLS = {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}


def test_a_tool_call_cut_after_its_text_leaves_the_forgiven_cut_to_the_next_verifiable_call() -> None:
    earlier = 0
    # The tool call's error frame after text, without a proof: not counted.
    if unproved_cut(CallEnding.ERROR, 5, False, committed=verifiable(TOOLS)):
        earlier += 1
    assert earlier == 0
    # A verifiable call then cut without a proof (a broken connection): still let go.
    assert unproved_cut(CallEnding.STOPPED, 5, False, committed=verifiable(CHAT))
    assert cut_forgiven(CallEnding.STOPPED, False, earlier)


@given(st.sampled_from(list(CallEnding)), st.integers(0, 50), st.booleans())
def test_an_uncommitted_call_is_never_an_unproved_cut(ending: CallEnding, tokens: int, proof: bool) -> None:
    assert not unproved_cut(ending, tokens, proof, committed=False)
    # A committed one is counted exactly as before.
    assert unproved_cut(ending, tokens, proof) == unproved_cut(ending, tokens, proof, committed=True)
    if ending in CUT_ENDINGS and not proof and tokens > 0:
        assert unproved_cut(ending, tokens, proof)


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "_prefills", {})


async def _ignore(data: dict[str, Any]) -> None:
    return None


async def test_a_stalled_unproved_call_by_design_leaves_the_next_cut_forgiven(tmp_path: Path) -> None:
    tiny = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    released = trio.Event()
    async with market_nodes([{"models": (_spec(tiny),)}, {"models": (_spec(tiny),)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        market = consumer.market
        service = provider.market.services.get("model:tiny")
        lease = await market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
        # A penalty: served without a commitment by design, so its stall is answered without a proof.
        await _stream_ready(consumer, provider)  # the stall times the pause, not a new stream's negotiation
        with _pausing_mid_reply(service, [2]), pytest.raises(ClawnodeError):
            await market.stream_call(
                lease.lease_id, {**CHAT, "max_tokens": 30, "presence_penalty": 0.5}, _ignore, stall_s=STALL_S
            )
        assert market.verifying._cuts.get(provider_id, 0) == 0  # not counted as an unproved cut
        chunks: list[dict[str, Any]] = []

        async def collect(data: dict[str, Any]) -> None:
            chunks.append(data)

        async def hang_up() -> None:  # honest: the link drops after the reply (a relay gone)
            while not chunks:
                await trio.sleep(0.01)
            await trio.sleep(0.05)
            await provider.host.disconnect(consumer.host.get_id())

        with trio.fail_after(5):
            while not market.verifying._advertised.get(lease.lease_id):
                await trio.sleep(0.01)
        await _stream_ready(consumer, provider)
        try:
            with _pausing_after_text(service, ["cut"], released, hang_up), pytest.raises(ClawnodeError) as cut:
                await market.stream_call(lease.lease_id, CHAT, collect, stall_s=STALL_S)
        finally:
            released.set()
        assert chunks  # the reply was handed on before the link dropped
        assert cut.value.reason != "verification_no_proof"  # let go: its one forgiven cut was still there
        record = market.verifying.book.get(provider_id)
        assert record is None or record.failed == 0
