"""``/v1``: the OpenAI-compatible face of the node, for agents and the official ``openai`` client.

``/v1/chat/completions`` goes through the router (a local model, else the network, else the
configured upstream), streamed as server-sent events or not; ``stream_options.include_usage``
adds the final usage chunk. Errors use OpenAI's shape, ``{"error": {"message", "type", "code"}}``,
with our stable code in ``code`` and its stable ``reason`` (or null) beside it. The API key is the node's API token.

Streaming is written straight to the ASGI ``send``: the router runs inside the response's own
call, so a client that goes away fails the next write, which cancels the router and closes the
provider's stream (the provider stops generating).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from node.router import Router, RouteResult
from runtime.errors import ClawnodeError, ErrorCode, clean_reason

MAX_TOKENS_LIMIT = 32_768


def _with_sampling(
    body: dict[str, Any],
    max_tokens: int | None,
    temperature: float | None,
    seed: int | None,
    stop: str | list[str] | None,
) -> dict[str, Any]:
    """The sampling options a service reads, added to ``body`` when the request set them."""
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if seed is not None:
        body["seed"] = seed
    if stop is not None:
        body["stop"] = [stop] if isinstance(stop, str) else stop
    return body


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1_000_000)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ClawnodeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=1, le=9, description="consensus: ask this many providers and compare")


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=96, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    clawnode: ClawnodeOptions | None = None

    def service_body(self) -> dict[str, Any]:
        """What a provider's chat service receives: floats stay out of signed paths, so temperature
        travels as-is only in this (unsigned) call body."""
        body: dict[str, Any] = {"messages": [m.model_dump() for m in self.messages]}
        return _with_sampling(
            body, self.max_completion_tokens or self.max_tokens, self.temperature, self.seed, self.stop
        )


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=96, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    prompt: str = Field(max_length=1_000_000)
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def service_body(self) -> dict[str, Any]:
        return _with_sampling({"prompt": self.prompt}, self.max_tokens, self.temperature, self.seed, self.stop)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=96, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    input: str | list[str] = Field(description="one text or up to 256")


class OpenAINode(Protocol):
    @property
    def router(self) -> Router: ...

    def local_models(self) -> list[str]: ...


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


def _completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def _finish_reason(result: RouteResult, limit: int | None) -> str:
    return "length" if limit is not None and result.completion_tokens >= limit else "stop"


def _usage(result: RouteResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _extension(result: RouteResult) -> dict[str, Any]:
    return {"served_by": result.served_by, "failovers": result.failovers}


class SSEResponse(Response):
    """Server-sent events produced by ``produce(send_event)``, written as they come."""

    def __init__(self, produce: Callable[[Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]) -> None:
        super().__init__(media_type="text/event-stream")
        self._produce = produce

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )

        async def send_event(event: dict[str, Any]) -> None:
            body = f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})

        try:
            await self._produce(send_event)
        except ClawnodeError as error:
            # Headers are gone: the error travels as an event, in OpenAI's shape.
            await send_event(
                {
                    "error": {
                        "message": error.message,
                        "type": error_type(error.code),
                        "code": error.code,
                        "reason": clean_reason(error.reason),
                    }
                }
            )
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def mount_openai(app: FastAPI, node: OpenAINode) -> None:
    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "clawnode"} for name in node.local_models()
            ],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: ChatCompletionRequest) -> Response:
        limit = request.max_completion_tokens or request.max_tokens
        body = request.service_body()
        replicas = request.clawnode.replicas if request.clawnode else 1
        if replicas > 1:
            return JSONResponse(await _consensus(node.router, request, body, replicas))
        completion_id, created = _completion_id(), int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": request.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        if request.stream:

            async def produce(send_event: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
                await send_event(chunk({"role": "assistant", "content": ""}))

                async def on_text(text: str) -> None:
                    await send_event(chunk({"content": text}))

                result = await node.router.chat(request.model, body, on_text)
                final = chunk({}, _finish_reason(result, limit))
                final["clawnode"] = _extension(result)
                await send_event(final)
                if request.stream_options and request.stream_options.include_usage:
                    usage_chunk = chunk({})
                    usage_chunk["choices"] = []
                    usage_chunk["usage"] = _usage(result)
                    await send_event(usage_chunk)

            return SSEResponse(produce)

        pieces: list[str] = []

        async def collect(text: str) -> None:
            pieces.append(text)

        result = await node.router.chat(request.model, body, collect)
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": request.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "finish_reason": _finish_reason(result, limit),
                    }
                ],
                "usage": _usage(result),
                "clawnode": _extension(result),
            }
        )


def mount_completions(app: FastAPI, node: OpenAINode) -> None:
    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest) -> Response:
        completion_id, created = "cmpl-" + secrets.token_hex(12), int(time.time())

        def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
            return {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": request.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            }

        if request.stream:

            async def produce(send_event: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
                async def on_text(text: str) -> None:
                    await send_event(chunk(text))

                result = await node.router.chat(request.model, request.service_body(), on_text)
                final = chunk("", _finish_reason(result, request.max_tokens))
                final["clawnode"] = _extension(result)
                await send_event(final)
                if request.stream_options and request.stream_options.include_usage:
                    usage_chunk = chunk("")
                    usage_chunk["choices"] = []
                    usage_chunk["usage"] = _usage(result)
                    await send_event(usage_chunk)

            return SSEResponse(produce)

        pieces: list[str] = []

        async def collect(text: str) -> None:
            pieces.append(text)

        result = await node.router.chat(request.model, request.service_body(), collect)
        reply = chunk("".join(pieces), _finish_reason(result, request.max_tokens))
        reply["usage"] = _usage(result)
        reply["clawnode"] = _extension(result)
        return JSONResponse(reply)

    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingRequest) -> dict[str, Any]:
        texts = [request.input] if isinstance(request.input, str) else request.input
        if not texts or len(texts) > 256:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "input holds 1 to 256 texts")
        vectors, tokens, served_by = await node.router.embeddings(request.model, texts)
        return {
            "object": "list",
            "model": request.model,
            "data": [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "clawnode": {"served_by": [served_by], "failovers": 0},
        }


async def _consensus(
    router: Router, request: ChatCompletionRequest, body: dict[str, Any], replicas: int
) -> dict[str, Any]:
    outcome = await router.consensus(request.model, {**body, "temperature": 0}, replicas)
    return {
        "id": _completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": outcome.text},
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(outcome.usage),
        "clawnode": outcome.report(),
    }
