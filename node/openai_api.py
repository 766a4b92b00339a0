"""``/v1``: the OpenAI-compatible face of the node, for agents and the official ``openai`` client.

``/v1/chat/completions`` goes through the router (a local model, else the network, else the
configured upstream), streamed as server-sent events or not; ``stream_options.include_usage``
adds the final usage chunk. Errors use OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with our stable code in ``code`` and its stable ``reason`` (or null) beside it. The API key
is the node's API token.

Nothing a client sends is silently dropped: every field of a request is either honoured (passed to
the chat service in its body, see the chunk contract in ``node/router.py``), accepted as one that
does not change the reply (``user``, ``safety_identifier``, ``prompt_cache_key``, ``store: false``,
``service_tier: auto|default``), or refused with 400 and ``param`` naming it; an unknown field is
refused the same way.

Streaming is written straight to the ASGI ``send``: the router runs inside the response's own
call, so a client that goes away fails the next write, which cancels the router and closes the
provider's stream (the provider stops generating). The response starts (HTTP 200) only with the
router's first chunk: an error known before it (unknown model, no provider, context overflow,
invalid parameters) is answered with its own status and error body, as without streaming.
"""

from __future__ import annotations

import base64
import json
import math
import re
import secrets
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import Receive, Scope, Send

from dht.discovery import DiscoveryQuery
from node.router import Router, RouteResult
from runtime.errors import ClawnodeError, ErrorCode, clean_reason
from runtime.inference.service import DEFAULT_MAX_TOKENS
from runtime.model_ids import ModelId, is_model_id

BaseModelT = TypeVar("BaseModelT", bound=BaseModel)

MAX_TOKENS_LIMIT = 32_768
MAX_CHOICES = 8
MAX_TOOLS = 128
MAX_EMBEDDING_INPUTS = 256
MAX_INPUT_TOKENS = 32_768
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
SYSTEM_FINGERPRINT = "fp_clawnode"

HTTP_STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INSUFFICIENT_FUNDS: 402,
    ErrorCode.EXPIRED: 410,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}

_ERROR_TYPES = {
    ErrorCode.INVALID_ARGUMENT: "invalid_request_error",
    ErrorCode.UNAUTHENTICATED: "authentication_error",
    ErrorCode.FORBIDDEN: "permission_error",
    ErrorCode.NOT_FOUND: "not_found_error",
    ErrorCode.RATE_LIMITED: "rate_limit_error",
    ErrorCode.INSUFFICIENT_FUNDS: "insufficient_quota",
}


def error_type(code: ErrorCode) -> str:
    return _ERROR_TYPES.get(code, "server_error")


_PARAM = re.compile(r"\(param: ([A-Za-z0-9_.\[\]-]{1,128})\)")


def param_of(message: str) -> str | None:
    """The request field an error names, written ``(param: <name>)`` in its message (the contract)."""
    found = _PARAM.search(message)
    return found.group(1) if found else None


def invalid(message: str, param: str) -> ClawnodeError:
    return ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"{message} (param: {param})")


def error_json(error: ClawnodeError) -> dict[str, Any]:
    """OpenAI's error object, with our stable code and reason."""
    return {
        "message": error.message,
        "type": error_type(error.code),
        "param": param_of(error.message),
        "code": error.code,
        "reason": clean_reason(error.reason),
    }


def retry_headers(error: ClawnodeError) -> dict[str, str]:
    """``Retry-After`` (whole seconds, rounded up) for a busy refusal that carries a hint."""
    if error.retry_after_s is None:
        return {}
    return {"retry-after": str(max(1, math.ceil(error.retry_after_s)))}


def openai_error_response(error: ClawnodeError) -> Response:
    return JSONResponse({"error": error_json(error)}, status_code=HTTP_STATUS[error.code], headers=retry_headers(error))


_UNION_LABELS = frozenset(
    {"str", "int", "float", "bool", "dict", "list", "nullable", "function-after", "function-before", "function-wrap"}
)


def _loc_param(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as OpenAI writes a param: ``messages[0].content``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part) in _UNION_LABELS or "[" in str(part):
            continue  # pydantic's union branch labels
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


