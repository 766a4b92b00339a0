"""Verified inference (issues 21 and 19): an honest call whose ENGINE fails in the middle of a commitment
block, asked without logprobs, still ends with an error frame carrying a proof the consumer's check passes.
The engine hands the committed top k a block of up to 256 tokens at a time, after their text; a failure
mid-block used to lose the block in progress, so the provider's recorded positions covered fewer tokens
than it had streamed, it sent no proof, and the drawn call failed ``no_proof`` although it was honest.
With real nodes, a real lease and the tiny model; the failure is llama.cpp's own decode returning an error
on the provider (the batched engine and the one-sequence engine each see it their own way)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llama_cpp

from runtime.errors import ClawnodeError, ErrorCode
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
