"""Which features a request needs and whether a provider's model serves them
(``protocols.machines.model_features``): driven with random request bodies, stranger's ones included,
and random sets of served features; the refusals are counted by reason."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.machines import lease_calls
from protocols.machines import model_features as mf
from runtime.errors import ClawnodeError, ErrorCode
from tests.protocols.refusals import report

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}


@pytest.mark.parametrize(
    ("body", "needed"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, set()),
        ({"tools": [TOOL]}, {"tools"}),
        ({"tools": [TOOL], "tool_choice": "none"}, {"tools"}),
        ({"tools": []}, set()),
        ({"response_format": {"type": "json_object"}}, {"json_schema"}),
        ({"response_format": SCHEMA_FORMAT}, {"json_schema"}),
        ({"response_format": {"type": "text"}}, set()),
        ({"logprobs": True}, {"logprobs"}),
        ({"logprobs": False}, set()),
        ({"logprobs": False, "top_logprobs": 0}, set()),
        ({"top_logprobs": 3}, {"logprobs"}),
        ({"prompt": "x", "logprobs": 0}, {"logprobs"}),  # completions: a count; 0 still returns the sampled one
        ({"n": 1}, set()),
        ({"n": 3}, {"n"}),
        ({"n": True}, set()),
        (
            {"tools": [TOOL], "response_format": {"type": "json_object"}, "logprobs": True, "n": 2},
            {"tools", "json_schema", "logprobs", "n"},
        ),
        # A stranger's malformed fields need nothing here: the engine refuses them by name.
        ({"tools": "all", "response_format": "json", "logprobs": "yes", "n": "3"}, set()),
        ("not a body", set()),
        (None, set()),
    ],
)
def test_a_request_needs_the_features_it_asks_for(body: Any, needed: set[str]) -> None:
    assert mf.required_features(body) == needed


def test_a_model_lacking_a_feature_is_refused_naming_it_and_its_param() -> None:
    descriptor = {"name": "model:Qwen/Qwen2.5-0.5B-Instruct", "model": {"features": ["n", "logprobs"]}}
    verdict = mf.serves({"tools", "json_schema", "n"}, descriptor, capability="model:Qwen/Qwen2.5-0.5B-Instruct")
    assert verdict is not None
    assert verdict.code == ErrorCode.INVALID_ARGUMENT
    assert verdict.reason == "feature_not_served"
    assert verdict.message == (
        "model:Qwen/Qwen2.5-0.5B-Instruct is not served with tools, json_schema by this provider (param: tools)"
    )
    error = verdict.error()
    assert (error.code, error.reason) == (ErrorCode.INVALID_ARGUMENT, "feature_not_served")
    assert mf.serves({"n", "logprobs"}, descriptor) is None
    assert mf.serves(set(), None) is None
    # No model facts (another kind, or a record from before features were published): serves none.
    refused = mf.serves({"logprobs"}, SimpleNamespace(model=None))
    assert refused is not None and refused.message.endswith("(param: logprobs)")
    assert mf.serves({"json_schema"}, SimpleNamespace(features=["json_schema"])) is None


def test_feature_names_a_user_types_are_checked() -> None:
    assert mf.parse_features(["tools", "n"]) == {"tools", "n"}
    with pytest.raises(ValueError, match="unknown feature 'grammar'"):
        mf.parse_features(["tools", "grammar"])


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_field_values = {
    "tools": st.sampled_from([None, [], [TOOL], [TOOL, TOOL], "tools", {"a": 1}]) | _json,
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function"}]) | _json,
    "response_format": st.sampled_from([None, {"type": "text"}, {"type": "json_object"}, SCHEMA_FORMAT, "json"])
    | _json,
    "logprobs": st.sampled_from([None, True, False, 0, 3, -1, "true"]) | _json,
    "top_logprobs": st.sampled_from([None, 0, 1, 20, True]) | _json,
    "n": st.sampled_from([None, 1, 2, 8, 0, True, "2"]) | _json,
}
_bodies = st.fixed_dictionaries({}, optional=_field_values) | _json


def test_random_bodies_against_random_providers_are_refused_by_reason() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(body=_bodies, served=st.sets(st.sampled_from(mf.FEATURES)), as_json=st.booleans())
    def run(body: Any, served: set[str], as_json: bool) -> None:
        needed = mf.required_features(body)  # a stranger's body never raises
        assert needed <= set(mf.FEATURES)
        descriptor: Any = (
            {"model": {"features": sorted(served)}}
            if as_json
            else SimpleNamespace(model=SimpleNamespace(features=served))
        )
        verdict = mf.serves(needed, descriptor)
        missing = [name for name in mf.FEATURES if name in needed - served]
        if not missing:
            assert verdict is None
            seen["admitted"] += 1
            return
        assert verdict is not None
        assert (verdict.code, verdict.reason) == (ErrorCode.INVALID_ARGUMENT, "feature_not_served")
        assert verdict.message.endswith(f"(param: {mf.FEATURE_PARAMS[missing[0]]})")
        assert ", ".join(missing) in verdict.message
        seen[f"{missing[0]} {verdict.reason}"] += 1

    run()
    report("model features", seen, {"admitted", "feature_not_served"})


@settings(max_examples=200, deadline=None, database=None)
@given(
    n=st.integers(1, 8),
    max_tokens=st.one_of(st.none(), st.integers(1, 100)),
    left=st.integers(0, 3_000),
    tools=st.booleans(),
)
def test_every_choice_and_every_constrained_token_is_metered(
    n: int, max_tokens: int | None, left: int, tools: bool
) -> None:
    """``n`` choices may each run to ``max_tokens``: ``n`` times it is reserved and may be claimed; the
    tools and schemas a request carries count in its prompt's estimate like its messages."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "n": n}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if tools:
        body["tools"] = [TOOL]
        assert lease_calls.prompt_units_estimate(body) > lease_calls.prompt_units_estimate({**body, "tools": []})
    per_choice = max_tokens or lease_calls.DEFAULT_COMPLETION_CAP
    assert lease_calls.call_units_needed(body) == per_choice * n + lease_calls.prompt_units_estimate(body)
    try:
        plan = lease_calls.plan_call(body, left)
    except ClawnodeError as error:
        assert error.reason == "over_budget"
        assert (max_tokens or 1) * n > left
        return
    assert plan.max_tokens * n <= plan.reserve <= left
    if max_tokens is not None:
        assert plan.max_tokens == max_tokens
        # An end frame claiming every choice's tokens is counted, one beyond is inflated.
        whole = max_tokens * n + lease_calls.prompt_units_estimate(body)
        assert lease_calls.end_frame_verdict(whole, max_tokens * n, body) is None
        inflated = lease_calls.end_frame_verdict(whole + 1, max_tokens * n + 1, body)
        assert inflated is not None and inflated.reason == "end_frame_inflated"
