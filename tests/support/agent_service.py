"""A chat service that speaks the whole chunk contract (``node/router.py``) without a model.

It answers like a tool-using model would: with tools it calls the named (or first) tool when one is
forced, or on a user's turn, with arguments that fit the tool's parameters schema, streamed in pieces
as ``tool_calls`` deltas; with a JSON ``response_format`` it writes an instance of the schema;
otherwise it echoes the last user or tool message's words. ``n`` choices interleave, ``logprobs``
ride on every text chunk, each choice ends with its ``finish_reason``, and usage counts every choice.
A last message that says ``overflow`` is refused before the first chunk, as an engine refuses a
prompt past its context. It keeps the bodies it received, so a test sees what the API layer passed on.
"""

from __future__ import annotations

import json
from typing import Any

from node.localnet import WORD_OFFER
from runtime.errors import ClawnodeError, ErrorCode
from runtime.service import Emit, Usage

# The word-echo offer with every feature the agent service serves (a provider refuses what its offer lacks).
AGENT_OFFER = WORD_OFFER.model_copy(update={"features": ["tools", "json_schema", "logprobs", "n"]})


def instance_of(schema: dict[str, Any]) -> Any:
    """A small value that validates against ``schema`` (the subset tools and tests use)."""
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return instance_of(schema[key][0])
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: instance_of(properties[name]) for name in properties}
    if kind == "array":
        return [instance_of(schema.get("items", {"type": "string"}))] * max(1, schema.get("minItems", 1))
    return {"string": "Paris", "integer": 3, "number": 2.5, "boolean": True, "null": None}[kind]


def _last_text(body: dict[str, Any]) -> str:
    if isinstance(body.get("prompt"), str):
        return str(body["prompt"])
    for message in reversed(body.get("messages") or []):
        if message.get("role") in ("user", "tool") and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""


class AgentService:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        self.bodies.append(body)
        text = _last_text(body)
        if text == "overflow":
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the prompt does not fit the context (param: messages)")
        n = int(body.get("n", 1))
        prompt_tokens = len(json.dumps(body.get("messages", body.get("prompt")))) // 4
        tools = body.get("tools") or []
        choice = body.get("tool_choice", "auto")
        format_ = body.get("response_format") or {}
        used = 0
        last_role = (body.get("messages") or [{}])[-1].get("role")
        # Like an agent model: a tool is called when one is forced, or on a user's turn; after a tool's
        # answer it replies in text.
        if tools and (choice not in ("auto", "none") or (choice == "auto" and last_role == "user")):
            name = choice["function"]["name"] if isinstance(choice, dict) else tools[0]["function"]["name"]
            [tool] = [t for t in tools if t["function"]["name"] == name]
            for index in range(n):
                arguments = json.dumps(instance_of(tool["function"].get("parameters") or {"type": "object"}))
                start = {"index": 0, "id": f"call_{index}_{len(self.bodies)}", "type": "function"}
                await emit(
                    {
                        "index": index,
                        "tokens": 1,
                        "tool_calls": [{**start, "function": {"name": name, "arguments": ""}}],
                    }
                )
                for cut in range(0, len(arguments), 7):
                    piece = arguments[cut : cut + 7]
                    await emit(
                        {"index": index, "tokens": 1, "tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
                    )
                    used += 1
                await emit({"index": index, "tokens": 1, "finish_reason": "tool_calls"})
                used += 2
        elif format_.get("type") in ("json_object", "json_schema"):
            schema = (format_.get("json_schema") or {}).get("schema") or {"type": "object", "properties": {}}
            for index in range(n):
                reply = json.dumps(instance_of(schema))
                await emit({"index": index, "tokens": 2, "text": reply[: len(reply) // 2]})
                await emit({"index": index, "tokens": 2, "text": reply[len(reply) // 2 :], "finish_reason": "stop"})
                used += 4
        else:
            words = (text or "hello").split()
            limit = body.get("max_tokens", 256)
            for position in range(min(len(words), limit)):
                for index in range(n):  # choices interleave
                    word = words[position] if index == 0 else f"{words[position]}{index}"
                    chunk: dict[str, Any] = {"index": index, "tokens": 1, "text": word + " "}
                    if body.get("logprobs"):
                        top = [{"token": word, "logprob": -0.25, "bytes": list(word.encode())}]
                        top += [{"token": "x", "logprob": -3.0, "bytes": [120]}] * (body.get("top_logprobs", 0) - 1)
                        entry = {"token": word + " ", "logprob": -0.25, "bytes": list((word + " ").encode())}
                        chunk["logprobs"] = [{**entry, "top_logprobs": top[: body.get("top_logprobs", 0)]}]
                    if position == min(len(words), limit) - 1:
                        chunk["finish_reason"] = "length" if len(words) > limit else "stop"
                    await emit(chunk)
                    used += 1
        return Usage(units=prompt_tokens + used, detail={"prompt_tokens": prompt_tokens, "completion_tokens": used})


class VectorService:
    """Embeddings as a real engine gives them: unit vectors, one per input (text or token ids)."""

    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        inputs = body["input"]
        vectors = [[0.6, -0.8, 0.0] if isinstance(item, str) else [0.0, 0.6, 0.8] for item in inputs]
        await emit({"embeddings": vectors})
        tokens = sum(len(item) if isinstance(item, list) else len(item.split()) for item in inputs)
        return Usage(units=tokens, detail={"prompt_tokens": tokens})
