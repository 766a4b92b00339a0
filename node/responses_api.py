"""``/v1/responses``: OpenAI's Responses API, mapped onto the same router and chat service as
``/v1/chat/completions``.

A request's ``instructions`` become the system message, its ``input`` (a string, or items: messages,
``function_call`` and ``function_call_output``) the chat messages, ``tools`` (functions) and
``tool_choice`` the chat fields of the same name, ``text.format`` the ``response_format`` and
``max_output_tokens`` the ``max_tokens``. The reply is a ``response`` object whose ``output`` holds a
``message`` item (``output_text``) and one ``function_call`` item per call; streamed, it is the
Responses event sequence (``response.created``, ``response.output_item.added``,
``response.output_text.delta``, ``response.function_call_arguments.delta``, …, ``response.completed``).
Nothing is stored: ``previous_response_id``, ``store: true`` and the other fields this node cannot
honour are refused with 400 naming them, in OpenAI's error shape.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from node.openai_api import (
    FUNCTION_NAME,
    MAX_TOKENS_LIMIT,
    MAX_TOOLS,
    ChatCompletionRequest,
    Choices,
    ModelName,
    OpenAINode,
    SendEvent,
    SSEResponse,
    StrictBody,
    chat_answer,
    error_json,
    extension,
    flatten_content,
    invalid,
    parse_body,
    read_json,
)
from node.router import RouteResult
from runtime.errors import ClawnodeError

REFUSED_RESPONSES = {
    "previous_response_id": "responses are not stored here; send the whole conversation as input",
    "conversation": "conversations are not stored here; send the whole conversation as input",
    "background": "background responses are not served",
    "reasoning": "reasoning models are not served",
    "include": "no extra output is served",
    "metadata": "stored responses are not served",
    "max_tool_calls": "max_tool_calls is not served",
    "prompt": "stored prompts are not served",
    "top_logprobs": "logprobs are served by /v1/chat/completions",
}


class FunctionTool(StrictBody):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=100_000)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(StrictBody):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)


class TextFormat(StrictBody):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=FUNCTION_NAME)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = Field(None, max_length=100_000)
    strict: bool | None = None


class TextOptions(StrictBody):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None


class ResponsesRequest(StrictBody):
    model: ModelName
    input: str | list[dict[str, Any]] = Field(max_length=1_000_000)
    instructions: str | None = Field(None, max_length=1_000_000)
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    store: Literal[False] | None = None
    truncation: Literal["disabled"] | None = None
    service_tier: Literal["auto", "default"] | None = None
    user: str | None = Field(None, max_length=256)
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256)

    def chat_request(self) -> ChatCompletionRequest:
        """The same request as chat completions (checked again there: tools, schema, sampling)."""
        chat: dict[str, Any] = {"model": self.model, "messages": self._messages()}
        for key in ("temperature", "top_p", "parallel_tool_calls"):
            if getattr(self, key) is not None:
                chat[key] = getattr(self, key)
        if self.max_output_tokens is not None:
            chat["max_tokens"] = self.max_output_tokens
        if self.tools:
            chat["tools"] = [
                {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                for tool in self.tools
            ]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            chat["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            chat["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_object":
            chat["response_format"] = {"type": "json_object"}
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.name is None or fmt.schema_ is None:
                raise invalid("a json_schema format needs its name and schema", "text.format")
            spec = {"name": fmt.name, "schema": fmt.schema_, "strict": bool(fmt.strict)}
            chat["response_format"] = {"type": "json_schema", "json_schema": spec}
        return parse_body(ChatCompletionRequest, chat)

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
            return messages
        for index, item in enumerate(self.input):
            messages.extend(_item_messages(item, f"input[{index}]", messages))
        if not messages:
            raise invalid("the input holds no message", "input")
        return messages


def _item_messages(item: dict[str, Any], param: str, before: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One input item as chat messages (a function call joins the assistant message before it)."""
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise invalid("a message's role is user, system, developer or assistant", f"{param}.role")
        content = item.get("content")
        if not isinstance(content, str | list):
            raise invalid("a message's content is a string or a list of parts", f"{param}.content")
        return [{"role": role, "content": flatten_content(content, f"{param}.content")}]
    if kind == "function_call":
        call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
        if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, str)):
            raise invalid("a function_call item needs call_id, name and arguments (strings)", param)
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        last = before[-1] if before else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
            last["tool_calls"].append(call)
            return []
        if last is not None and last["role"] == "assistant" and "tool_calls" not in last:
            last["tool_calls"] = [call]
            return []
        return [{"role": "assistant", "content": None, "tool_calls": [call]}]
    if kind == "function_call_output":
        call_id, output = item.get("call_id"), item.get("output")
        if not isinstance(call_id, str) or not isinstance(output, str | list):
            raise invalid("a function_call_output item needs call_id and output", param)
        return [{"role": "tool", "tool_call_id": call_id, "content": flatten_content(output, f"{param}.output")}]
    shown = kind if isinstance(kind, str) else "untyped"
    raise invalid(f"input items of type {shown[:32]!r} are not served", f"{param}.type")


def _usage(result: RouteResult) -> dict[str, Any]:
    prompt, completion = result.prompt_tokens, result.completion_tokens
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": result.cached_tokens},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text else [],
    }


def _call_item(item_id: str, call: dict[str, Any], status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call["id"],
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
        "status": status,
    }


