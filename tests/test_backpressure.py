"""Honest backpressure on a real llama.cpp model (the tiny one) bought over the network: a burst
bigger than the provider's queue gets only whole answers and clean 429s with ``Retry-After``, in
each API's own error shape and never as a 200 followed by an error event; a router given time waits
out the hint and is served."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from dht.capability import CAPABILITY_PROTOCOL, MAX_MESSAGE, GetRecord, RecordReply
from dht.discovery import DiscoveryQuery, ProviderResult
from node.daemon import Node
from node.datadir import read_api_token
from node.router import ProviderHealth, capacity_of
from runtime.inference.engine import LlamaModel
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.market import market_nodes
from wire.framing import FrameReader, write_frame
from wire.streams import open_stream

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


async def _stream(
    client: httpx.AsyncClient, node: Node, token: str, body: dict[str, Any], clock: list[float]
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A streamed chat: (status, headers, facts); facts: ``first`` and ``end`` (trio clock),
    ``usage``, ``finish``, ``text`` (or ``error`` from a refusal's body)."""
    headers = {"authorization": f"Bearer {token}"}
    facts: dict[str, Any] = {"text": ""}
    async with client.stream("POST", f"{node.api_url}/v1/chat/completions", json=body, headers=headers) as reply:
        if reply.status_code != 200:
            facts["error"] = json.loads(await reply.aread())
            return reply.status_code, dict(reply.headers), facts
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event.get("usage"):
                facts["usage"] = event["usage"]
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    facts.setdefault("first", trio.current_time())
                    facts["text"] += choice["delta"]["content"]
                if choice.get("finish_reason"):
                    facts["finish"] = choice["finish_reason"]
        facts["end"] = trio.current_time()
        clock.append(facts["end"])
        return reply.status_code, dict(reply.headers), facts


async def _live_load(consumer: Node, provider: Node) -> dict[str, int]:
    """The provider's live load of the model, as its capability protocol answers it."""
    stream = await open_stream(consumer.host, provider.host.get_id(), [CAPABILITY_PROTOCOL])
    try:
        await write_frame(stream, GetRecord().model_dump_json().encode())
        reply = RecordReply.model_validate_json(await FrameReader(stream, max_frame=MAX_MESSAGE).read_frame(5))
    finally:
        await stream.close()
    return reply.load[f"model:{MODEL}"]


async def test_sixteen_streams_run_at_once_with_exact_usage_and_a_burst_of_fifty_gets_answers_or_clean_429s(
    tmp_path: Path,
) -> None:
    """One provider decoding 16 sequences in one batch: 16 agents streaming at once through a
    consumer all get whole answers, interleaved (every first token before the last answer ends),
    each with the usage the engine counts for it alone; a burst of 50 gets answers and 429s only."""
    path = await trio.to_thread.run_sync(write_tiny_llama_gguf, tmp_path / "tiny.gguf")
    spec = ModelSpec(name=MODEL, path=str(path), n_threads=1, max_queue=8, parallel=16, n_ctx=512)  # type: ignore[call-arg]
    async with market_nodes([{"models": (spec,)}, {}]) as (nodes, _), contextlib.AsyncExitStack() as stack:
        provider, consumer = nodes
        model = provider.model_host.get(MODEL)
        assert isinstance(model, LlamaModel) and model.admission.slots == 16
        token = await trio.to_thread.run_sync(read_api_token, consumer.data_dir)
        with trio.fail_after(60):
            while not await consumer.discover(DiscoveryQuery(capability=f"model:{MODEL}")):
                await trio.sleep(0.2)
        consumer.router.settings = consumer.router.settings.model_copy(update={"busy_wait_s": 0.0})
        # One client for all (each new one builds an SSL context: tens of ms on the test's loop).
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)))

        def chat(i: int, max_tokens: int) -> dict[str, Any]:
            messages = [{"role": "user", "content": f"agent {i}: " + "tell me more " * (i % 5)}]
            return {
                "model": MODEL,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }

        status, _, _ = await _stream(client, consumer, token, chat(99, 4), [])  # opens the lease
        assert status == 200
        # What the engine counts for each prompt alone (max_tokens 0: nothing generated).
        expected = [(await model.chat(chat(i, 0)["messages"], max_tokens=0)).usage.prompt_tokens for i in range(16)]
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, model.admission.active)
                await trio.sleep(0.002)

        results: dict[int, tuple[int, dict[str, str], dict[str, Any]]] = {}
        ends: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as streams:
                for i in range(16):

                    async def one(i: int = i) -> None:
                        results[i] = await _stream(client, consumer, token, chat(i, 96), ends)

                    streams.start_soon(one)
            nursery.cancel_scope.cancel()
        assert sorted(results) == list(range(16))
        for i, (status, _, facts) in results.items():
            assert status == 200, facts
            usage = facts["usage"]
            assert usage["prompt_tokens"] == expected[i]
            assert usage["completion_tokens"] == 96 if facts["finish"] == "length" else 0 < usage["completion_tokens"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert max(facts["first"] for _, _, facts in results.values()) < max(ends)
        assert peak >= 4  # decoded together, not one after another (they reach the provider over ~0.5 s)
        # The provider's health answer says how busy it is: one sequence running, here.
        holder = model.stream_complete("busy", max_tokens=4)
        async with holder:
            load = await _live_load(consumer, provider)
            await holder.collect()
        assert load == {"running": 1, "parallel": 16, "queued": 0, "max_queue": 8}

        # A burst of 50 at once: whole answers and clean 429s with Retry-After, nothing else.
        burst: list[tuple[int, dict[str, str], dict[str, Any]]] = []
        async with trio.open_nursery() as nursery:
            for i in range(50):

                async def hit(i: int = i) -> None:
                    burst.append(await _stream(client, consumer, token, chat(i, 16), []))

                nursery.start_soon(hit)
        answered = [facts for status, _, facts in burst if status == 200]
        refused = [(headers, facts) for status, headers, facts in burst if status == 429]
        assert len(answered) + len(refused) == 50, [status for status, _, _ in burst]
        assert len(answered) >= 16 + 8  # every slot and every queue place was used
        for facts in answered:
            assert facts["finish"] in ("length", "stop") and facts["usage"]["completion_tokens"] > 0
        for headers, facts in refused:
            assert int(headers["retry-after"]) >= 1 and facts["error"]["error"]["code"] == "E_RATE_LIMITED"
