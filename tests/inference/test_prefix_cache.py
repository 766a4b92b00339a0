"""Prefix caching: the next turn of a conversation reuses the KV cache of the last one (its prompt
tokens reported as ``cached_tokens``) and says exactly what it says without the cache."""

from __future__ import annotations

from typing import Any

from runtime.inference.engine import LlamaModel
from runtime.inference.service import ChatService


async def _chat(model: LlamaModel, messages: list[dict[str, Any]]) -> tuple[str, dict[str, int]]:
    pieces: list[str] = []

    async def emit(chunk: dict[str, Any]) -> None:
        pieces.append(chunk.get("text", ""))

    usage = await ChatService(model).run({"messages": messages, "max_tokens": 12, "temperature": 0}, emit)
    return "".join(pieces), usage.detail


async def test_the_second_turn_reuses_the_first_and_answers_the_same_as_without_the_cache(tiny: LlamaModel) -> None:
    first = [
        {"role": "system", "content": "You are a terse assistant who answers in one line."},
        {"role": "user", "content": "Name a colour of the sea."},
    ]
    reply, usage_1 = await _chat(tiny, first)
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "And of the sky?"}]
    cached_text, cached_usage = await _chat(tiny, second)
    # The whole first prompt at least was already in the KV cache; still counted (billed) as prompt.
    assert cached_usage.get("cached_tokens", 0) >= usage_1["prompt_tokens"] - 1
    assert cached_usage["prompt_tokens"] > cached_usage["cached_tokens"]

    await _chat(tiny, [{"role": "user", "content": "Something else entirely, to evict the conversation."}])
    fresh_text, fresh_usage = await _chat(tiny, second)
    assert fresh_usage.get("cached_tokens", 0) < usage_1["prompt_tokens"] // 2  # decoded again
    assert fresh_usage["prompt_tokens"] == cached_usage["prompt_tokens"]
    assert cached_text == fresh_text  # temperature 0: the cache changes nothing but the time
