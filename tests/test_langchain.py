"""An agent framework's own client against /v1: ``langchain-openai``'s ``ChatOpenAI`` with
``bind_tools`` (a forced call, streamed and not), a tool round trip, and ``with_structured_output``.

The chat service is ``AgentService`` (``tests/support/agent_service.py``), a stand-in that speaks the
chunk contract like a tool-using model, bought by the framework's node from a second node over the
network.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from dht.discovery import DiscoveryQuery
from node.datadir import read_api_token
from runtime.service import ServiceRegistry
from tests.support.agent_service import AGENT_OFFER, AgentService
from tests.support.market import WORDS, market_nodes

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

MODEL = "words"


@tool
def get_weather(city: str, days: int) -> str:
    """The weather in a city for the next days."""
    return f"sunny in {city} for {days} days"


class Place(BaseModel):
    city: str
    population: int


async def test_langchain_bind_tools_round_trip_and_structured_output() -> None:
    agent = AgentService()
    services = ServiceRegistry()
    services.register(WORDS, agent)
    async with market_nodes([{"offers": (AGENT_OFFER,), "services": services}, {}]) as (nodes, _):
        provider, node = nodes
        with trio.fail_after(60):
            while not await node.discover(DiscoveryQuery(capability=WORDS)):
                await trio.sleep(0.2)
        token = await trio.to_thread.run_sync(read_api_token, node.data_dir)

        def run() -> tuple[Any, Any, Any, Any]:
            llm = ChatOpenAI(model=MODEL, base_url=f"{node.api_url}/v1", api_key=token, max_retries=0)  # type: ignore[arg-type]
            with_tools = llm.bind_tools([get_weather], tool_choice="get_weather")
            question = HumanMessage("what is the weather in Paris")
            called = with_tools.invoke([question])
            streamed: Any = None
            for piece in with_tools.stream([question]):
                streamed = piece if streamed is None else streamed + piece
            [call] = called.tool_calls
            result = get_weather.invoke(call["args"])
            answer = llm.bind_tools([get_weather]).invoke(
                [question, called, ToolMessage(result, tool_call_id=call["id"])]
            )
            place = llm.with_structured_output(Place).invoke("which city")
            return called, streamed, answer, place

        called, streamed, answer, place = await trio.to_thread.run_sync(run)
        [call] = called.tool_calls
        assert call["name"] == "get_weather" and call["args"] == {"city": "Paris", "days": 3}
        assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(call["name"], call["args"])]
        assert answer.content == "sunny in Paris for 3 days " and not answer.tool_calls
        sent = agent.bodies[2]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool"] and sent[2]["tool_call_id"] == call["id"]
        assert isinstance(place, Place) and place.city == "Paris"
        assert agent.bodies[-1]["response_format"]["type"] == "json_schema"
        [lease] = await provider.ledger.list_leases()  # all of it bought through one lease
        assert lease.metered_units > 0