class _Reply:
    """The response object, as it grows."""

    def __init__(self, request: ResponsesRequest, chat: ChatCompletionRequest) -> None:
        self.request, self.chat = request, chat
        self.id = "resp_" + secrets.token_hex(16)
        self.created_at = int(time.time())

    def envelope(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        request = self.request
        fmt = request.text.format if request.text and request.text.format else None
        text_format = fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}
        incomplete = status == "incomplete"
        tool_choice = request.tool_choice or "auto"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "model": request.model,
            "output": output,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": request.temperature,
            "text": {"format": text_format},
            "tool_choice": tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
            "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or []],
            "top_p": request.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": request.user,
            "metadata": {},
        }


def _error_event(error: ClawnodeError) -> tuple[dict[str, Any], str | None]:
    body = error_json(error)
    return {"type": "error", "code": body["code"], "message": body["message"], "param": body["param"]}, "error"


def mount_responses(app: FastAPI, node: OpenAINode) -> None:
    @app.post("/v1/responses", response_model=None)
    async def responses(http: Request) -> Response:
        request = parse_body(ResponsesRequest, await read_json(http), REFUSED_RESPONSES)
        chat = request.chat_request()
        body = chat.service_body()
        reply = _Reply(request, chat)

        def finished(choices: Choices, limit_hit: bool) -> tuple[str, list[dict[str, Any]]]:
            state = choices.states[0]
            output: list[dict[str, Any]] = []
            if state.content():
                output.append(_message_item("msg_" + secrets.token_hex(12), state.content(), "completed"))
            output.extend(_call_item("fc_" + secrets.token_hex(12), call, "completed") for call in state.tool_calls())
            return ("incomplete" if limit_hit else "completed"), output

        if not request.stream:
            choices, result = await chat_answer(node.router, request.model, body, 1, _ignore)
            status, output = finished(choices, choices.finish_reason(0, chat.limit, result) == "length")
            out = reply.envelope(status, output, _usage(result))
            out["clawnode"] = extension(result)
            return JSONResponse(out)

        async def produce(send_event: SendEvent) -> None:
            sequence = 0
            items: list[dict[str, Any]] = []  # output items in the order they opened
            text_item: dict[str, Any] | None = None
            call_items: dict[int, dict[str, Any]] = {}

            async def event(name: str, data: dict[str, Any]) -> None:
                nonlocal sequence
                await send_event({"type": name, "sequence_number": sequence, **data}, name)
                sequence += 1

            async def on_chunk(chunk: dict[str, Any]) -> None:
                nonlocal text_item
                if sequence == 0:
                    await event("response.created", {"response": reply.envelope("in_progress", [], None)})
                    await event("response.in_progress", {"response": reply.envelope("in_progress", [], None)})
                text = chunk.get("text")
                if text:
                    if text_item is None:
                        text_item = _message_item("msg_" + secrets.token_hex(12), "", "in_progress")
                        text_item["text"] = ""
                        items.append(text_item)
                        index = len(items) - 1
                        await event("response.output_item.added", {"output_index": index, "item": _shown(text_item)})
                        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                        await event(
                            "response.content_part.added",
                            {"item_id": text_item["id"], "output_index": index, "content_index": 0, "part": part},
                        )
                    text_item["text"] += text
                    await event(
                        "response.output_text.delta",
                        {
                            "item_id": text_item["id"],
                            "output_index": items.index(text_item),
                            "content_index": 0,
                            "delta": text,
                            "logprobs": [],
                        },
                    )
                for delta in chunk.get("tool_calls") or []:
                    item = call_items.get(delta["index"])
                    function = delta.get("function") or {}
                    if item is None:
                        call = {
                            "id": delta.get("id") or "call_" + secrets.token_hex(12),
                            "function": {"name": function.get("name") or "", "arguments": ""},
                        }
                        item = _call_item("fc_" + secrets.token_hex(12), call, "in_progress")
                        call_items[delta["index"]] = item
                        items.append(item)
                        await event("response.output_item.added", {"output_index": len(items) - 1, "item": dict(item)})
                    pieces = function.get("arguments") or ""
                    if pieces:
                        item["arguments"] += pieces
                        await event(
                            "response.function_call_arguments.delta",
                            {"item_id": item["id"], "output_index": items.index(item), "delta": pieces},
                        )

            choices, result = await chat_answer(node.router, request.model, body, 1, on_chunk)
            if sequence == 0:
                await on_chunk({})
            for index, item in enumerate(items):
                if item["type"] == "message":
                    text = item.pop("text")
                    item.update(_message_item(item["id"], text, "completed"))
                    part = item["content"][0] if item["content"] else {"type": "output_text", "text": ""}
                    common = {"item_id": item["id"], "output_index": index, "content_index": 0}
                    await event("response.output_text.done", {**common, "text": text, "logprobs": []})
                    await event("response.content_part.done", {**common, "part": part})
                else:
                    item["status"] = "completed"
                    await event(
                        "response.function_call_arguments.done",
                        {
                            "item_id": item["id"],
                            "output_index": index,
                            "arguments": item["arguments"],
                            "name": item["name"],
                        },
                    )
                await event("response.output_item.done", {"output_index": index, "item": item})
            limit_hit = choices.finish_reason(0, chat.limit, result) == "length"
            final = reply.envelope(
                "incomplete" if limit_hit else "completed",
                items,
                _usage(result),
            )
            final["clawnode"] = extension(result)
            await event("response.incomplete" if limit_hit else "response.completed", {"response": final})

        return SSEResponse(produce, error_event=_error_event, done=False)


def _shown(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "text"}


async def _ignore(_: dict[str, Any]) -> None:
    return None
