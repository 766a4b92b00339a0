"""``/v1/messages``: Anthropic's Messages API, mapped onto the same router and chat service as
``/v1/chat/completions``.

``system`` becomes the system message; content blocks (``text``, an assistant's ``tool_use``, a user's
``tool_result``) become chat messages, assistant ``tool_calls`` and ``tool`` messages; ``tools``
(``input_schema``) and ``tool_choice`` (``auto``, ``any``, ``tool``, ``none``) the chat fields;
``stop_sequences`` the ``stop``. The reply is a ``message`` with ``text`` and ``tool_use`` blocks and
its ``stop_reason`` (``end_turn``, ``max_tokens``, ``tool_use``); streamed, it is Anthropic's event
sequence (``message_start``, ``content_block_start``/``_delta``/``_stop``, ``message_delta``,
``message_stop``). The API key is the node's API token, as ``x-api-key`` or a bearer token. Errors
use Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}``, with the HTTP status of the
same error on ``/v1/chat/completions``; a field this node cannot honour is refused with 400 naming it.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from node.openai_api import (
    FUNCTION_NAME,
    HTTP_STATUS,
    MAX_TOKENS_LIMIT,
    MAX_TOOLS,
    ChatCompletionRequest,
    ModelName,
    OpenAINode,
    SendEvent,
    SSEResponse,
    StrictBody,
    chat_answer,
    extension,
    flatten_content,
    invalid,
    parse_body,
    read_json,
    retry_headers,
)
from node.router import RouteResult
from runtime.errors import ClawnodeError, ErrorCode
from runtime.jsonsafe import loads_bounded

REFUSED_MESSAGES = {
    "top_k": "top_k sampling is not served",
    "thinking": "extended thinking is not served",
    "container": "containers are not served",
    "mcp_servers": "MCP servers are not served",
}

_ERROR_TYPES = {
    ErrorCode.INVALID_ARGUMENT: "invalid_request_error",
    ErrorCode.UNAUTHENTICATED: "authentication_error",
    ErrorCode.FORBIDDEN: "permission_error",
    ErrorCode.NOT_FOUND: "not_found_error",
    ErrorCode.RATE_LIMITED: "rate_limit_error",
    ErrorCode.UNAVAILABLE: "overloaded_error",
}


def anthropic_error(error: ClawnodeError) -> dict[str, Any]:
    """Anthropic's error body; our stable code and reason ride beside its type."""
    return {
        "type": "error",
        "error": {
            "type": _ERROR_TYPES.get(error.code, "api_error"),
            "message": error.message,
            "code": error.code,
            "reason": error.reason,
        },
    }


def anthropic_error_response(error: ClawnodeError) -> Response:
    return JSONResponse(anthropic_error(error), status_code=HTTP_STATUS[error.code], headers=retry_headers(error))


class Tool(StrictBody):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=100_000)
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None


class ToolChoice(StrictBody):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, pattern=FUNCTION_NAME)
    disable_parallel_tool_use: bool | None = None


class Message(StrictBody):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]] = Field(max_length=1_000_000)


class Metadata(StrictBody):
    user_id: str | None = Field(None, max_length=256)


class MessagesRequest(StrictBody):
    model: ModelName
    max_tokens: int = Field(ge=1, le=MAX_TOKENS_LIMIT)
    messages: list[Message] = Field(min_length=1, max_length=1000)
    system: str | list[dict[str, Any]] | None = Field(None, max_length=1_000_000)
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    stop_sequences: list[str] | None = Field(None, max_length=16)
    stream: bool | None = False
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None  # accepted: the caller's own id, no effect on the reply
    service_tier: Literal["auto", "standard_only"] | None = None

    def chat_request(self) -> ChatCompletionRequest:
        chat: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "messages": self._messages()}
        if self.temperature is not None:
            chat["temperature"] = self.temperature
        if self.top_p is not None:
            chat["top_p"] = self.top_p
        if self.stop_sequences:
            chat["stop"] = self.stop_sequences
        if self.tools:
            chat["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "parameters": tool.input_schema,
                        **({"description": tool.description} if tool.description else {}),
                    },
                }
                for tool in self.tools
            ]
        choice = self.tool_choice
        if choice is not None:
            if choice.type == "tool":
                if choice.name is None:
                    raise invalid("a tool_choice of type tool needs its name", "tool_choice.name")
                chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
            else:
                chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
            if choice.disable_parallel_tool_use is not None and self.tools:
                chat["parallel_tool_calls"] = not choice.disable_parallel_tool_use
        return parse_body(ChatCompletionRequest, chat)

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": _text(self.system, "system")})
        for index, message in enumerate(self.messages):
            messages.extend(_chat_messages(message, f"messages[{index}]"))
        return messages


def _text(content: str | list[dict[str, Any]], param: str) -> str:
    if isinstance(content, str):
        return content
    return flatten_content([_text_part(block, f"{param}[{i}]") for i, block in enumerate(content)], param) or ""


def _text_part(block: Any, param: str) -> dict[str, Any]:
    if not isinstance(block, dict):
        raise invalid("a content block is an object with a type", param)
    if block.get("type") != "text":
        shown = block.get("type") if isinstance(block.get("type"), str) else "untyped"
        raise invalid(f"content blocks of type {str(shown)[:32]!r} are not served here", param)
    return {"type": "text", "text": block.get("text")}


