"""What the router makes of a provider's chunks (a stranger's JSON) and which answers it may continue
elsewhere: pure functions of ``node/router.py``."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.router import CHUNK_KEYS, chunk_tokens, clean_chunk, continuable
from runtime.errors import ClawnodeError, ErrorCode

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
KEYS = st.sampled_from(["text", "tokens", "index", "logprobs", "tool_calls", "finish_reason", "other"])
CHUNKISH = st.dictionaries(KEYS, JSON, max_size=6)


@settings(max_examples=120, deadline=None)
@given(st.one_of(JSON, CHUNKISH))
def test_any_json_is_a_clean_chunk_or_a_provider_fault(data: Any) -> None:
    try:
        chunk = clean_chunk(data)
    except ClawnodeError as error:
        assert error.code == ErrorCode.INTERNAL  # the provider's fault: the router fails over
        return
    assert set(chunk) <= CHUNK_KEYS and 0 <= chunk["index"] < 8
    assert chunk_tokens(chunk) >= 0
    assert clean_chunk(chunk) == chunk  # a clean chunk stays as it is


def test_a_contract_chunk_passes_whole() -> None:
    chunk = {
        "text": "",
        "tokens": 3,
        "index": 2,
        "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}
        ],
        "logprobs": [{"token": "x", "logprob": -0.5, "bytes": [120], "top_logprobs": []}],
        "finish_reason": "tool_calls",
    }
    assert clean_chunk(chunk) == chunk
    assert chunk_tokens(clean_chunk({"text": "", "tokens": 4})) == 4  # tool-call tokens count without text
    assert chunk_tokens(clean_chunk({"text": "older peer"})) == 1


@pytest.mark.parametrize(
    ("body", "resumable"),
    [
        ({"messages": []}, True),
        ({"n": 1, "response_format": {"type": "text"}, "logprobs": True}, True),
        ({"n": 2}, False),
        ({"tools": [{"type": "function"}]}, False),
        ({"response_format": {"type": "json_object"}}, False),
        ({"response_format": {"type": "json_schema"}}, False),
    ],
)
def test_only_plain_text_answers_are_continued_elsewhere(body: dict[str, Any], resumable: bool) -> None:
    assert continuable(body) is resumable
