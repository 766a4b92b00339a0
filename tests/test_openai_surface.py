"""The whole OpenAI request surface through the official ``openai`` client: tools, ``n``, logprobs,
structured output, content parts, token-id inputs, base64 embeddings, model ids with ``/``, and a 400
naming every field that is not honoured.

The chat service is ``AgentService`` (``tests/support/agent_service.py``): it speaks the chunk
contract like a tool-using model, so these tests check what the API layer and the router make of it,
locally and bought from a second node over the network (real nodes, leases and streams). The engine's
own tool calling and grammars have their tests with a real model.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import trio

from dht.discovery import DiscoveryQuery
from node.daemon import Node
from node.datadir import read_api_token
from node.router import ProviderHealth
from runtime.errors import ClawnodeError, ErrorCode
from runtime.service import Emit, ServiceRegistry, Usage
from tests.support.agent_service import AGENT_OFFER, AgentService, VectorService
from tests.support.market import WORD_OFFER, WORDS, market_nodes

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
ASK: list[Any] = [{"role": "user", "content": "what is the weather in Paris"}]


def client(node: Node) -> Any:  # Any: the tests pass plain dicts where the client types TypedDicts
    return openai.OpenAI(base_url=f"{node.api_url}/v1", api_key=read_api_token(node.data_dir), max_retries=0)


def reassemble(chunks: list[Any]) -> dict[int, dict[str, Any]]:
    """Streamed chat chunks put back together per choice, as a client does."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            state = out.setdefault(choice.index, {"content": "", "calls": {}, "logprobs": [], "finish": None})
            state["content"] += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = state["calls"].setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
            if choice.logprobs is not None and choice.logprobs.content:
                state["logprobs"] += [entry.token for entry in choice.logprobs.content]
            state["finish"] = choice.finish_reason or state["finish"]
    return out


def calls_of(message: Any) -> list[dict[str, Any]]:
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]


async def _agent_nodes_and_wait(agent: AgentService) -> Any:
    services = ServiceRegistry()
    services.register(WORDS, agent)
    # A second provider of the same model serves no features (the plain word echo).
    return market_nodes([{"offers": (AGENT_OFFER,), "services": services}, {"offers": (WORD_OFFER,)}, {}])


async def test_tools_n_and_logprobs_bought_from_a_second_node_streamed_and_not() -> None:
    agent = AgentService()
    async with await _agent_nodes_and_wait(agent) as (nodes, _):
        provider, plain_provider, consumer = nodes
        with trio.fail_after(60):
            while len(await consumer.discover(DiscoveryQuery(capability=WORDS))) < 2:
                await trio.sleep(0.2)
        # Ranked first for anything, the featureless provider is never asked for what it does not serve.
        consumer.router.health[str(provider.host.get_id())] = ProviderHealth(ewma_latency_s=60.0)
        forced: dict[str, Any] = {
            "model": "words",
            "messages": ASK,
            "tools": [TIME, WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }

        def ask() -> tuple[Any, list[Any], Any, list[Any]]:
            plain = client(consumer).chat.completions.create(**forced)
            streamed = list(client(consumer).chat.completions.create(**forced, stream=True))
            several = client(consumer).chat.completions.create(
                model="words", messages=ASK, n=3, logprobs=True, top_logprobs=2
            )
            several_streamed = list(
                client(consumer).chat.completions.create(
                    model="words", messages=ASK, n=3, logprobs=True, top_logprobs=2, stream=True
                )
            )
            return plain, streamed, several, several_streamed

        plain, streamed, several, several_streamed = await trio.to_thread.run_sync(ask)
        # The forced call: valid tool_calls whose arguments validate against the tool's parameters.
        [choice] = plain.choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = calls_of(choice.message)
        assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])
        assert plain.system_fingerprint and plain.model_extra["clawnode"]["served_by"] == [str(provider.host.get_id())]
        assert not await plain_provider.ledger.list_leases()
        # The streamed deltas reassemble into the same call.
        [again] = reassemble(streamed).values()
        assert again["finish"] == "tool_calls" and again["content"] == ""
        assert [{**c, "id": None} for c in again["calls"].values()] == [{**call, "id": None}]
        # The provider's service received the tools and the named choice (nothing dropped on the way).
        body = agent.bodies[0]
        assert [t["function"]["name"] for t in body["tools"]] == ["get_time", "get_weather"]
        assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}

        # n=3: three choices, each with its logprobs; usage counts all of them.
        assert [c.index for c in several.choices] == [0, 1, 2]
        words = ASK[0]["content"].split()
        for index, c in enumerate(several.choices):
            expected = " ".join(w if index == 0 else f"{w}{index}" for w in words) + " "
            assert c.message.content == expected and c.finish_reason == "stop"
            assert "".join(entry.token for entry in c.logprobs.content) == expected  # consistent with the text
            assert all(len(entry.top_logprobs) == 2 for entry in c.logprobs.content)
        assert several.usage.completion_tokens == 3 * len(words)
        streamed_choices = reassemble(several_streamed)
        assert sorted(streamed_choices) == [0, 1, 2]
        for index, state in streamed_choices.items():
            assert state["content"] == several.choices[index].message.content
            assert "".join(state["logprobs"]) == state["content"]


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"metadata": {"a": "b"}}, "metadata"),
    ({"store": True}, "store"),
    ({"modalities": ["text", "audio"]}, "modalities[1]"),
    ({"no_such_field": 1}, "no_such_field"),
    ({"n": 9}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logit_bias": {"hello": 5}}, "logit_bias"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content[0]",
    ),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"model": "http://example.com/m"}, "model"),
    ({"model": "../etc/passwd"}, "model"),
]