# Refused fields whose value here asks for nothing (besides null), so a client that always sends them
# is served; any other value is refused. ``web_search_options: {}`` does ask for a web search.
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "functions": ([],),
    "metadata": ({},),
    "include": ([],),
    "background": (False,),
    "top_logprobs": (0,),
    "mcp_servers": ([],),
    "thinking": ({"type": "disabled"},),
}


def _asks_nothing(key: str, value: Any) -> bool:
    return value is None or any(type(value) is type(off) and value == off for off in OFF_VALUES.get(key, ()))


def parse_body(
    model: type[BaseModelT], raw: Any, refused: dict[str, str] | None = None, *, shape: str = "request"
) -> BaseModelT:
    """``raw`` checked field by field: a refused field (set to anything but null or its ``OFF_VALUES``)
    or an unknown one is a 400 naming it; then pydantic's checks, whose first failure is a 400 naming its
    field."""
    if not isinstance(raw, dict):
        raise invalid(f"the {shape} body must be a JSON object", "body")
    for key, value in raw.items():
        if refused and key in refused:
            if not _asks_nothing(key, value):
                raise invalid(f"{key} is not supported: {refused[key]}", key)
        elif key not in model.model_fields:
            raise invalid(f"unknown field {key!r}", str(key)[:64])
    try:
        return model.model_validate({k: v for k, v in raw.items() if not (refused and k in refused)})
    except ValidationError as error:
        first = error.errors()[0]
        param = _loc_param(tuple(first["loc"]))
        raise invalid(f"invalid {param}: {first['msg']}", param) from None


async def read_json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:
        raise invalid("the body is not valid JSON", "body") from None


# -- chat completions --


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionCall(StrictBody):
    name: str = Field(min_length=1, max_length=256)
    arguments: str = Field(max_length=1_000_000)


class ToolCall(StrictBody):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = Field(None, max_length=1_000_000)
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, max_length=256)
    refusal: str | None = Field(None, max_length=1_000_000)


class StreamOptions(StrictBody):
    include_usage: bool = False


class ClawnodeOptions(StrictBody):
    replicas: int = Field(1, ge=1, le=9, description="consensus: ask this many providers and compare")


class FunctionDef(StrictBody):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=100_000)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictBody):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(StrictBody):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(StrictBody):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(StrictBody):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=100_000)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


ModelName = ModelId  # the one rule for model ids (runtime/model_ids.py), as in config and records


