"""Prefix caching: the next turn of a conversation reuses the KV cache of the last one (its prompt
tokens reported as ``cached_tokens``) and says exactly what it says without the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runtime.inference.engine import LlamaModel
from runtime.inference.service import ChatService


async def _chat(model: LlamaModel, messages: list[dict[str, Any]]) -> tuple[str, dict[str, int]]:
    pieces: list[str] = []

    async def emit(chunk: dict[str, Any]) -> None:
        pieces.append(chunk.get("text", ""))

    usage = await ChatService(model).run({"messages": messages, "max_tokens": 12, "temperature": 0}, emit)
    return "".join(pieces), usage.detail


@pytest.mark.parametrize("parallel", [1, 4])
async def test_the_second_turn_reuses_the_first_and_answers_the_same_as_without_the_cache(
    tiny_path: Path, parallel: int
) -> None:
    tiny = LlamaModel(tiny_path, name="tiny", n_ctx=512, n_threads=1, parallel=parallel)
    await tiny.load()
    try:
        await _second_turn(tiny, parallel)
    finally:
        await tiny.aclose()


async def _second_turn(tiny: LlamaModel, parallel: int) -> None:
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

    tiny.prefix_cache_bytes = 0  # no saved states: other conversations, one per slot, evict this one
    for i in range(parallel):
        await _chat(tiny, [{"role": "user", "content": f"Something else entirely ({i}), to evict the conversation."}])
    fresh_text, fresh_usage = await _chat(tiny, second)
    assert fresh_usage.get("cached_tokens", 0) < usage_1["prompt_tokens"] // 2  # decoded again
    assert fresh_usage["prompt_tokens"] == cached_usage["prompt_tokens"]
    assert cached_text == fresh_text  # temperature 0: the cache changes nothing but the time


@pytest.mark.parametrize("parallel", [1, 2])
async def test_interleaved_conversations_each_resume_from_their_saved_state(tiny_path: Path, parallel: int) -> None:
    """Three agents' conversations on a model with fewer sequences (slots) than conversations."""
    model = LlamaModel(tiny_path, name="tiny", n_ctx=512, n_threads=1, parallel=parallel)
    await model.load()
    try:
        conversations: dict[str, list[dict[str, Any]]] = {
            name: [
                {"role": "system", "content": f"You are {name}, a long-winded assistant who likes the weather."},
                {"role": "user", "content": f"{name}: tell me about the weather in a town by the sea, please."},
            ]
            for name in ("Alice", "Bob", "Carol")
        }
        firsts = {}
        for name, messages in conversations.items():  # three agents' first turns, one after another
            reply, firsts[name] = await _chat(model, messages)
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And tomorrow?"}]
        # The conversations that lost their slot to the next one were saved (Alice's and Bob's with
        # one slot, Alice's with two).
        assert model.saved_prefixes == 3 - parallel
        seconds = {name: await _chat(model, messages) for name, messages in conversations.items()}
        for name, (_, usage) in seconds.items():  # each second turn resumed its own first one
            assert usage.get("cached_tokens", 0) >= firsts[name]["prompt_tokens"] - 1, name
    finally:
        await model.aclose()

    # The same second turns computed from nothing say the same (temperature 0).
    fresh = LlamaModel(tiny_path, name="tiny", n_ctx=512, n_threads=1, prefix_cache_mb=0)
    await fresh.load()
    try:
        for name, messages in conversations.items():
            text, usage = await _chat(fresh, messages)
            assert usage.get("cached_tokens", 0) < firsts[name]["prompt_tokens"], name
            assert text == seconds[name][0], name
    finally:
        await fresh.aclose()