async def test_every_unhonoured_field_is_a_400_naming_it_and_agent_traffic_is_accepted() -> None:
    agent = AgentService()
    services = ServiceRegistry()
    services.register("model:Acme/Agent-1:q4", agent)
    services.register("embedding:Acme/vec", VectorService())
    async with market_nodes([{"services": services}]) as (nodes, _):
        [node] = nodes
        token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
        headers = {"authorization": f"Bearer {token}"}
        base = {"model": "Acme/Agent-1:q4", "messages": ASK}
        async with httpx.AsyncClient(base_url=node.api_url, headers=headers) as http:
            for extra, param in BAD_FIELDS:
                for stream in (False, True):
                    reply = await http.post("/v1/chat/completions", json={**base, **extra, "stream": stream})
                    assert reply.status_code == 400, (extra, reply.text)
                    error = reply.json()["error"]
                    assert error["param"] == param and error["type"] == "invalid_request_error", (extra, error)
            for path, body, param in [
                ("/v1/completions", {"model": "Acme/Agent-1:q4", "prompt": "x", "echo": True}, "echo"),
                ("/v1/completions", {"model": "Acme/Agent-1:q4", "prompt": "x", "suffix": "y"}, "suffix"),
                ("/v1/embeddings", {"model": "Acme/vec", "input": "x", "dimensions": 2}, "dimensions"),
                ("/v1/embeddings", {"model": "Acme/vec", "input": "x", "encoding_format": "hex"}, "encoding_format"),
            ]:
                reply = await http.post(path, json=body)
                assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
            # A refused field set to null or its off value asks for nothing: accepted.
            quiet: dict[str, Any] = {"functions": [], "metadata": {}, "audio": None, "reasoning_effort": None}
            assert (await http.post("/v1/chat/completions", json={**base, **quiet})).status_code == 200
            # /v1/models/{id}: ids with "/" and ":" route; an unknown one is OpenAI's 404.
            reply = await http.get("/v1/models/Acme/Agent-1:q4")
            assert reply.status_code == 200 and reply.json()["id"] == "Acme/Agent-1:q4"
            reply = await http.get("/v1/models/nobody/serves-this")
            assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found_error"

        def agent_traffic() -> Any:
            # A multi-turn agent conversation: content parts, developer role, an assistant's tool call
            # with content null, the tool's answer, a name.
            return client(node).chat.completions.create(
                model="Acme/Agent-1:q4",
                messages=[
                    {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                    {"role": "user", "name": "ann", "content": [{"type": "text", "text": "weather?"}]},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny and warm"},
                ],
                tools=[WEATHER],
                tool_choice="none",
                max_completion_tokens=2,
                temperature=0.2,
                top_p=0.9,
                seed=7,
                stop=["\n"],
                presence_penalty=0.5,
                frequency_penalty=0.5,
                logit_bias={"42": -100},
                user="ann",
            )

        answer = await trio.to_thread.run_sync(agent_traffic)
        assert answer.choices[0].message.content == "sunny and " and answer.choices[0].finish_reason == "length"
        body = agent.bodies[-1]
        assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "tool"]
        assert body["messages"][0]["content"] == "be brief" and body["messages"][1]["name"] == "ann"
        assert body["messages"][2]["content"] is None and body["messages"][2]["tool_calls"][0]["id"] == "c1"
        assert body["messages"][3]["tool_call_id"] == "c1"
        for key, value in {
            "max_tokens": 2,
            "temperature": 0.2,
            "top_p": 0.9,
            "seed": 7,
            "stop": ["\n"],
            "presence_penalty": 0.5,
            "frequency_penalty": 0.5,
            "logit_bias": {"42": -100},
            "tool_choice": "none",
        }.items():
            assert body[key] == value, key

        def structured() -> Any:
            schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
            reply = client(node).chat.completions.create(
                model="Acme/Agent-1:q4",
                messages=ASK,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "place", "schema": schema, "strict": True},
                },
            )
            return schema, reply

        schema, answer = await trio.to_thread.run_sync(structured)
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)
        assert agent.bodies[-1]["response_format"]["json_schema"]["strict"] is True

        def errors_before_the_stream() -> tuple[type, type]:
            kinds = []
            for model, content in (("nobody-serves-this", "hi"), ("Acme/Agent-1:q4", "overflow")):
                try:
                    client(node).chat.completions.create(
                        model=model, messages=[{"role": "user", "content": content}], stream=True
                    )
                except openai.APIStatusError as error:
                    kinds.append(type(error))
            return kinds[0], kinds[1]

        # Known before the first token: the stream never starts, the status says what failed.
        not_found, bad_request = await trio.to_thread.run_sync(errors_before_the_stream)
        assert not_found is openai.NotFoundError and bad_request is openai.BadRequestError

        def embeddings() -> tuple[Any, Any, Any]:
            # The official client asks for base64 by default and decodes it.
            texts = client(node).embeddings.create(model="Acme/vec", input=["one two", "three"])
            ids = client(node).embeddings.create(model="Acme/vec", input=[[1, 2, 3]], encoding_format="float")
            raw = httpx.post(
                f"{node.api_url}/v1/embeddings",
                json={"model": "Acme/vec", "input": [5, 6], "encoding_format": "base64"},
                headers=headers,
            ).json()
            return texts, ids, raw

        texts, ids, raw = await trio.to_thread.run_sync(embeddings)
        assert len(texts.data) == 2
        assert all(d.embedding == pytest.approx([0.6, -0.8, 0.0]) for d in texts.data)
        assert texts.usage.prompt_tokens == 3
        assert ids.data[0].embedding == pytest.approx([0.0, 0.6, 0.8])
        vector = struct.unpack("<3f", base64.b64decode(raw["data"][0]["embedding"]))
        assert vector == pytest.approx((0.0, 0.6, 0.8))

        def completions() -> Any:
            return client(node).completions.create(model="Acme/Agent-1:q4", prompt="a b c", max_tokens=2, logprobs=1)

        completion = await trio.to_thread.run_sync(completions)
        assert completion.choices[0].text == "a b " and completion.choices[0].finish_reason == "length"
        assert completion.choices[0].logprobs.tokens == ["a ", "b "]


