"""Verified inference (issues 21 and 19): an honest call whose ENGINE fails in the middle of a commitment
block, asked without logprobs, still ends with an error frame carrying a proof the consumer's check passes.
The engine hands the committed top k a block of up to 256 tokens at a time, after their text; a failure
mid-block used to lose the block in progress, so the provider's recorded positions covered fewer tokens
than it had streamed, it sent no proof, and the drawn call failed ``no_proof`` although it was honest.
With real nodes, a real lease and the tiny model; the failure is llama.cpp's own decode returning an error
on the provider (the batched engine and the one-sequence engine each see it their own way).

Also: the prompt ids a v2 proof body binds, rendered while the engine serves the call (so the end frame no
longer waits for them), are the ones rendering them at the end gives, whatever the engine's prompt count."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llama_cpp

from protocols.lease.serving import _PromptIds
from protocols.lease.verifying import prompt_ids
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.engine import LlamaModel
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import check
from tests.support.market import market_nodes

STREAMED = 5  # the provider's decode fails after this many tokens of the reply left: mid-block (of 256)
CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 24, "temperature": 0}


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer's checks load the file for their prefill into a per-process cache: this module's go
    with its tests, not on to interpreter exit (where llama-cpp-python's ``__del__`` complains)."""
    monkeypatch.setattr(check, "_prefills", {})


def _failing_decode(monkeypatch: pytest.MonkeyPatch, ctx: Any) -> list[int]:
    """llama.cpp's decode of context ``ctx`` (the provider's) fails once armed (``armed[0]`` decodes
    more are allowed: the prompt's and the first tokens'); every other context decodes as usual. Both
    names are patched: the batched engine calls the package's, llama-cpp-python's ``eval`` its module's."""
    real = llama_cpp.llama_decode
    armed = [-1]

    def decode(context: Any, batch: Any) -> int:
        if context is ctx and armed[0] >= 0:
            if armed[0] == 0:
                return -1
            armed[0] -= 1
        return int(real(context, batch))

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_decode", decode)
    return armed


@pytest.mark.parametrize("parallel", [1, 2], ids=["one-sequence", "batched"])
async def test_an_engine_failure_mid_block_without_logprobs_still_sends_a_proof_that_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parallel: int
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    spec = ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256, parallel=parallel)  # type: ignore[call-arg]
    async with market_nodes([{"models": (spec,)}, {"models": (spec,)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        consumer.market.verifying.sample_rate = 1.0  # verify.sample_rate: every call is checked
        model: Any = getattr(provider.market.services.get("model:tiny"), "model", None)
        assert (model._batcher is not None) == (parallel > 1)
        armed = _failing_decode(monkeypatch, model._llama._ctx.ctx)
        lease = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
        chunks: list[dict[str, Any]] = []

        async def collect(data: dict[str, Any]) -> None:
            chunks.append(data)

        armed[0] = STREAMED  # the prompt's and the first STREAMED - 1 tokens' decodes: the last token's fails
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.stream_call(lease.lease_id, CHAT, collect)
        # The caller gets the engine's own error, not a verification failure: the proof passed the check.
        assert caught.value.code == ErrorCode.INTERNAL and "llama_decode returned -1" in caught.value.message
        assert sum(int(chunk.get("tokens", 0)) for chunk in chunks) == STREAMED  # streamed, then failed
        assert "".join(chunk.get("text", "") for chunk in chunks)
        record = consumer.market.verifying.book.get(provider_id)
        assert record is not None and (record.passed, record.failed) == (1, 0)
        assert consumer.market.held[lease.lease_id].seen_units > 0  # the text streamed before the error is paid
        armed[0] = -1
        assert (await consumer.market.call(lease.lease_id, CHAT)).units > 0  # the lease stays usable
        assert consumer.market.verifying.standing(provider_id) > 0.5


@pytest.mark.parametrize("chat_format", [None, "llama-2"], ids=["own-bos-template", "named-template"])
async def test_the_prompt_ids_rendered_during_the_call_are_those_rendered_at_its_end(
    tmp_path: Path, chat_format: str | None
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    model = LlamaModel(path, name="tiny", n_ctx=256, n_threads=1, parallel=1, chat_format=chat_format)
    await model.load()
    try:
        bodies: list[dict[str, Any]] = [CHAT, {"prompt": "Once upon a time"}, {"prompt": [1, 5, 9]}]
        for body in bodies:
            ids = await prompt_ids(model, body, 0)
            assert ids
            for claimed in (len(ids) - 1, len(ids), len(ids) + 1, 0):  # with and without an added BOS token
                early = _PromptIds(model, body)
                await early.render()
                assert (early._with_bos is not None) == ("prompt" not in body or isinstance(body["prompt"], str))
                assert await early.ids(claimed) == await prompt_ids(model, body, claimed)
        # A model without a free slot (a one-slot model's is the call's own): nothing rendered early, and
        # the end renders the same ids.
        held = await model.admission.acquire()
        early = _PromptIds(model, CHAT)
        await early.render()
        model.admission.release(held)
        assert early._with_bos is None
        assert await early.ids(5) == await prompt_ids(model, CHAT, 5)
    finally:
        await model.aclose()
