"""A call cut while its provider's engine is busy with its input pays that input, and the model stays
taken until the engine is done with it, whatever the cut call's handler does meanwhile: on real nodes
over loopback with the tiny llama.cpp model.

Each test failed on the code before the fix (its docstring says how). The engine's work is made long
by a hook, a ``threading.Event`` the engine's thread waits on inside the job (a long prompt decoded
in one go, as a 16k-token prefill is), and the wait for a cut job (``SHUTDOWN_WAIT_S``, 10 s) is made
short by monkeypatching it to 0.3 s.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import llama_cpp
import pytest
import trio

from node.config import MarketSection
from node.daemon import Node
from runtime.inference import engine
from runtime.inference.engine import LlamaModel
from runtime.inference.models import ModelSpec
from runtime.inference.service import ChatService, EmbeddingService
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.market import market_nodes, wait_for

FAST = MarketSection(  # type: ignore[call-arg]
    receipt_every_units=5, receipt_every_s=1, countersign_timeout_s=2, abandon_after_s=30, claim_every_s=1
)
PROMPT = [10 + i % 300 for i in range(300)]  # token ids: the prompt is these 300 tokens exactly
EMBED_INPUT = [[10 + i for i in range(100)] for _ in range(3)]  # three inputs of 100 tokens each


class Gate:
    """The hook: the engine's thread, inside the job, says it got there and waits for ``opened``."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()

    def hold(self) -> None:
        self.reached.set()
        self.opened.wait(20)

    async def wait_reached(self) -> None:
        with trio.fail_after(10):
            while not self.reached.is_set():
                await trio.sleep(0.01)


@pytest.fixture
def gate() -> Iterator[Gate]:
    held = Gate()
    try:
        yield held
    finally:
        held.opened.set()  # the engine's thread is never left waiting


def _peer(node: Node) -> str:
    return str(node.host.get_id())


async def _call_and_leave(market: Any, lease_id: str, body: dict[str, Any], gate: Gate) -> list[dict[str, Any]]:
    """Call, and leave the call (its cancel frame) once the provider's engine is inside the hook."""
    chunks: list[dict[str, Any]] = []

    async def collect(data: dict[str, Any]) -> None:
        chunks.append(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(market.stream_call, lease_id, body, collect))
        await gate.wait_reached()
        nursery.cancel_scope.cancel()
    return chunks


async def test_a_call_cut_during_a_prefill_that_outlasts_the_wait_pays_its_prompt_and_keeps_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gate: Gate
) -> None:
    """One request at a time (the path of a long context, a recurrent model, short memory): the prompt
    is decoded in one go, without a look at the cancel. Before: the cut call's handler stopped waiting
    for the job after ``SHUTDOWN_WAIT_S`` with no count from the engine, billed the call 0, and freed the
    model's admission while the engine still decoded it, so the same consumer's next call was admitted
    at once. Now it bills the prompt the engine began to decode, and the admission is held until the
    engine is done."""
    monkeypatch.setattr(engine, "SHUTDOWN_WAIT_S", 0.3)
    decode = LlamaModel._eval_prompt

    def slow_prefill(self: LlamaModel, llama: Any, tokens: list[int], owner: str) -> int:
        kept = decode(self, llama, tokens, owner)
        gate.hold()  # the decode goes on past the handler's wait
        return kept

    monkeypatch.setattr(LlamaModel, "_eval_prompt", slow_prefill)
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    spec = ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=512, parallel=1)  # type: ignore[call-arg]
    async with market_nodes([{"models": (spec,), "market": FAST}, {}]) as (nodes, _):
        provider, consumer = nodes
        chat = provider.services.get("model:tiny")
        assert isinstance(chat, ChatService)
        view = await consumer.market.open_lease(_peer(provider), "model:tiny", budget=10**9, duration_s=60)
        held = consumer.market.held[view.lease_id]
        served = provider.market.served[view.lease_id]
        body = {"prompt": PROMPT, "max_tokens": 32}
        assert await _call_and_leave(consumer.market, view.lease_id, body, gate) == []
        await wait_for(lambda: served.session.units_reserved == 0 and served.in_flight == 0, 5, what="the cut call")
        assert not gate.opened.is_set()  # the engine is still on the prompt
        # Billed the prompt the engine decoded, by the end frame the consumer accepted.
        assert served.session.units_metered == held.seen_units == len(PROMPT)
        # The model is still taken: a request now waits for the engine instead of being admitted.
        assert chat.model.admission.active == 1
        gate.opened.set()
        await wait_for(lambda: chat.model.admission.active == 0, 5, what="the admission")
        # The next call is served as usual.
        result: list[dict[str, Any]] = []

        async def collect(data: dict[str, Any]) -> None:
            result.append(data)

        gate.reached.clear()
        await consumer.market.stream_call(view.lease_id, {"prompt": PROMPT[:20], "max_tokens": 4}, collect)
        assert sum(chunk.get("tokens", 1) for chunk in result) == 4


async def test_a_cut_embeddings_call_pays_the_input_its_engine_took_and_keeps_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gate: Gate
) -> None:
    """Before: an embeddings call cut while its engine embedded the batch was billed 0 (the service
    told the lease nothing of a cut), the engine went on to embed every input for nobody, and the
    model's admission was freed at once. Now it bills the inputs the engine had taken (embedded, or
    being embedded), the engine stops before the next input, and the admission is held until it has."""
    pooled = llama_cpp.llama_get_embeddings_seq
    fetched: list[int] = []

    def slow_embedding(ctx: Any, seq_id: int) -> Any:
        fetched.append(seq_id)
        gate.hold()  # the first input's embedding takes long
        return pooled(ctx, seq_id)

    monkeypatch.setattr(llama_cpp, "llama_get_embeddings_seq", slow_embedding)
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    spec = ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=512, embeddings=True)  # type: ignore[call-arg]
    async with market_nodes([{"models": (spec,), "market": FAST}, {}]) as (nodes, _):
        provider, consumer = nodes
        service = provider.services.get("embedding:tiny")
        assert isinstance(service, EmbeddingService)
        view = await consumer.market.open_lease(_peer(provider), "embedding:tiny", budget=10**9, duration_s=60)
        held = consumer.market.held[view.lease_id]
        served = provider.market.served[view.lease_id]
        assert await _call_and_leave(consumer.market, view.lease_id, {"input": EMBED_INPUT}, gate) == []
        await wait_for(lambda: served.session.units_reserved == 0 and served.in_flight == 0, 5, what="the cut call")
        # Billed the input being embedded (the first of three), by the end frame the consumer accepted.
        assert served.session.units_metered == held.seen_units == len(EMBED_INPUT[0])
        assert service.model.admission.active == 1  # the engine is still on it
        gate.opened.set()
        await wait_for(lambda: service.model.admission.active == 0, 5, what="the admission")
        assert fetched == [0]  # it stopped before the next input
