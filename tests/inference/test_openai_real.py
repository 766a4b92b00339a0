"""The official ``openai`` client against real llama.cpp models: local, bought through a second node,
and checked by consensus against a provider serving a different model under the same name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from dht.discovery import DiscoveryQuery
from node.daemon import Node
from node.datadir import read_api_token
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.market import market_nodes

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

QUESTION: list[Any] = [{"role": "user", "content": "tell me about the sea"}]


def _client(node: Node) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.api_url}/v1", api_key=read_api_token(node.data_dir), max_retries=0)


def _spec(path: Path, name: str = "tiny", price: int = 1000) -> ModelSpec:
    return ModelSpec(name=name, path=str(path), price_per_unit=price, n_threads=1)  # type: ignore[call-arg]


def _stream(node: Node, **request: Any) -> tuple[str, Any, dict[str, Any]]:
    chunks = list(_client(node).chat.completions.create(stream=True, stream_options={"include_usage": True}, **request))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    return text, chunks[-1].usage, dict(final.model_extra or {})


async def _discoverable(consumer: Node, capability: str, count: int) -> None:
    with trio.fail_after(60):
        while len(await consumer.discover(DiscoveryQuery(capability=capability))) < count:
            await trio.sleep(0.2)


async def test_streams_from_a_local_model_and_from_a_remote_one_with_exact_usage(tmp_path: Path) -> None:
    model = await trio.to_thread.run_sync(write_tiny_llama_gguf, tmp_path / "tiny.gguf")
    async with market_nodes([{"models": (_spec(model),)}, {}]) as (nodes, _):
        provider, consumer = nodes
        await _discoverable(consumer, "model:tiny", 1)
        request = {"model": "tiny", "messages": QUESTION, "max_tokens": 24, "temperature": 0}

        local_text, local_usage, local_extra = await trio.to_thread.run_sync(lambda: _stream(provider, **request))
        assert local_extra["clawnode"]["served_by"] == ["local"]
        # The tiny model never stops early and one token is one character: the count is checkable.
        assert local_usage.completion_tokens == 24 == len(local_text)
        engine = provider.model_host.get("tiny")
        assert engine is not None
        prompt = await engine.format_chat(QUESTION)
        assert local_usage.prompt_tokens == len(await engine.tokenize(prompt, add_bos=False, special=True))

        remote_text, remote_usage, remote_extra = await trio.to_thread.run_sync(lambda: _stream(consumer, **request))
        assert remote_text == local_text  # same model, temperature 0
        assert (remote_usage.prompt_tokens, remote_usage.completion_tokens) == (
            local_usage.prompt_tokens,
            local_usage.completion_tokens,
        )
        assert remote_extra["clawnode"]["served_by"] == [str(provider.host.get_id())]
        [lease] = await provider.ledger.list_leases()
        assert lease.metered_units == remote_usage.total_tokens

        plain = await trio.to_thread.run_sync(
            lambda: _client(consumer).completions.create(model="tiny", prompt="the sea", max_tokens=8, temperature=0)
        )
        assert plain.usage is not None and plain.usage.completion_tokens == 8 == len(plain.choices[0].text)

        with pytest.raises(openai.BadRequestError) as caught:
            await trio.to_thread.run_sync(
                lambda: _client(provider).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=30_000)
            )
        assert caught.value.code == "E_INVALID_ARGUMENT"


async def test_consensus_finds_the_provider_that_serves_another_model(tmp_path: Path) -> None:
    honest = await trio.to_thread.run_sync(write_tiny_llama_gguf, tmp_path / "honest.gguf", 0)
    liar = await trio.to_thread.run_sync(write_tiny_llama_gguf, tmp_path / "liar.gguf", 1)
    specs: list[dict[str, Any]] = [
        {"models": (_spec(honest),)},
        {"models": (_spec(honest),)},
        {"models": (_spec(liar),)},
        {"models": (_spec(honest, name="embedder"),)},  # the consumer embeds answers with its own model
    ]
    async with market_nodes(specs) as (nodes, _):
        *providers, consumer = nodes
        await _discoverable(consumer, "model:tiny", 3)
        # Identical answers embed identically; demand near-identity so only they agree.
        consumer.router.settings = consumer.router.settings.model_copy(update={"consensus_similarity": 0.999})
        reply = await trio.to_thread.run_sync(
            lambda: _client(consumer).chat.completions.create(
                model="tiny", messages=QUESTION, max_tokens=32, extra_body={"clawnode": {"replicas": 3}}
            )
        )
        assert reply.model_extra is not None
        consensus = reply.model_extra["clawnode"]["consensus"]
        assert consensus["agreement"] == "2/3" and consensus["reached"] is True
        assert str(providers[2].host.get_id()) not in consensus["majority"]
        engine = providers[0].model_host.get("tiny")
        assert engine is not None
        honest_answer = await engine.chat(QUESTION, max_tokens=32, temperature=0)
        assert reply.choices[0].message.content == honest_answer.text
