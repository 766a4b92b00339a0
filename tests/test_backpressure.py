"""Honest backpressure on a real llama.cpp model (the tiny one) bought over the network: a burst
bigger than the provider's queue gets only whole answers and clean 429s with ``Retry-After``, in
each API's own error shape and never as a 200 followed by an error event; a router given time waits
out the hint and is served."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from dht.discovery import DiscoveryQuery, ProviderResult
from node.daemon import Node
from node.datadir import read_api_token
from node.router import ProviderHealth, capacity_of
from runtime.inference.engine import LlamaModel
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.market import market_nodes

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

MODEL = "Tiny/Random-1:q8"
QUEUE = 2
BURST = 12
ASK = [{"role": "user", "content": "hello there"}]


async def _post(node: Node, token: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], str]:
    headers = {"authorization": f"Bearer {token}", "x-api-key": token, "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(timeout=60) as client:
        reply = await client.post(f"{node.api_url}{path}", json=body, headers=headers)
        return reply.status_code, dict(reply.headers), reply.text


def _check_429(status: int, headers: dict[str, str], text: str) -> dict[str, Any]:
    assert status == 429, text[:300]
    assert int(headers["retry-after"]) >= 1
    return json.loads(text)  # type: ignore[no-any-return]


def _check_streamed_answer(status: int, text: str) -> None:
    assert status == 200, text[:300]
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and not any('"error"' in event for event in events)
    finals = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1] if json.loads(e)["choices"]]
    assert finals[-1] == "length"


def _check_ranking(consumer: Node, found: ProviderResult) -> None:
    """The record states the model's capacity; the router ranks by load against it and puts a
    provider that just said it is busy last until its hint has passed."""
    descriptor = found.record.capability(f"model:{MODEL}")
    assert descriptor is not None and descriptor.model is not None
    assert (descriptor.model.parallel, descriptor.model.max_queue) == (1, QUEUE)
    roomy_facts = descriptor.model.model_copy(update={"max_queue": 30})
    roomy_record = found.record.model_copy(
        update={"capabilities": [descriptor.model_copy(update={"model": roomy_facts})]}
    )
    small, roomy = (
        found.model_copy(update={"peer_id": "small"}),
        found.model_copy(update={"peer_id": "roomy", "record": roomy_record}),
    )
    router = consumer.router
    assert capacity_of(small) == 1 + QUEUE and capacity_of(roomy) == 31
    router.health["small"], router.health["roomy"] = ProviderHealth(in_flight=1), ProviderHealth(in_flight=2)
    assert [p.peer_id for p in router.rank([small, roomy])] == ["roomy", "small"]  # 2/31 of it vs 1/3
    router.health["small"].in_flight = 0
    assert [p.peer_id for p in router.rank([small, roomy])] == ["small", "roomy"]
    router.health["small"].busy_until = router.clock() + 5
    assert [p.peer_id for p in router.rank([small, roomy])] == ["roomy", "small"]
    del router.health["small"], router.health["roomy"]


async def test_a_burst_past_the_queue_gets_answers_and_clean_429s_then_a_waiting_router_is_served(
    tmp_path: Path,
) -> None:
    path = await trio.to_thread.run_sync(write_tiny_llama_gguf, tmp_path / "tiny.gguf")
    spec = ModelSpec(name=MODEL, path=str(path), n_threads=1, max_queue=QUEUE, parallel=1)  # type: ignore[call-arg]
    async with market_nodes([{"models": (spec,)}, {}]) as (nodes, _):
        provider, consumer = nodes
        model = provider.model_host.get(MODEL)
        assert isinstance(model, LlamaModel)
        token = await trio.to_thread.run_sync(read_api_token, consumer.data_dir)
        with trio.fail_after(60):
            while not await consumer.discover(DiscoveryQuery(capability=f"model:{MODEL}")):
                await trio.sleep(0.2)
        [found] = await consumer.discover(DiscoveryQuery(capability=f"model:{MODEL}"))
        _check_ranking(consumer, found)
        consumer.router.settings = consumer.router.settings.model_copy(update={"busy_wait_s": 0.0})
        chat = {"model": MODEL, "messages": ASK, "max_tokens": 24, "temperature": 0, "stream": True}
        # The lease is opened (and the route warmed) by one request first.
        status, _, text = await _post(consumer, token, "/v1/chat/completions", chat)
        _check_streamed_answer(status, text)

        replies: list[tuple[int, dict[str, str], str]] = []
        holder = model.stream_complete("busy", max_tokens=4)
        async with holder:  # the provider's one slot is taken until this block ends
            async with trio.open_nursery() as nursery:

                async def one() -> None:
                    replies.append(await _post(consumer, token, "/v1/chat/completions", chat))

                for _ in range(BURST):
                    nursery.start_soon(one)
                with trio.fail_after(30):
                    while model.queued < QUEUE or len(replies) < BURST - QUEUE:
                        await trio.sleep(0.01)
                # The queue is full: each API answers 429 in its own shape, streamed or not.
                body = _check_429(*await _post(consumer, token, "/v1/chat/completions", {**chat, "stream": False}))
                assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "E_RATE_LIMITED"
                assert body["error"]["reason"] == "busy"
                message = {"model": MODEL, "messages": ASK, "max_tokens": 8, "stream": True}
                body = _check_429(*await _post(consumer, token, "/v1/messages", message))
                assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
                response = {"model": MODEL, "input": "hello", "max_output_tokens": 8, "stream": True}
                body = _check_429(*await _post(consumer, token, "/v1/responses", response))
                assert body["error"]["code"] == "E_RATE_LIMITED"
                await holder.collect()
                await holder.aclose()  # the slot is free: the queued requests are served
        refused = [reply for reply in replies if reply[0] == 429]
        answered = [reply for reply in replies if reply[0] != 429]
        assert len(refused) == BURST - QUEUE and len(answered) == QUEUE
        for status, headers, text in refused:
            assert _check_429(status, headers, text)["error"]["type"] == "rate_limit_error"
        for status, _, text in answered:
            _check_streamed_answer(status, text)

        # Given time, the router waits out the provider's hint and is served instead of refused.
        consumer.router.settings = consumer.router.settings.model_copy(update={"busy_wait_s": 10.0})
        holder = model.stream_complete("busy", max_tokens=4)
        refused_before = model.admission.refused
        async with trio.open_nursery() as nursery:
            async with holder:
                waited: list[tuple[int, dict[str, str], str]] = []

                async def patient() -> None:
                    waited.append(await _post(consumer, token, "/v1/chat/completions", chat))

                for _ in range(QUEUE + 1):
                    nursery.start_soon(patient)
                with trio.fail_after(30):
                    while model.admission.refused <= refused_before:  # one of them was told to wait
                        await trio.sleep(0.01)
                await holder.collect()
        assert [status for status, _, _ in waited] == [200] * (QUEUE + 1)
        for status, _, text in waited:
            _check_streamed_answer(status, text)