class _Sampling(StrictBody):
    """Fields shared by chat and text completions."""

    model: ModelName
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = Field(None, max_length=16)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Accepted, no effect on the reply: identifiers for the caller's own bookkeeping.
    user: str | None = Field(None, max_length=256)

    def sampling(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for key in ("max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "n"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        if self.stop is not None:
            body["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.logit_bias:
            for token, bias in self.logit_bias.items():
                if not token.isdigit() or len(token) > 9:
                    raise invalid(f"logit_bias keys are token ids, not {token[:32]!r}", "logit_bias")
                if not -100 <= bias <= 100:
                    raise invalid("logit_bias values lie in [-100, 100]", "logit_bias")
            body["logit_bias"] = dict(self.logit_bias)
        return body


# Known chat-completions fields this node cannot honour: refused, never dropped.
REFUSED_CHAT = {
    "audio": "audio output is not served",
    "prediction": "predicted outputs are not served",
    "functions": "the legacy functions field is not served; use tools",
    "function_call": "the legacy function_call field is not served; use tool_choice",
    "web_search_options": "web search is not served",
    "reasoning_effort": "reasoning models are not served",
    "verbosity": "verbosity is not served",
    "metadata": "stored completions are not served",
}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text"]] | None = None
    store: Literal[False] | None = None
    service_tier: Literal["auto", "default"] | None = None
    safety_identifier: str | None = Field(None, max_length=256)
    prompt_cache_key: str | None = Field(None, max_length=256)
    clawnode: ClawnodeOptions | None = None

    @property
    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    @property
    def choices(self) -> int:
        return self.n or 1

    def service_body(self) -> dict[str, Any]:
        """What a provider's chat service receives (the contract's body): floats stay out of signed paths,
        so temperature travels as-is only in this (unsigned) call body."""
        body: dict[str, Any] = {"messages": [_service_message(m, i) for i, m in enumerate(self.messages)]}
        body.update(self.sampling())
        if self.max_completion_tokens is not None:
            body["max_tokens"] = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
        if self.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs or 0
        if self.response_format is not None and self.response_format.type != "text":
            body["response_format"] = _response_format(self.response_format)
        if self.tools:
            names = [tool.function.name for tool in self.tools]
            if len(set(names)) != len(names):
                raise invalid("two tools share a name", "tools")
            body["tools"] = [tool.model_dump(exclude_none=True) for tool in self.tools]
        if self.tool_choice is not None:
            if not self.tools and self.tool_choice != "none":
                raise invalid("tool_choice needs tools", "tool_choice")
            if isinstance(self.tool_choice, NamedToolChoice):
                if self.tool_choice.function.name not in {tool.function.name for tool in self.tools or []}:
                    raise invalid("tool_choice names a function that is not among the tools", "tool_choice")
                body["tool_choice"] = self.tool_choice.model_dump()
            elif self.tools:
                body["tool_choice"] = self.tool_choice
        if self.parallel_tool_calls is not None and self.tools:
            body["parallel_tool_calls"] = self.parallel_tool_calls
        return body


def _response_format(response_format: ResponseFormat) -> dict[str, Any]:
    if response_format.type == "json_object":
        return {"type": "json_object"}
    spec = response_format.json_schema
    if spec is None:
        raise invalid("a json_schema response_format needs its json_schema", "response_format.json_schema")
    if spec.schema_ is None:
        raise invalid("the json_schema needs its schema", "response_format.json_schema.schema")
    out: dict[str, Any] = {"name": spec.name, "schema": spec.schema_, "strict": bool(spec.strict)}
    return {"type": "json_schema", "json_schema": out}


def flatten_content(content: str | list[Any] | None, param: str) -> str | None:
    """Content parts as one string: text parts joined, any other part (an image, audio, a file) refused."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict):
            raise invalid("a content part is an object with a type", f"{param}[{index}]")
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text", "refusal"):
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise invalid(
                    f"a {kind} part needs its {'refusal' if kind == 'refusal' else 'text'} (a string)",
                    f"{param}[{index}]",
                )
            texts.append(text)
        else:
            shown = kind if isinstance(kind, str) else "untyped"
            raise invalid(f"content parts of type {shown[:32]!r} are not served (text only)", f"{param}[{index}]")
    return "\n".join(texts)


def _service_message(message: ChatMessage, index: int) -> dict[str, Any]:
    param = f"messages[{index}]"
    content = flatten_content(message.content, f"{param}.content")
    if message.refusal is not None and message.role == "assistant" and not content:
        content = message.refusal
    role = "system" if message.role == "developer" else message.role
    if content is None and not (role == "assistant" and message.tool_calls):
        raise invalid("a message needs its content (null only beside an assistant's tool_calls)", f"{param}.content")
    if message.tool_calls is not None and role != "assistant":
        raise invalid("only assistant messages carry tool_calls", f"{param}.tool_calls")
    out: dict[str, Any] = {"role": role, "content": content}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if role == "tool":
        if message.tool_call_id is None:
            raise invalid("a tool message needs its tool_call_id", f"{param}.tool_call_id")
        out["tool_call_id"] = message.tool_call_id
    elif message.tool_call_id is not None:
        raise invalid("only tool messages carry a tool_call_id", f"{param}.tool_call_id")
    return out


# -- assembling chunks into choices --


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    tokens: int = 0

    def content(self) -> str:
        return "".join(self.text)

    def tool_calls(self) -> list[dict[str, Any]]:
        return [self.calls[index] for index in sorted(self.calls)]


class Choices:
    """The chunks of an answer (of ``n`` choices), assembled as they arrive."""

    def __init__(self, n: int = 1) -> None:
        self.states = [ChoiceState() for _ in range(n)]

    def add(self, chunk: dict[str, Any]) -> ChoiceState:
        index = chunk.get("index", 0)
        if index >= len(self.states):
            raise ClawnodeError(ErrorCode.INTERNAL, "the provider sent a choice that was not asked for")
        state = self.states[index]
        text = chunk.get("text")
        if text:
            state.text.append(text)
        state.tokens += chunk.get("tokens", 1 if text else 0)
        for delta in chunk.get("tool_calls") or []:
            call = state.calls.setdefault(
                delta["index"],
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
            )
            if delta.get("id"):
                call["id"] = delta["id"]
            function = delta.get("function") or {}
            if function.get("name"):
                call["function"]["name"] = function["name"]
            call["function"]["arguments"] += function.get("arguments") or ""
        if chunk.get("logprobs") is not None:
            if state.logprobs is None:
                state.logprobs = []
            state.logprobs.extend(chunk["logprobs"])  # in place: a copy per chunk made a long answer O(n^2)
        if chunk.get("finish_reason"):
            state.finish_reason = chunk["finish_reason"]
        return state

    def finish_reason(self, index: int, limit: int, result: RouteResult | None = None) -> str:
        """The choice's finish reason as its chunks said, else what its counts show."""
        state = self.states[index]
        if state.finish_reason:
            return state.finish_reason
        if state.calls:
            return "tool_calls"
        tokens = state.tokens
        if result is not None and len(self.states) == 1:
            tokens = max(tokens, result.completion_tokens)
        return "length" if tokens >= limit else "stop"

    def fill_ids(self) -> None:
        for state in self.states:
            for call in state.calls.values():
                if not call["id"]:
                    call["id"] = "call_" + secrets.token_hex(12)


def _completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def usage_json(result: RouteResult) -> dict[str, Any]:
    """OpenAI's usage; ``cached_tokens``: prompt tokens whose KV cache was reused (billed as prompt tokens)."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def extension(result: RouteResult) -> dict[str, Any]:
    return {"served_by": result.served_by, "failovers": result.failovers}


SendEvent = Callable[..., Awaitable[None]]


class SSEResponse(Response):
    """Server-sent events produced by ``produce(send_event)``, written as they come.

    Nothing is sent before the first event: a ``ClawnodeError`` raised before it is answered by
    ``error_reply`` (its own status and body); one raised after it travels as ``error_event``.
    ``send_event(data, event=None)`` writes one event (``event:`` names it, as Anthropic and the
    Responses API do). ``done`` ends the stream with OpenAI's ``data: [DONE]``.
    """

    def __init__(
        self,
        produce: Callable[[SendEvent], Awaitable[None]],
        *,
        error_reply: Callable[[ClawnodeError], Response] = openai_error_response,
        error_event: Callable[[ClawnodeError], tuple[dict[str, Any], str | None]] | None = None,
        done: bool = True,
    ) -> None:
        super().__init__(media_type="text/event-stream")
        self._produce = produce
        self._error_reply = error_reply
        self._error_event = error_event or (lambda error: ({"error": error_json(error)}, None))
        self._done = done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_event(data: dict[str, Any], event: str | None = None) -> None:
            nonlocal started
            if not started:
                started = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
                    }
                )
            head = f"event: {event}\n" if event else ""
            body = f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})

        try:
            await self._produce(send_event)
        except ClawnodeError as error:
            if not started:
                await self._error_reply(error)(scope, receive, send)
                return
            # Headers are gone: the error travels as an event.
            data, name = self._error_event(error)
            await send_event(data, name)
        if not started:
            await send_event({})
        await send(
            {"type": "http.response.body", "body": b"data: [DONE]\n\n" if self._done else b"", "more_body": False}
        )


class OpenAINode(Protocol):
    @property
    def router(self) -> Router: ...

    def local_models(self) -> list[str]: ...


async def chat_answer(
    router: Router, model: str, body: dict[str, Any], n: int, on_chunk: Callable[[dict[str, Any]], Awaitable[None]]
) -> tuple[Choices, RouteResult]:
    """Run a chat body through the router, assembling its chunks (and handing each to ``on_chunk``)."""
    choices = Choices(n)

    async def sink(chunk: dict[str, Any]) -> None:
        choices.add(chunk)
        await on_chunk(chunk)

    result = await router.chat_chunks(model, body, sink)
    choices.fill_ids()
    return choices, result


async def _nothing(_: dict[str, Any]) -> None:
    return None


def mount_openai(app: FastAPI, node: OpenAINode) -> None:
    def model_card(name: str, owner: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": owner}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name, "clawnode") for name in node.local_models()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id in node.local_models():
            return JSONResponse(model_card(model_id, "clawnode"))
        if is_model_id(model_id):
            found = await node.router.discover(DiscoveryQuery(capability=f"model:{model_id}", limit=1))
            if found:
                return JSONResponse(model_card(model_id, "network"))
        error = ClawnodeError(
            ErrorCode.NOT_FOUND, f"no model {model_id[:128]!r} is served here or found on the network"
        )
        return openai_error_response(error)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(http: Request) -> Response:
        request = parse_body(ChatCompletionRequest, await read_json(http), REFUSED_CHAT)
        body = request.service_body()
        n = request.choices
        replicas = request.clawnode.replicas if request.clawnode else 1
        if replicas > 1:
            if n > 1 or request.tools or "response_format" in body or request.logprobs:
                raise invalid("consensus answers plain text only (no n, tools, response_format, logprobs)", "clawnode")
            return JSONResponse(await _consensus(node.router, request, body, replicas))
        completion_id, created = _completion_id(), int(time.time())

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": request.model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        if request.stream:

            async def produce(send_event: SendEvent) -> None:
                begun: set[int] = set()

                async def on_chunk(data: dict[str, Any]) -> None:
                    index = data.get("index", 0)
                    if index not in begun:
                        begun.add(index)
                        await send_event(chunk(index, {"role": "assistant", "content": ""}))
                    delta: dict[str, Any] = {}
                    if data.get("text"):
                        delta["content"] = data["text"]
                    if data.get("tool_calls"):
                        delta["tool_calls"] = [
                            {**call, "id": call.get("id") or ("call_" + secrets.token_hex(12))}
                            if "type" in call
                            else call
                            for call in data["tool_calls"]
                        ]
                    if delta or data.get("logprobs"):
                        event = chunk(index, delta)
                        if data.get("logprobs"):
                            event["choices"][0]["logprobs"] = {"content": data["logprobs"], "refusal": None}
                        await send_event(event)

                choices, result = await chat_answer(node.router, request.model, body, n, on_chunk)
                for index in range(n):
                    final = chunk(index, {}, choices.finish_reason(index, request.limit, result))
                    final["clawnode"] = extension(result)
                    await send_event(final)
                if request.stream_options and request.stream_options.include_usage:
                    usage_chunk = chunk(0, {})
                    usage_chunk["choices"] = []
                    usage_chunk["usage"] = usage_json(result)
                    await send_event(usage_chunk)

            return SSEResponse(produce)

        choices, result = await chat_answer(node.router, request.model, body, n, _nothing)
        out = []
        for index, state in enumerate(choices.states):
            calls = state.tool_calls()
            message: dict[str, Any] = {
                "role": "assistant",
                "content": state.content() or (None if calls else ""),
                "refusal": None,
            }
            if calls:
                message["tool_calls"] = calls
            logprobs = {"content": state.logprobs or [], "refusal": None} if request.logprobs else None
            out.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": choices.finish_reason(index, request.limit, result),
                }
            )
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": request.model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": out,
                "usage": usage_json(result),
                "clawnode": extension(result),
            }
        )


# -- text completions and embeddings --

REFUSED_COMPLETION = {
    "suffix": "insertion (suffix) is not served",
    "echo": "echoing the prompt is not served",
    "best_of": "best_of is not served; use n",
}

TokenIds = list[int]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(max_length=1_000_000)
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: int | None = Field(None, ge=0, le=5)

    def service_body(self) -> dict[str, Any]:
        prompt: str | list[int]
        raw = self.prompt
        if isinstance(raw, list) and raw and isinstance(raw[0], str | list):
            if len(raw) != 1:
                raise invalid("one prompt per request (a batch of prompts is not served)", "prompt")
            raw = raw[0]  # type: ignore[assignment]
        if isinstance(raw, list):
            if not raw or len(raw) > MAX_INPUT_TOKENS or not all(0 <= t < 2**31 for t in raw):  # type: ignore[operator]
                raise invalid("a token-id prompt holds 1 to 32768 ids in [0, 2^31)", "prompt")
            prompt = list(raw)  # type: ignore[arg-type]
        else:
            prompt = raw
        body: dict[str, Any] = {"prompt": prompt, **self.sampling()}
        if self.logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = self.logprobs
        return body


def _completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """The chat-style logprob entries in the legacy completions shape."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        tokens.append(entry["token"])
        values.append(entry["logprob"])
        tops.append({top["token"]: top["logprob"] for top in entry.get("top_logprobs") or []})
        offsets.append(offset)
        offset += len(entry["token"])
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


class EmbeddingRequest(StrictBody):
    model: ModelName
    input: str | list[str] | TokenIds | list[TokenIds] = Field(description="one text or up to 256, or token ids")
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = Field(None, max_length=256)

    def inputs(self) -> list[str] | list[list[int]]:
        raw = self.input
        if isinstance(raw, str):
            return [raw]
        if not raw:
            raise invalid("input holds 1 to 256 texts or token lists", "input")
        if isinstance(raw[0], int):
            raw = [raw]  # type: ignore[list-item]
        if len(raw) > MAX_EMBEDDING_INPUTS:
            raise invalid("input holds 1 to 256 texts or token lists", "input")
        if isinstance(raw[0], list):
            for ids in raw:
                if not ids or len(ids) > MAX_INPUT_TOKENS or not all(0 <= t < 2**31 for t in ids):  # type: ignore[union-attr, operator]
                    raise invalid("a token list holds 1 to 32768 ids in [0, 2^31)", "input")
        return raw  # type: ignore[return-value]


def encode_vector(vector: list[float], encoding: str | None) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or base64 of little-endian float32."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def mount_completions(app: FastAPI, node: OpenAINode) -> None:
    @app.post("/v1/completions", response_model=None)
    async def completions(http: Request) -> Response:
        request = parse_body(CompletionRequest, await read_json(http), REFUSED_COMPLETION)
        body = request.service_body()
        n = request.n or 1
        limit = request.max_tokens or DEFAULT_MAX_TOKENS
        completion_id, created = "cmpl-" + secrets.token_hex(12), int(time.time())

        def chunk(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": request.model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        if request.stream:

            async def produce(send_event: SendEvent) -> None:
                offsets = [0] * n

                async def on_chunk(data: dict[str, Any]) -> None:
                    index, text = data.get("index", 0), data.get("text") or ""
                    if not text and not data.get("logprobs"):
                        return
                    event = chunk(index, text)
                    if data.get("logprobs") and request.logprobs is not None:
                        event["choices"][0]["logprobs"] = _completion_logprobs(data["logprobs"], offsets[index])
                    offsets[index] += len(text)
                    await send_event(event)

                choices, result = await chat_answer(node.router, request.model, body, n, on_chunk)
                for index in range(n):
                    final = chunk(index, "", choices.finish_reason(index, limit, result))
                    final["clawnode"] = extension(result)
                    await send_event(final)
                if request.stream_options and request.stream_options.include_usage:
                    usage_chunk = chunk(0, "")
                    usage_chunk["choices"] = []
                    usage_chunk["usage"] = usage_json(result)
                    await send_event(usage_chunk)

            return SSEResponse(produce)

        choices, result = await chat_answer(node.router, request.model, body, n, _nothing)
        reply = chunk(0, "")
        reply["choices"] = [
            {
                "index": index,
                "text": state.content(),
                "logprobs": _completion_logprobs(state.logprobs or [], 0) if request.logprobs is not None else None,
                "finish_reason": choices.finish_reason(index, limit, result),
            }
            for index, state in enumerate(choices.states)
        ]
        reply["usage"] = usage_json(result)
        reply["clawnode"] = extension(result)
        return JSONResponse(reply)

    @app.post("/v1/embeddings", response_model=None)
    async def embeddings(http: Request) -> Response:
        request = parse_body(
            EmbeddingRequest, await read_json(http), {"dimensions": "shortened embeddings are not served"}
        )
        vectors, tokens, served_by = await node.router.embeddings(request.model, request.inputs())
        return JSONResponse(
            {
                "object": "list",
                "model": request.model,
                "data": [
                    {"object": "embedding", "index": i, "embedding": encode_vector(vector, request.encoding_format)}
                    for i, vector in enumerate(vectors)
                ],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "clawnode": {"served_by": [served_by], "failovers": 0},
            }
        )


async def _consensus(
    router: Router, request: ChatCompletionRequest, body: dict[str, Any], replicas: int
) -> dict[str, Any]:
    outcome = await router.consensus(request.model, {**body, "temperature": 0}, replicas)
    return {
        "id": _completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": outcome.text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage_json(outcome.usage),
        "clawnode": outcome.report(),
    }
