"""The OpenAI, Responses and Messages surfaces on a real llama.cpp model (the tiny random-weight one),
served locally and bought from a second node over the network, through the official clients.

A random model says nothing sensible: what holds here is what the engine's grammars and counts
guarantee, carried intact through the router and the API: a forced tool call's arguments validate
against the tool's schema, a json_schema reply validates, streamed tool-call deltas reassemble into
the same calls as the reply without streaming (temperature 0), logprobs spell the text, and ``n=3``
gives three choices whose tokens usage counts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import openai
import pytest
import trio

from dht.discovery import DiscoveryQuery
from node.daemon import Node
from node.datadir import read_api_token
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.inference.schemas import random_schema
from tests.support.market import market_nodes

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

MODEL = "Tiny/Random-1:q8"
PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": PARAMETERS},
}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


def _client(node: Node, token: str) -> Any:
    return openai.OpenAI(base_url=f"{node.api_url}/v1", api_key=token, max_retries=0)


def _calls(chunks: list[Any]) -> list[tuple[str, str]]:
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, ["", ""])
                call[0] += (delta.function.name or "") if delta.function else ""
                call[1] += (delta.function.arguments or "") if delta.function else ""
    return [(name, arguments) for name, arguments in (calls[i] for i in sorted(calls))]


def tool_calls(node: Node, token: str) -> dict[str, Any]:
    """A forced tool call through each API, streamed and not (run in a worker thread)."""
    client = _client(node, token)
    forced = {
        "model": MODEL,
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0,
        "max_tokens": 300,
    }
    out: dict[str, Any] = {
        "forced": client.chat.completions.create(**forced),
        "forced_stream": list(client.chat.completions.create(**forced, stream=True)),
        "response": client.responses.create(
            model=MODEL,
            input="What is the weather in Paris?",
            tools=[{"type": "function", **WEATHER["function"]}],
            tool_choice="required",
            max_output_tokens=300,
            temperature=0,
        ),
    }
    with anthropic.Anthropic(base_url=node.api_url, api_key=token, max_retries=0).messages.stream(
        model=MODEL,
        max_tokens=300,
        messages=ASK,
        tools=[{"name": "get_weather", "input_schema": PARAMETERS}],
        tool_choice={"type": "any"},
        extra_body={"temperature": 0},
    ) as stream:
        out["message"] = stream.get_final_message()
    return out


def check_tool_calls(got: dict[str, Any], served_by: str) -> None:
    [choice] = got["forced"].choices
    assert choice.finish_reason == "tool_calls" and got["forced"].model_extra["clawnode"]["served_by"] == [served_by]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert [name for name, _ in calls] == ["get_weather"]
    for _, arguments in calls:
        jsonschema.validate(json.loads(arguments), PARAMETERS)
    assert _calls(got["forced_stream"]) == calls  # temperature 0: the same calls, streamed
    [call] = [item for item in got["response"].output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), PARAMETERS)
    [use] = [block for block in got["message"].content if block.type == "tool_use"]
    assert got["message"].stop_reason == "tool_use"
    jsonschema.validate(use.input, PARAMETERS)


def choices_and_schemas(node: Node, token: str, schemas: list[dict[str, Any]]) -> tuple[Any, list[Any]]:
    client = _client(node, token)
    several = client.chat.completions.create(
        model=MODEL, messages=ASK, n=3, max_tokens=6, logprobs=True, top_logprobs=2, temperature=0.9, seed=3
    )
    structured = [
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=600,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}},
        )
        for seed, schema in enumerate(schemas)
    ]
    # Token ids as inputs, as default embedding clients send them: one unit each in the lease's bounds.
    vectors = client.embeddings.create(model=MODEL, input=[list(range(10, 210)), list(range(20, 60))])
    assert vectors.usage.prompt_tokens == 240 and len(vectors.data) == 2
    assert all(abs(sum(x * x for x in d.embedding) - 1) < 1e-3 for d in vectors.data)  # unit length
    # A prompt past the context is known before the first token: a 400 before the stream starts.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "sea " * 600}], max_tokens=8, stream=True
        )
    return several, structured


async def _discoverable(consumer: Node) -> None:
    with trio.fail_after(60):
        while not await consumer.discover(DiscoveryQuery(capability=f"model:{MODEL}", features=["tools", "n"])):
            await trio.sleep(0.2)


async def _tiny_spec(tmp_path: Path) -> ModelSpec:
    path = await trio.to_thread.run_sync(write_tiny_llama_gguf, tmp_path / "tiny.gguf")
    return ModelSpec(name=MODEL, path=str(path), price_per_unit=1000, n_threads=1, embeddings=True)  # type: ignore[call-arg]


async def test_the_tiny_model_serves_the_surface_locally_and_through_a_second_node(tmp_path: Path) -> None:
    rng = random.Random(1818)
    schemas = [random_schema(rng) for _ in range(5)]
    async with market_nodes([{"models": (await _tiny_spec(tmp_path),)}, {}]) as (nodes, _):
        provider, consumer = nodes
        await _discoverable(consumer)
        for node in (provider, consumer):
            token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
            served_by = "local" if node is provider else str(provider.host.get_id())
            check_tool_calls(await trio.to_thread.run_sync(tool_calls, node, token), served_by)
            several, structured = await trio.to_thread.run_sync(choices_and_schemas, node, token, schemas)
            assert len(several.choices) == 3
            for c in several.choices:
                assert "".join(entry.token for entry in c.logprobs.content) == c.message.content
                assert all(len(entry.top_logprobs) == 2 for entry in c.logprobs.content)
                assert c.finish_reason == "length"  # the tiny model never stops by itself
            assert several.usage.completion_tokens == 3 * 6
            for schema, reply in zip(schemas, structured, strict=True):
                jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
