"""The prefix cache is kept per borrower: a stranger's prompt never resumes from another
consumer's KV cache, so its ``cached_tokens`` (exact, in every call's usage) cannot tell it whether
someone else's conversation begins with the text it guesses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runtime.inference.admission import borrowing
from runtime.inference.engine import LlamaModel
from runtime.inference.service import ChatService

SECRET = [
    {"role": "system", "content": "You are the assistant of ACME's merger desk. The target is Globex, at 41 dollars."},
    {"role": "user", "content": "Draft the note to the board about the offer, in one line."},
]


async def _usage(model: LlamaModel, borrower: str, messages: list[dict[str, Any]]) -> dict[str, int]:
    async def emit(chunk: dict[str, Any]) -> None:
        pass

    with borrowing(borrower):
        usage = await ChatService(model).run({"messages": messages, "max_tokens": 4, "temperature": 0}, emit)
    return usage.detail


@pytest.mark.parametrize("parallel", [1, 2])
async def test_a_stranger_cannot_probe_another_consumers_cached_prompt(tiny_path: Path, parallel: int) -> None:
    model = LlamaModel(tiny_path, name="tiny", n_ctx=512, n_threads=1, parallel=parallel)
    await model.load()
    try:
        first = await _usage(model, "victim-peer", SECRET)
        # The stranger guesses the victim's prompt, word for word: nothing of it comes from the cache.
        probe = await _usage(model, "stranger-peer", SECRET)
        assert probe["prompt_tokens"] == first["prompt_tokens"]
        assert probe.get("cached_tokens", 0) == 0
        # A guess that shares only the start (the system prompt) learns nothing either (another
        # stranger: the first one's own guess is its own cache).
        partial = await _usage(model, "other-stranger-peer", [SECRET[0], {"role": "user", "content": "Hello?"}])
        assert partial.get("cached_tokens", 0) == 0
        # The victim's own next call still resumes from its cache (its slot, or its saved state).
        again = await _usage(model, "victim-peer", SECRET)
        assert again.get("cached_tokens", 0) >= first["prompt_tokens"] - 1
    finally:
        await model.aclose()
