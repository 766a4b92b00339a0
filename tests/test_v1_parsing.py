"""The /v1 request parsers on hostile bodies: whatever JSON a client sends to chat completions,
completions, embeddings, responses or messages is either turned into a chat service body or refused
with ``E_INVALID_ARGUMENT`` naming a param, never an unexpected exception (a 500)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.anthropic_api import REFUSED_MESSAGES, MessagesRequest
from node.openai_api import (
    REFUSED_CHAT,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    param_of,
    parse_body,
)
from node.responses_api import REFUSED_RESPONSES, ResponsesRequest
from runtime.errors import ClawnodeError, ErrorCode

# Words the parsers branch on, so drawn bodies reach deep.
WORDS = st.sampled_from(
    ["text", "input_text", "refusal", "image_url", "tool_use", "tool_result", "function_call", "message",
     "function_call_output", "user", "assistant", "tool", "system", "developer", "function", "json_schema",
     "json_object", "auto", "none", "required", "any", "f"]
)  # fmt: skip
KEYS = st.sampled_from(
    ["type", "text", "role", "content", "id", "name", "input", "tool_use_id", "call_id", "arguments", "output",
     "schema", "json_schema", "function", "tool_calls", "tool_call_id", "parameters", "format", "input_schema",
     "refusal", "is_error"]
)  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=4) | WORDS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=30,
)
FIELDS = ["messages", "input", "system", "tools", "tool_choice", "response_format", "text", "prompt", "n", "stop"]


def _parse(which: int, body: dict[str, Any]) -> Any:
    if which == 0:
        return parse_body(ChatCompletionRequest, body, REFUSED_CHAT).service_body()
    if which == 1:
        return parse_body(ResponsesRequest, body, REFUSED_RESPONSES).chat_request().service_body()
    if which == 2:
        return parse_body(MessagesRequest, {**body, "max_tokens": 5}, REFUSED_MESSAGES).chat_request().service_body()
    if which == 3:
        return parse_body(CompletionRequest, body).service_body()
    return parse_body(EmbeddingRequest, body).inputs()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.fixed_dictionaries({"model": st.just("Acme/m:1")}, optional=dict.fromkeys(FIELDS, JSON)), st.integers(0, 4))
def test_any_body_is_parsed_or_refused_naming_a_param(body: dict[str, Any], which: int) -> None:
    try:
        _parse(which, body)
    except ClawnodeError as error:
        assert error.code == ErrorCode.INVALID_ARGUMENT
        assert param_of(error.message), error.message


def test_parts_that_are_not_objects_are_refused_where_they_are() -> None:
    cases: list[tuple[int, dict[str, Any], str]] = [
        (1, {"input": [{"role": "user", "content": [5]}]}, "input[0].content[0]"),
        (1, {"input": [{"type": "function_call_output", "call_id": "c", "output": [None]}]}, "input[0].output[0]"),
        (
            2,
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a", "content": [5]}]}]},
            "messages[0].content[0].content[0]",
        ),
        (2, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0]"),
        (0, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0]"),
    ]
    for which, body, param in cases:
        try:
            _parse(which, {"model": "m", **body})
        except ClawnodeError as error:
            assert param_of(error.message) == param, (body, error.message)
        else:
            raise AssertionError(f"accepted {body}")