class FailingAgent(AgentService):
    """Fails like a provider that goes away: before its first chunk ("early") or after it ("late")."""

    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        self.bodies.append(body)
        if "late" in str(body["messages"][-1]["content"]):
            if body.get("tools"):
                delta = {
                    "index": 0,
                    "id": "call_x",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                }
                await emit({"tokens": 1, "tool_calls": [delta]})
            else:
                await emit({"tokens": 1, "text": "late "})
        raise ClawnodeError(ErrorCode.UNAVAILABLE, "the provider went away")


async def test_a_tool_call_fails_over_before_its_first_chunk_never_after_it() -> None:
    failing, healthy = FailingAgent(), AgentService()
    specs: list[dict[str, Any]] = []
    for agent in (failing, healthy):
        services = ServiceRegistry()
        services.register(WORDS, agent)
        specs.append({"offers": (AGENT_OFFER,), "services": services})
    async with market_nodes([*specs, {}]) as (nodes, _):
        _, second, consumer = nodes
        with trio.fail_after(60):
            while len(await consumer.discover(DiscoveryQuery(capability=WORDS))) < 2:
                await trio.sleep(0.2)
        # The failing provider is ranked first.
        consumer.router.health[str(second.host.get_id())] = ProviderHealth(ewma_latency_s=60.0)

        def ask(content: str, tools: bool) -> Any:
            extra: dict[str, Any] = {"tools": [TIME], "tool_choice": "required"} if tools else {}
            try:
                return client(consumer).chat.completions.create(
                    model="words", messages=[{"role": "user", "content": content}], stream=True, **extra
                )
            except openai.APIStatusError as error:
                return error

        early = await trio.to_thread.run_sync(lambda: reassemble(list(ask("fail early", True))))
        assert [c["name"] for c in early[0]["calls"].values()] == ["get_time"]  # the second provider's call
        late_text = await trio.to_thread.run_sync(lambda: reassemble(list(ask("fail late please", False))))
        assert late_text[0]["content"].startswith("late ")  # a text answer is continued by the next provider
        assert healthy.bodies[-1]["continue_from"] == "late "
        served = len(healthy.bodies)

        def late_tools() -> Any:
            chunks = []
            with pytest.raises(openai.APIError):
                for chunk in ask("fail late please", True):
                    chunks.append(chunk)
            return chunks

        chunks = await trio.to_thread.run_sync(late_tools)
        # The call began on the first provider: it is not finished by another (its arguments would not fit).
        assert chunks and len(healthy.bodies) == served
