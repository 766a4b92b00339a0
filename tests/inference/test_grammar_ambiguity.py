"""A pattern that repeats something able to match nothing (``(a?){1000}``, ``(a*)*``) is refused
before any grammar is built: llama.cpp's grammar engine keeps one stack per way of having matched
so far, and on such a pattern it took 2 to 4 s a token (``^(a?){1000}$``, the suite's tiny model),
on the engine's one worker thread: one stranger's request held every other consumer's generation
for minutes (256 tokens: 10 to 15 minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.engine import LlamaModel
from runtime.inference.grammar import check_schema
from runtime.inference.service import ChatService

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

AMBIGUOUS = ["^(a|b)?{0,1000}$", "^(a?){1000}$", "^(a*)*$", "^((a?){10}){10}$", "^(|a){100}$", "^(a*b*)+$"]
FINE = ["^[a-z]{0,1000}$", "^(a+){0,100}$", "^\\d{3}-\\d{4}$", "^(ab|a){0,10}b$", "^(a?)$", "^(a|b)?c*$"]


@pytest.mark.parametrize("pattern", AMBIGUOUS)
def test_a_pattern_repeating_what_can_match_nothing_is_refused(pattern: str) -> None:
    with pytest.raises(ClawnodeError) as refused:
        check_schema({"type": "string", "pattern": pattern}, "response_format")
    assert refused.value.code == ErrorCode.INVALID_ARGUMENT
    assert "(param: response_format)" in refused.value.message


@pytest.mark.parametrize("pattern", FINE)
def test_ordinary_patterns_are_still_taken(pattern: str) -> None:
    check_schema({"type": "string", "pattern": pattern}, "response_format")


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
    }


async def test_one_request_cannot_hold_the_engine_with_an_ambiguous_pattern(tiny_path: Path) -> None:
    model = LlamaModel(tiny_path, name="tiny", n_ctx=512, n_threads=1)
    await model.load()
    try:

        async def emit(chunk: dict[str, Any]) -> None:
            pass

        hostile = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a?){1000}$"}}}
        # The stranger keeps the reply inside the string: "a" (326) up, the closing quote (263) down.
        body = {**_body(hostile), "max_tokens": 16, "logit_bias": {"326": 100, "263": -100}}
        with trio.fail_after(5):  # before the check: 2 to 4 s a token
            with pytest.raises(ClawnodeError) as refused:
                await ChatService(model).run(body, emit)
        assert refused.value.code == ErrorCode.INVALID_ARGUMENT
        assert "(param: response_format)" in refused.value.message
        tool = {"type": "function", "function": {"name": "f", "parameters": hostile}}
        with trio.fail_after(5), pytest.raises(ClawnodeError) as refused:
            await ChatService(model).run(
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "tools": [tool]}, emit
            )
        assert "(param: tools)" in refused.value.message
        with trio.fail_after(5):  # the engine is free for the next consumer
            usage = await ChatService(model).run(_body({"type": "string", "pattern": "^[a-z]{0,20}$"}), emit)
        assert usage.detail["completion_tokens"] >= 1
    finally:
        await model.aclose()
