"""The OpenAI-compatible API and the router, driven by the official ``openai`` client.

Nodes, leases, escrow and streams are real; the sold capability is the word-echo stand-in of
``tests/support/market.py`` (the llama.cpp engine has tests of its own), which lets a test make a
provider stall, drop the connection or lie at a chosen word.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
import trio

from dht.discovery import DiscoveryQuery
from node.daemon import Node
from node.datadir import read_api_token
from node.router import RouteResult
from runtime.errors import ClawnodeError, ErrorCode
from runtime.service import Emit, Usage
from tests.support.market import WORD_OFFER, WORDS, WordService, market_nodes

PROMPT = "one two three four five six seven eight nine ten"

# Every log line these tests produce is checked for local paths.
pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")


def _client(node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.api_url}/v1", api_key=read_api_token(node.data_dir), max_retries=0)


class StallingService(WordService):
    """Sends ``after`` words, then falls silent (or drops the consumer's connection)."""

    def __init__(self, after: int, node: Node | None = None) -> None:
        self.after = after
        self.node = node

    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        words = str(body["messages"][-1]["content"]).split()
        for word in words[: self.after]:
            await emit({"text": word + " "})
        if self.node is not None:
            for peer in self.node.host.get_connected_peers():
                await self.node.host.disconnect(peer)
        await trio.sleep_forever()
        raise AssertionError("unreachable")


class SpacedWords(WordService):
    """Word echo with spaces kept, continuing after ``continue_from`` like a model would."""

    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        words = str(body["messages"][-1]["content"]).split()
        done = len(str(body.get("continue_from", "")).split())
        for word in words[done:]:
            await emit({"text": word + " "})
        return Usage(
            units=len(words) - done, detail={"prompt_tokens": len(words), "completion_tokens": len(words) - done}
        )


class LyingService(WordService):
    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        await emit({"text": "bananas are the only true answer to every question ever asked"})
        return Usage(units=11, detail={"prompt_tokens": 10, "completion_tokens": 11})


async def _wait_discoverable(consumer: Node, count: int) -> None:
    with trio.fail_after(60):
        while len(await consumer.discover(DiscoveryQuery(capability=WORDS))) < count:
            await trio.sleep(0.2)


async def test_openai_client_streams_from_a_remote_provider_with_usage() -> None:
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}]) as (nodes, _):
        provider, consumer = nodes
        provider.services.register(WORDS, SpacedWords())
        await _wait_discoverable(consumer, 1)

        def stream() -> tuple[str, Any, Any]:
            chunks = list(
                _client(consumer).chat.completions.create(
                    model="words",
                    messages=[{"role": "user", "content": PROMPT}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
            return text, chunks[-1].usage, finals[0].model_extra

        text, usage, extra = await trio.to_thread.run_sync(stream)
        assert text.split() == PROMPT.split()
        assert usage.completion_tokens == 10 and usage.prompt_tokens == 10 and usage.total_tokens == 20
        assert extra["clawnode"]["served_by"] == [str(provider.host.get_id())]
        # The provider metered exactly what it streamed, on the lease the router opened.
        [lease] = await provider.ledger.list_leases()
        assert lease.metered_units == 10

        def plain() -> Any:
            return _client(consumer).chat.completions.create(
                model="words", messages=[{"role": "user", "content": "a b c"}], max_tokens=50
            )

        reply = await trio.to_thread.run_sync(plain)
        assert reply.choices[0].message.content.split() == ["a", "b", "c"]
        assert reply.usage.completion_tokens == 3
        assert len(await provider.ledger.list_leases()) == 1  # the router reused its lease


@pytest.mark.parametrize("failure", ["stall", "disconnect"])
async def test_a_failing_provider_mid_stream_is_replaced_without_the_client_noticing(failure: str) -> None:
    async with market_nodes([{"offers": (WORD_OFFER,)}, {"offers": (WORD_OFFER,)}, {}]) as (nodes, _):
        first, second, consumer = nodes
        consumer.router.settings = consumer.router.settings.model_copy(update={"stall_timeout_s": 1.0})
        await _wait_discoverable(consumer, 2)
        # Whichever the router ranks first fails after 4 words; the other continues.
        ranked = consumer.router.rank(await consumer.discover(DiscoveryQuery(capability=WORDS)))
        failing = first if ranked[0].peer_id == str(first.host.get_id()) else second
        healthy = second if failing is first else first
        failing.services.register(WORDS, StallingService(4, failing if failure == "disconnect" else None))
        healthy.services.register(WORDS, SpacedWords())

        def stream() -> tuple[str, Any]:
            chunks = list(
                _client(consumer).chat.completions.create(
                    model="words",
                    messages=[{"role": "user", "content": PROMPT}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
            return text, finals[0].model_extra

        text, extra = await trio.to_thread.run_sync(stream)
        assert text.split() == PROMPT.split()
        assert extra["clawnode"]["served_by"] == [str(failing.host.get_id()), str(healthy.host.get_id())]
        assert extra["clawnode"]["failovers"] == 1
        # Each provider's ledger covers only what it delivered: the failed call is metered for the four
        # words it streamed before it stalled or dropped (no prompt), the healthy one for its six.
        with trio.fail_after(10):
            while [lease.metered_units for lease in await failing.ledger.list_leases()] != [4]:
                await trio.sleep(0.1)
        [lease] = await healthy.ledger.list_leases()
        assert lease.metered_units == 6


async def test_the_upstream_answers_when_no_provider_exists() -> None:
    async with market_nodes([{}, {}]) as (nodes, _):
        upstream, consumer = nodes
        upstream.services.register(WORDS, SpacedWords())  # served locally, not offered on the network
        token = await trio.to_thread.run_sync(read_api_token, upstream.data_dir)
        consumer.router.settings = consumer.router.settings.model_copy(
            update={"upstream_url": f"{upstream.api_url}/v1", "upstream_api_key": token}
        )

        def plain() -> Any:
            return _client(consumer).chat.completions.create(
                model="words", messages=[{"role": "user", "content": "via the upstream"}]
            )

        reply = await trio.to_thread.run_sync(plain)
        assert reply.choices[0].message.content.split() == ["via", "the", "upstream"]
        assert reply.model_extra["clawnode"]["served_by"] == ["upstream"]
        assert reply.usage.completion_tokens == 3


async def test_consensus_outvotes_a_lying_provider() -> None:
    specs: list[dict[str, Any]] = [{"offers": (WORD_OFFER,)} for _ in range(3)] + [{}]
    async with market_nodes(specs) as (nodes, _):
        *providers, consumer = nodes
        for provider in providers[:2]:
            provider.services.register(WORDS, SpacedWords())
        providers[2].services.register(WORDS, LyingService())
        await _wait_discoverable(consumer, 3)

        def ask() -> Any:
            return _client(consumer).chat.completions.create(
                model="words",
                messages=[{"role": "user", "content": PROMPT}],
                extra_body={"clawnode": {"replicas": 3}},
            )

        reply = await trio.to_thread.run_sync(ask)
        assert reply.choices[0].message.content.split() == PROMPT.split()
        consensus = reply.model_extra["clawnode"]["consensus"]
        assert consensus["agreement"] == "2/3" and consensus["reached"] is True
        assert str(providers[2].host.get_id()) not in consensus["majority"]


async def test_bad_requests_get_openai_errors_with_our_codes() -> None:
    async with market_nodes([{}]) as (nodes, _):
        [node] = nodes
        token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
        headers = {"authorization": f"Bearer {token}"}
        cases: list[tuple[Any, int, ErrorCode]] = [
            (
                {"model": "nobody-serves-this", "messages": [{"role": "user", "content": "hi"}]},
                404,
                ErrorCode.NOT_FOUND,
            ),
            (
                {"model": "words", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9},
                400,
                ErrorCode.INVALID_ARGUMENT,
            ),
            ({"model": "words", "messages": "not a list"}, 400, ErrorCode.INVALID_ARGUMENT),
            ({"model": "words", "messages": [{"role": "user", "content": 5}]}, 400, ErrorCode.INVALID_ARGUMENT),
            ({"model": "words", "messages": [{"role": "wizard", "content": "hi"}]}, 400, ErrorCode.INVALID_ARGUMENT),
            ({"messages": [{"role": "user", "content": "hi"}]}, 400, ErrorCode.INVALID_ARGUMENT),
            ("{not json", 400, ErrorCode.INVALID_ARGUMENT),
        ]
        async with httpx.AsyncClient() as client:
            for body, status, code in cases:
                if isinstance(body, str):
                    reply = await client.post(
                        f"{node.api_url}/v1/chat/completions",
                        content=body,
                        headers={**headers, "content-type": "application/json"},
                    )
                else:
                    reply = await client.post(f"{node.api_url}/v1/chat/completions", json=body, headers=headers)
                assert reply.status_code == status, (body, reply.text)
                error = reply.json()["error"]
                assert error["code"] == code and error["message"] and error["type"]
            reply = await client.get(f"{node.api_url}/v1/models", headers=headers)
            assert reply.json()["object"] == "list"

        def unknown_model() -> None:
            _client(node).chat.completions.create(
                model="nobody-serves-this", messages=[{"role": "user", "content": "x"}]
            )

        with pytest.raises(openai.NotFoundError) as caught:
            await trio.to_thread.run_sync(unknown_model)
        assert caught.value.code == ErrorCode.NOT_FOUND
        # Still serving.
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{node.api_url}/api/status", headers=headers)).status_code == 200


class RefusingService(WordService):
    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        raise ClawnodeError(ErrorCode.UNAVAILABLE, "overloaded")


async def test_three_failures_take_a_provider_out_until_a_health_check_passes() -> None:
    async with market_nodes([{"offers": (WORD_OFFER,)}, {"offers": (WORD_OFFER,)}, {}]) as (nodes, _):
        first, second, consumer = nodes
        await _wait_discoverable(consumer, 2)
        ranked = consumer.router.rank(await consumer.discover(DiscoveryQuery(capability=WORDS)))
        flaky = first if ranked[0].peer_id == str(first.host.get_id()) else second
        steady = second if flaky is first else first
        flaky.services.register(WORDS, RefusingService())
        steady.services.register(WORDS, SpacedWords())
        flaky_id = str(flaky.host.get_id())

        async def ask() -> RouteResult:
            async def ignore(text: str) -> None:
                return None

            body = {"messages": [{"role": "user", "content": "a b"}]}
            return await consumer.router.chat("words", body, ignore)

        for _ in range(3):
            assert (await ask()).failovers == 1  # the flaky one is still tried first
        assert not consumer.router.usable(flaky_id)
        result = await ask()
        assert result.failovers == 0 and result.served_by == [str(steady.host.get_id())]
        # Health checks (a capability-record round trip) bring it back once it answers again.
        consumer.router.settings = consumer.router.settings.model_copy(update={"health_interval_s": 0.2})
        flaky.services.register(WORDS, SpacedWords())
        with trio.fail_after(10):
            while not consumer.router.usable(flaky_id):
                await trio.sleep(0.1)
        assert consumer.router.health[flaky_id].ewma_latency_s is not None
