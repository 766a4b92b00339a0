"""The inference engine as metered services of the lease market (``/clawnode/infer/1.0.0``).

``ChatService`` takes an OpenAI chat-completions request body (or a completions body with
``prompt``) and streams ``{"text": pieces, "tokens": n}`` chunks (what the engine produced since
the last frame); its units are the prompt's tokens plus the
completion's, both counted by the engine. ``continue_from`` continues a reply another provider
began (the router's failover): the text so far follows the generation prompt.
``EmbeddingService`` takes ``{"input": str | list[str]}`` and sends ``{"embeddings": [...]}``; its
units are the input's tokens.
"""

from __future__ import annotations

from typing import Any

from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.engine import LlamaModel
from runtime.service import Emit, Usage

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.8
MAX_EMBEDDING_INPUTS = 256
EMBEDDINGS_PER_CHUNK = 32  # a 1 MiB call frame holds ~70 640-d vectors as JSON


def _invalid(message: str) -> ClawnodeError:
    return ClawnodeError(ErrorCode.INVALID_ARGUMENT, message)


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid(f"body.{key} must be a number")
    return float(value)


class ChatService:
    """A chat model sold by the token: OpenAI chat-completions body in, text chunks out."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model

    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        if not isinstance(body, dict):
            raise _invalid("the body must be an object")
        messages = body.get("messages")
        prompt = body.get("prompt")
        if prompt is not None and messages is None:
            if not isinstance(prompt, str):
                raise _invalid("body.prompt must be a string")
        elif not isinstance(messages, list) or not messages:
            raise _invalid("body.messages must be a non-empty list")
        continue_from = body.get("continue_from", "")
        if not isinstance(continue_from, str):
            raise _invalid("body.continue_from must be a string")
        max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
        if max_tokens is None:
            max_tokens = DEFAULT_MAX_TOKENS
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise _invalid("body.max_tokens must be a positive integer")
        temperature = _number(body, "temperature", DEFAULT_TEMPERATURE)
        top_p = _number(body, "top_p", 0.95)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _invalid("body.seed must be an integer")
        stop = body.get("stop")
        if stop is not None and not isinstance(stop, str | list):
            raise _invalid("body.stop must be a string or a list of strings")
        # body.stream is ignored: the infer protocol always streams.
        if isinstance(prompt, str) and messages is None:
            stream = self.model.stream_complete(
                prompt + continue_from,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
                stop=stop,
                top_p=top_p,
            )
        else:
            stream = self.model.stream_chat(
                messages,  # type: ignore[arg-type]  # checked above
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
                stop=stop,
                top_p=top_p,
                assistant_prefix=continue_from,
            )
        async with stream:
            async for piece in stream:
                # One frame carries every piece ready by now; ``tokens`` says how many it holds.
                more = stream.drain_ready()
                await emit({"text": piece + "".join(more), "tokens": 1 + len(more)})
        usage = stream.usage
        if usage is None:
            raise ClawnodeError(ErrorCode.INTERNAL, "the generation ended without a usage count")
        return Usage(
            units=usage.total_tokens,
            detail={"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens},
        )


class EmbeddingService:
    """Mean-pooled embeddings sold by the input token."""

    def __init__(self, model: LlamaModel) -> None:
        self.model = model

    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        if not isinstance(body, dict):
            raise _invalid("the body must be an object")
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise _invalid("body.input must be a string or a non-empty list of strings")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise _invalid(f"body.input holds at most {MAX_EMBEDDING_INPUTS} strings")
        vectors, tokens = await self.model.embed_with_count(texts)
        for start in range(0, len(vectors), EMBEDDINGS_PER_CHUNK):
            chunk: dict[str, Any] = {"embeddings": vectors[start : start + EMBEDDINGS_PER_CHUNK]}
            if len(vectors) > EMBEDDINGS_PER_CHUNK:
                chunk["index"] = start
            await emit(chunk)
        return Usage(units=tokens, detail={"prompt_tokens": tokens})