def _chat_messages(message: Message, param: str) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results become tool messages, tool uses calls."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    texts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for index, block in enumerate(message.content):
        where = f"{param}.content[{index}]"
        kind = block.get("type")
        if kind == "text":
            texts.append(_text_part(block, where))
        elif kind == "tool_use" and message.role == "assistant":
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
            if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, dict)):
                raise invalid("a tool_use block needs id, name and input (an object)", where)
            calls.append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
            )
        elif kind == "tool_result" and message.role == "user":
            call_id, content = block.get("tool_use_id"), block.get("content", "")
            if not isinstance(call_id, str) or not isinstance(content, str | list):
                raise invalid("a tool_result block needs tool_use_id and content", where)
            result = _text(content, f"{where}.content")
            if block.get("is_error"):
                result = f"Error: {result}"
            results.append({"role": "tool", "tool_call_id": call_id, "content": result})
        else:
            shown = kind if isinstance(kind, str) else "untyped"
            raise invalid(f"content blocks of type {shown[:32]!r} are not served in a {message.role} message", where)
    text = flatten_content(texts, f"{param}.content") if texts else None
    if message.role == "assistant":
        out: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
        if calls:
            out["tool_calls"] = calls
        return [out]
    return [*results, *([{"role": "user", "content": text}] if text is not None else [])]


_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = loads_bounded(arguments, what="the tool call's arguments") if arguments else {}
    except (ValueError, ClawnodeError):
        value = None
    if not isinstance(value, dict):
        raise ClawnodeError(ErrorCode.INTERNAL, "the model's tool call arguments are not a JSON object")
    return value


def _usage(result: RouteResult) -> dict[str, int]:
    """Anthropic's usage: ``input_tokens`` leaves out the prompt tokens read from the KV cache, which
    ``cache_read_input_tokens`` counts (both are billed as prompt tokens)."""
    cached = min(result.cached_tokens, result.prompt_tokens)
    return {
        "input_tokens": result.prompt_tokens - cached,
        "cache_read_input_tokens": cached,
        "output_tokens": result.completion_tokens,
    }


def mount_anthropic(app: FastAPI, node: OpenAINode) -> None:
    @app.post("/v1/messages", response_model=None)
    async def messages(http: Request) -> Response:
        try:
            return await _messages(http, node)
        except ClawnodeError as error:
            return anthropic_error_response(error)


async def _messages(http: Request, node: OpenAINode) -> Response:
    request = parse_body(MessagesRequest, await read_json(http), REFUSED_MESSAGES)
    chat = request.chat_request()
    body = chat.service_body()
    message_id = "msg_" + secrets.token_hex(12)

    def envelope(content: list[dict[str, Any]], stop: str | None, usage: dict[str, int]) -> dict[str, Any]:
        return {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }

    if not request.stream:
        choices, result = await chat_answer(node.router, request.model, body, 1, _ignore)
        state = choices.states[0]
        content: list[dict[str, Any]] = [{"type": "text", "text": state.content()}] if state.content() else []
        for call in state.tool_calls():
            function = call["function"]
            content.append(
                {
                    "type": "tool_use",
                    "id": call["id"],
                    "name": function["name"],
                    "input": _tool_input(function["arguments"]),
                }
            )
        stop = _STOP_REASONS[choices.finish_reason(0, chat.limit, result)]
        usage = _usage(result)
        out = envelope(content, stop, usage)
        out["clawnode"] = extension(result)
        return JSONResponse(out)

    async def produce(send_event: SendEvent) -> None:
        started = False
        block_index = -1
        open_kind: tuple[str, int] | None = None  # ("text", 0) or ("tool", call index)

        async def event(name: str, data: dict[str, Any]) -> None:
            await send_event({"type": name, **data}, name)

        async def close_block() -> None:
            nonlocal open_kind
            if open_kind is not None:
                await event("content_block_stop", {"index": block_index})
                open_kind = None

        async def open_block(kind: tuple[str, int], block: dict[str, Any]) -> None:
            nonlocal block_index, open_kind
            await close_block()
            block_index += 1
            open_kind = kind
            await event("content_block_start", {"index": block_index, "content_block": block})

        async def on_chunk(chunk: dict[str, Any]) -> None:
            nonlocal started
            if not started:
                started = True
                await event("message_start", {"message": envelope([], None, {"input_tokens": 0, "output_tokens": 0})})
            text = chunk.get("text")
            if text:
                if open_kind != ("text", 0):
                    await open_block(("text", 0), {"type": "text", "text": ""})
                await event(
                    "content_block_delta", {"index": block_index, "delta": {"type": "text_delta", "text": text}}
                )
            for delta in chunk.get("tool_calls") or []:
                kind = ("tool", delta["index"])
                function = delta.get("function") or {}
                if open_kind != kind:
                    if "type" not in delta and "id" not in delta and not function.get("name"):
                        raise ClawnodeError(ErrorCode.INTERNAL, "tool call deltas interleaved; cannot stream as blocks")
                    block: dict[str, Any] = {
                        "type": "tool_use",
                        "id": delta.get("id") or "toolu_" + secrets.token_hex(12),
                        "name": function.get("name") or "",
                        "input": {},
                    }
                    await open_block(kind, block)
                if function.get("arguments"):
                    await event(
                        "content_block_delta",
                        {
                            "index": block_index,
                            "delta": {"type": "input_json_delta", "partial_json": function["arguments"]},
                        },
                    )

        choices, result = await chat_answer(node.router, request.model, body, 1, on_chunk)
        if not started:
            await on_chunk({})
        await close_block()
        stop = _STOP_REASONS[choices.finish_reason(0, chat.limit, result)]
        usage = _usage(result)
        await event("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": usage})
        await event("message_stop", {"clawnode": extension(result)})

    def error_event(error: ClawnodeError) -> tuple[dict[str, Any], str | None]:
        return anthropic_error(error), "error"

    return SSEResponse(produce, error_reply=anthropic_error_response, error_event=error_event, done=False)


async def _ignore(_: dict[str, Any]) -> None:
    return None
