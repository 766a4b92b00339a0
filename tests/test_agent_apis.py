"""OpenAI's Responses API and Anthropic's Messages API, through their official Python clients: a
round trip with tools (the call, the tool's answer, the reply), streamed and not, structured output,
and each API's own error shape.

The chat service is ``AgentService`` (``tests/support/agent_service.py``), a stand-in that speaks the
chunk contract like a tool-using model; both APIs are mapped onto the same router and chat body as
``/v1/chat/completions``, which the service receives.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest
import trio

from node.daemon import Node
from node.datadir import read_api_token
from runtime.service import ServiceRegistry
from tests.support.agent_service import AgentService
from tests.support.market import market_nodes

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

MODEL = "Acme/Agent-1:q4"
PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
}


def _openai(node: Node, token: str) -> Any:
    return openai.OpenAI(base_url=f"{node.api_url}/v1", api_key=token, max_retries=0)


def _anthropic(node: Node, token: str, **auth: Any) -> Any:
    return anthropic.Anthropic(base_url=node.api_url, max_retries=0, **(auth or {"api_key": token}))


async def test_responses_api_round_trip_with_tools_streamed_and_not() -> None:
    agent = AgentService()
    services = ServiceRegistry()
    services.register(f"model:{MODEL}", agent)
    async with market_nodes([{"services": services}]) as (nodes, _):
        [node] = nodes
        token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
        tools = [{"type": "function", "name": "get_weather", "description": "weather", "parameters": PARAMETERS}]

        def round_trip() -> tuple[Any, list[Any], Any, Any]:
            client = _openai(node, token)
            first = client.responses.create(
                model=MODEL,
                instructions="you are terse",
                input="what is the weather in Paris",
                tools=tools,
                tool_choice="required",
            )
            events = list(
                client.responses.create(
                    model=MODEL, input="what is the weather in Paris", tools=tools, tool_choice="required", stream=True
                )
            )
            [call] = [item for item in first.output if item.type == "function_call"]
            answer = client.responses.create(
                model=MODEL,
                input=[
                    {"role": "user", "content": [{"type": "input_text", "text": "what is the weather in Paris"}]},
                    {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                    {"type": "function_call_output", "call_id": call.call_id, "output": "sunny and warm"},
                ],
                tools=tools,
            )
            schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
            structured = client.responses.create(
                model=MODEL,
                input="where",
                text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
            )
            return first, events, answer, (schema, structured)

        first, events, answer, (schema, structured) = await trio.to_thread.run_sync(round_trip)
        [call] = [item for item in first.output if item.type == "function_call"]
        assert first.status == "completed" and call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), PARAMETERS)
        assert first.usage is not None and first.usage.output_tokens > 0
        assert agent.bodies[0]["messages"][0] == {"role": "system", "content": "you are terse"}
        assert agent.bodies[0]["tool_choice"] == "required"

        kinds = [event.type for event in events]
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
        assert [event.sequence_number for event in events] == list(range(len(events)))
        pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert pieces == call.arguments  # the streamed deltas reassemble into the same call
        [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert done.arguments == call.arguments and done.name == "get_weather"
        final_calls = [i for i in events[-1].response.output if i.type == "function_call"]
        assert [c.arguments for c in final_calls] == [call.arguments]

        # The tool's answer went back as a tool message after the assistant's call; the reply is text.
        sent = agent.bodies[2]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
        assert sent[1]["tool_calls"][0]["id"] == call.call_id and sent[2]["tool_call_id"] == call.call_id
        assert answer.output_text == "sunny and warm "
        jsonschema.validate(json.loads(structured.output_text), schema)

        def refused() -> Any:
            with pytest.raises(openai.BadRequestError) as caught:
                _openai(node, token).responses.create(model=MODEL, input="x", previous_response_id="resp_1")
            return caught.value

        error = await trio.to_thread.run_sync(refused)
        assert error.param == "previous_response_id"

        def unknown_streamed() -> None:
            with pytest.raises(openai.NotFoundError):
                _openai(node, token).responses.create(model="nobody-serves-this", input="x", stream=True)

        await trio.to_thread.run_sync(unknown_streamed)


async def test_anthropic_messages_round_trip_with_tools_streamed_and_not() -> None:
    agent = AgentService()
    services = ServiceRegistry()
    services.register(f"model:{MODEL}", agent)
    async with market_nodes([{"services": services}]) as (nodes, _):
        [node] = nodes
        token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
        tools = [{"name": "get_weather", "description": "weather", "input_schema": PARAMETERS}]
        question = {"role": "user", "content": "what is the weather in Paris"}

        def round_trip() -> tuple[Any, Any, Any, list[str]]:
            client = _anthropic(node, token)
            first = client.messages.create(
                model=MODEL,
                max_tokens=64,
                system="you are terse",
                messages=[question],
                tools=tools,
                tool_choice={"type": "tool", "name": "get_weather"},
            )
            with client.messages.stream(
                model=MODEL, max_tokens=64, messages=[question], tools=tools, tool_choice={"type": "any"}
            ) as stream:
                streamed = stream.get_final_message()
            [use] = [block for block in first.content if block.type == "tool_use"]
            follow_up = [
                question,
                {"role": "assistant", "content": [block.model_dump() for block in first.content]},
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny and warm"}],
                },
            ]
            # Bearer auth works as well as x-api-key.
            answer = _anthropic(node, token, auth_token=token).messages.create(
                model=MODEL, max_tokens=64, messages=follow_up, tools=tools
            )
            with client.messages.stream(model=MODEL, max_tokens=64, messages=follow_up, tools=tools) as stream:
                texts = list(stream.text_stream)
            return first, streamed, answer, texts

        first, streamed, answer, texts = await trio.to_thread.run_sync(round_trip)
        [use] = [block for block in first.content if block.type == "tool_use"]
        assert first.stop_reason == "tool_use" and use.name == "get_weather"
        jsonschema.validate(use.input, PARAMETERS)
        assert first.usage.output_tokens > 0 and first.usage.input_tokens > 0
        assert agent.bodies[0]["messages"][0] == {"role": "system", "content": "you are terse"}
        assert agent.bodies[0]["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
        assert agent.bodies[1]["tool_choice"] == "required"  # "any"
        # The streamed input_json deltas reassemble into the same input.
        [streamed_use] = [block for block in streamed.content if block.type == "tool_use"]
        assert streamed.stop_reason == "tool_use" and streamed_use.input == use.input
        assert answer.stop_reason == "end_turn" and answer.content[0].text == "sunny and warm "
        sent = agent.bodies[2]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
        assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == use.input
        assert "".join(texts) == "sunny and warm "

        def errors() -> tuple[Any, Any, Any]:
            client = _anthropic(node, token)
            with pytest.raises(anthropic.NotFoundError) as missing:
                client.messages.create(model="nobody-serves-this", max_tokens=8, messages=[question], stream=True)
            with pytest.raises(anthropic.BadRequestError) as refused:
                client.messages.create(model=MODEL, max_tokens=8, messages=[question], extra_body={"top_k": 5})
            with pytest.raises(anthropic.AuthenticationError) as unauthenticated:
                _anthropic(node, "wrong").messages.create(model=MODEL, max_tokens=8, messages=[question])
            return missing.value, refused.value, unauthenticated.value

        missing, refused, unauthenticated = await trio.to_thread.run_sync(errors)
        assert missing.body["type"] == "error" and missing.body["error"]["type"] == "not_found_error"
        assert refused.body["error"]["type"] == "invalid_request_error" and "top_k" in refused.body["error"]["message"]
        assert unauthenticated.status_code == 401
        # An image block is refused, naming where it is.
        async with httpx.AsyncClient() as http:
            reply = await http.post(
                f"{node.api_url}/v1/messages",
                headers={"x-api-key": token},
                json={
                    "model": MODEL,
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
                },
            )
        assert reply.status_code == 400 and "messages[0].content[0]" in reply.json()["error"]["message"]
