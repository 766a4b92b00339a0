"""The chat model as a metered service: directly, and sold through the real lease market."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import trio

from dht.offers import Offer
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.engine import LlamaModel
from runtime.inference.models import ModelHost, ModelSpec
from runtime.inference.service import ChatService, EmbeddingService
from runtime.service import ServiceRegistry
from tests.support.market import market_nodes, wait_for

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

TOKEN_PRICE = 1_000_000
MESSAGES = [{"role": "user", "content": "Tell me a story."}]


class Collected:
    def __init__(self) -> None:
        self.chunks: list[dict[str, Any]] = []

    async def __call__(self, chunk: dict[str, Any]) -> None:
        self.chunks.append(chunk)


async def test_chat_service_meters_prompt_and_completion_tokens(tiny: LlamaModel) -> None:
    emit = Collected()
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": False}
    usage = await ChatService(tiny).run(body, emit)
    direct = await tiny.chat(MESSAGES, max_tokens=12, temperature=0)
    assert "".join(c["text"] for c in emit.chunks) == direct.text
    assert usage.detail == {"prompt_tokens": direct.usage.prompt_tokens, "completion_tokens": 12}
    assert usage.units == direct.usage.prompt_tokens + 12


async def test_a_consumer_that_goes_away_stops_the_generation(tiny: LlamaModel) -> None:
    sent = 0

    async def emit(chunk: dict[str, Any]) -> None:
        nonlocal sent
        sent += 1
        if sent == 3:
            raise trio.BrokenResourceError("the consumer hung up")

    with pytest.raises(trio.BrokenResourceError):
        await ChatService(tiny).run({"messages": MESSAGES, "max_tokens": 400, "temperature": 0}, emit)
    # The model is free at once, and serves the next request in full.
    with trio.fail_after(5):
        assert (await tiny.chat(MESSAGES, max_tokens=3)).usage.completion_tokens == 3


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": "hi"},
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"messages": MESSAGES, "max_tokens": -1},
        {"messages": MESSAGES, "max_tokens": "8"},
        {"messages": MESSAGES, "temperature": "hot"},
        {"messages": MESSAGES, "seed": 1.5},
        {"messages": MESSAGES, "stop": 3},
        {"messages": MESSAGES, "max_tokens": 100_000},  # more than the context holds
    ],
)
async def test_bad_bodies_are_invalid_arguments(tiny: LlamaModel, body: dict[str, Any]) -> None:
    with pytest.raises(ClawnodeError) as raised:
        await ChatService(tiny).run(body, Collected())
    assert raised.value.code == ErrorCode.INVALID_ARGUMENT


async def test_embedding_service_counts_input_tokens(tiny: LlamaModel) -> None:
    emit = Collected()
    usage = await EmbeddingService(tiny).run({"input": ["one", "two"]}, emit)
    assert len(emit.chunks) == 1 and len(emit.chunks[0]["embeddings"]) == 2
    expected = len(await tiny.tokenize("one", add_bos=True)) + len(await tiny.tokenize("two", add_bos=True))
    assert usage.units == expected
    with pytest.raises(ClawnodeError):
        await EmbeddingService(tiny).run({"input": 5}, Collected())


async def test_model_host_offers_and_registers(tiny_path: Path) -> None:
    spec = ModelSpec(name="tiny", path=str(tiny_path), n_ctx=256, n_threads=1, price_per_unit=7, embeddings=True)  # type: ignore[call-arg]
    shown = io.StringIO()
    host = ModelHost([spec], progress=shown)
    await host.start()
    try:
        # Not a terminal: a line per quarter of the bar, then the full bar with the outcome.
        lines = shown.getvalue().splitlines()
        assert lines[0].startswith("model 1/1 tiny [") and lines[0].endswith("0% locating")
        assert lines[-1].startswith("model 1/1 tiny [" + "#" * 24 + "] 100% ready in"), lines
        assert str(tiny_path.parent) not in shown.getvalue()
        offers = {offer.name: offer for offer in map(Offer.model_validate, host.offer_fields())}
        assert set(offers) == {"model:tiny", "embedding:tiny"}
        chat = offers["model:tiny"]
        assert (chat.unit, chat.price_per_unit, chat.context_length, chat.family) == ("token", 7, 256, "llama")
        assert chat.quantisation == "F32"
        descriptor = chat.descriptor()
        assert descriptor.model is not None and descriptor.model.context_length == 256
        services = ServiceRegistry()
        host.register(services)
        assert services.names() == ["embedding:tiny", "model:tiny"]
    finally:
        await host.aclose()
    with pytest.raises(ValueError):
        ModelSpec(name="both", path="x.gguf", package="y")  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        ModelSpec(name="Bad Name", path="x.gguf")  # type: ignore[call-arg]


async def test_a_leased_chat_is_metered_exactly(tiny_path: Path) -> None:
    """A node configured with [[models]] serves model:tiny; a consumer leases it and calls."""
    spec = ModelSpec(name="tiny", path=str(tiny_path), n_ctx=512, n_threads=1, price_per_unit=TOKEN_PRICE)  # type: ignore[call-arg]
    async with market_nodes([{"models": [spec]}, {}]) as (nodes, _):
        provider, consumer = nodes
        await wait_for(lambda: provider.publisher.record is not None)
        record = provider.publisher.record
        assert record is not None
        advertised = {c.name: c for c in record.capabilities}
        assert advertised["model:tiny"].pricing.price_per_unit == TOKEN_PRICE
        assert advertised["model:tiny"].model is not None
        assert advertised["model:tiny"].model.context_length == 512

        lease = await consumer.market.open_lease(
            str(provider.host.get_id()), "model:tiny", budget=10_000 * TOKEN_PRICE, duration_s=60
        )
        body = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0, "stream": True}
        result = await consumer.market.call(lease.lease_id, body)
        detail = result.usage
        assert detail["completion_tokens"] == 16
        assert result.units == detail["prompt_tokens"] + detail["completion_tokens"]

        model = provider.model_host.get("tiny")
        assert model is not None
        direct = await model.chat(MESSAGES, max_tokens=16, temperature=0)
        assert "".join(chunk["text"] for chunk in result.chunks) == direct.text
        assert detail["prompt_tokens"] == direct.usage.prompt_tokens

        provider_lease = await provider.ledger.get_lease(lease.lease_id)
        assert provider_lease.metered_units == result.units


async def test_a_registered_chat_service_starts_while_the_calls_ledger_row_is_written(tiny: LlamaModel) -> None:
    """A chat service registered for a capability serves it. The write-ahead meter's row is written
    while the engine prefills and picks its first token (it was written first, then the engine started:
    a disk's fsync added to every time to first token); the first chunk still leaves only once the row
    is durable."""
    order: list[str] = []
    first_chunk = trio.Event()

    class Watched(ChatService):
        async def run(self, body: dict[str, Any], emit: Any, **kwargs: Any) -> Any:
            async def watched(data: dict[str, Any]) -> None:
                if not first_chunk.is_set():
                    order.append("engine's first chunk")
                    first_chunk.set()
                await emit(data)

            return await super().run(body, watched, **kwargs)

    services = ServiceRegistry()
    services.register("model:tiny", Watched(tiny))
    offer = Offer(name="model:tiny", price_per_unit=TOKEN_PRICE)  # type: ignore[call-arg]
    async with market_nodes([{"offers": (offer,), "services": services}, {}]) as (nodes, _):
        provider, consumer = nodes
        lease = await consumer.market.open_lease(
            str(provider.host.get_id()), "model:tiny", budget=1_000 * TOKEN_PRICE, duration_s=60
        )
        reserve_call = provider.ledger.reserve_call

        async def slow_disk(*args: Any, **kwargs: Any) -> None:
            order.append("row started")
            with trio.fail_after(10):  # written first, the engine would never start: the test fails here
                await first_chunk.wait()
            await reserve_call(*args, **kwargs)
            order.append("row written")

        provider.ledger.reserve_call = slow_disk  # type: ignore[method-assign]

        async def arrived(_data: dict[str, Any]) -> None:
            if "chunk arrived" not in order:
                order.append("chunk arrived")

        end = await consumer.market.stream_call(
            lease.lease_id, {"messages": MESSAGES, "max_tokens": 5, "temperature": 0}, arrived
        )
        assert order == ["row started", "engine's first chunk", "row written", "chunk arrived"]
        assert end.usage["completion_tokens"] == 5
        assert (await provider.ledger.get_lease(lease.lease_id)).metered_units == end.units
        assert await provider.ledger.pending_calls() == []
