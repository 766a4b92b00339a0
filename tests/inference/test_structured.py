"""The OpenAI request surface on the tiny random-weight model: structured output, tools, logprobs,
``n``, sampling knobs, bounds. A random model says nothing sensible, so every guarantee here is
the engine's own (a grammar keeps even random output valid)."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.engine import LlamaModel
from runtime.inference.service import ChatService, EmbeddingService, merge_chunks
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.inference.tools import parse_tools, rendering_bytes_bound
from tests.inference.schemas import random_schema

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

ASK = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Describe a city."}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
SCHEMAS: dict[str, Any] = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, ADD)}  # type: ignore[index]


@pytest.fixture
async def tiny2k(tiny_path: Path) -> AsyncIterator[LlamaModel]:
    model = LlamaModel(tiny_path, name="tiny", n_ctx=2048, n_threads=1)
    await model.load()
    try:
        yield model
    finally:
        await model.aclose()


async def run(model: LlamaModel, body: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    chunks: list[dict[str, Any]] = []

    async def emit(chunk: dict[str, Any]) -> None:
        chunks.append(chunk)

    usage = await ChatService(model).run(body, emit)
    assert sum(c["tokens"] for c in chunks) == usage.detail["completion_tokens"]  # every token metered
    return chunks, usage.detail


def choices(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Chunks reassembled per choice, as a client does: text, calls by index, logprobs, finish."""
    out: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        choice = out.setdefault(chunk.get("index", 0), {"text": "", "calls": {}, "logprobs": [], "finish": None})
        assert choice["finish"] is None, "nothing follows a choice's finish_reason"
        choice["text"] += chunk.get("text", "")
        choice["logprobs"] += chunk.get("logprobs", [])
        for delta in chunk.get("tool_calls", []):
            call = choice["calls"].setdefault(delta["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in delta:
                assert call["id"] is None and delta["type"] == "function"
                call["id"], call["name"] = delta["id"], delta["function"]["name"]
            call["arguments"] += delta["function"]["arguments"]
        choice["finish"] = chunk.get("finish_reason")
    return out


def json_schema_body(schema: dict[str, Any], seed: int) -> dict[str, Any]:
    return {
        "messages": ASK,
        "max_tokens": 1024,
        "temperature": 1.0,
        "seed": seed,
        "response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}},
    }


async def test_random_json_schemas_give_replies_that_validate(tiny2k: LlamaModel) -> None:
    """20 random schemas (the bench runs 100): every reply parses and validates, and ends by itself."""
    rng = random.Random(18)
    for seed in range(20):
        schema = random_schema(rng)
        chunks, _ = await run(tiny2k, json_schema_body(schema, seed))
        (choice,) = choices(chunks).values()
        jsonschema.validate(json.loads(choice["text"]), schema)
        assert choice["finish"] == "stop", (schema, choice["text"])


async def test_json_object_gives_an_object_and_free_text_does_not(tiny2k: LlamaModel) -> None:
    body = {"messages": ASK, "max_tokens": 1024, "temperature": 0, "response_format": {"type": "json_object"}}
    chunks, _ = await run(tiny2k, body)
    assert isinstance(json.loads(choices(chunks)[0]["text"]), dict)
    chunks, _ = await run(tiny2k, {**body, "response_format": {"type": "text"}, "max_tokens": 40})
    with pytest.raises(ValueError):
        json.loads(choices(chunks)[0]["text"])


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 3}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"oneOf": [{"type": "string"}]}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "colour"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a+"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "an object"}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["x" * 20_000]}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": json.loads('{"items":' * 14 + "{}" + "}" * 14)}},
        {"type": "xml"},
        "json",
    ],
)
async def test_schemas_that_cannot_be_enforced_are_refused(tiny: LlamaModel, response_format: Any) -> None:
    with pytest.raises(ClawnodeError) as raised:
        await run(tiny, {"messages": ASK, "max_tokens": 8, "response_format": response_format})
    assert raised.value.code == ErrorCode.INVALID_ARGUMENT
    assert raised.value.message.endswith("(param: response_format)")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
async def test_a_forced_tool_call_validates_against_the_tool_schema(tiny2k: LlamaModel, tool_choice: Any) -> None:
    for seed in range(2):
        body = {
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "max_tokens": 600,
            "temperature": 1.0,
            "seed": seed,
            "tools": [WEATHER, ADD],
            "tool_choice": tool_choice,
        }
        chunks, _ = await run(tiny2k, body)
        choice = choices(chunks)[0]
        assert choice["finish"] == "tool_calls" and choice["text"] == ""
        assert choice["calls"]
        for call in choice["calls"].values():
            assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
            if isinstance(tool_choice, dict):
                assert call["name"] == "add"
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
        # parallel_tool_calls false: exactly one call.
        chunks, _ = await run(tiny2k, {**body, "parallel_tool_calls": False})
        assert len(choices(chunks)[0]["calls"]) == 1


async def test_tool_choice_auto_and_none_leave_text_free(tiny2k: LlamaModel) -> None:
    base = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 30, "temperature": 0, "tools": [ADD]}
    for tool_choice in ("auto", "none"):
        chunks, detail = await run(tiny2k, {**base, "tool_choice": tool_choice})
        choice = choices(chunks)[0]
        # The random model writes text: the grammar let it; at the cap, finish_reason says so.
        assert choice["text"] and not choice["calls"] and choice["finish"] == "length"
        assert detail["completion_tokens"] == 30
    # "none" leaves the tools out of the prompt: fewer prompt tokens than "auto".
    _, auto = await run(tiny2k, {**base, "tool_choice": "auto", "max_tokens": 1})
    _, none = await run(tiny2k, {**base, "tool_choice": "none", "max_tokens": 1})
    assert none["prompt_tokens"] < auto["prompt_tokens"]


async def test_a_tool_round_trip_history_is_rendered_in_the_generic_format(tiny2k: LlamaModel) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "Add 1 and 2"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    prompt = await tiny2k.format_chat(history, parse_tools([ADD], "auto", None))
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in prompt
    assert "<tool_response>\n3\n</tool_response>" in prompt
    assert '"name": "add"' in prompt.split("Add 1 and 2")[0]  # the tool list comes first
    chunks, _ = await run(tiny2k, {"messages": history, "tools": [ADD], "max_tokens": 5, "temperature": 0})
    assert choices(chunks)[0]["finish"] == "length"


async def test_logprobs_are_those_of_the_tokens_emitted(tiny: LlamaModel) -> None:
    body = {"messages": ASK, "max_tokens": 24, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    chunks, detail = await run(tiny, body)
    choice = choices(chunks)[0]
    entries = choice["logprobs"]
    assert len(entries) == detail["completion_tokens"] == 24
    assert "".join(e["token"] for e in entries) == choice["text"]
    for entry in entries:
        assert bytes(entry["bytes"]).decode() == entry["token"]
        assert len(entry["top_logprobs"]) == 3
        # Greedy: the token emitted is its distribution's most likely one.
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"] <= 0
        assert sum(math.exp(t["logprob"]) for t in entry["top_logprobs"]) <= 1 + 1e-9
    # Sampled with a grammar: each token's logprob is finite (the grammar allowed it) and
    # no alternative the grammar refused is offered.
    constrained = {**json_schema_body({"type": "object"}, 3), "logprobs": True, "top_logprobs": 20}
    chunks, _ = await run(tiny, {**constrained, "max_tokens": 400})
    choice = choices(chunks)[0]
    first = choice["logprobs"][0]
    # Only "{" may open the object (as its character token or its byte-fallback token): the
    # alternatives are those and nothing else, their probabilities summing to one.
    assert first["token"] == "{" and {t["token"] for t in first["top_logprobs"]} == {"{"}
    assert math.isclose(sum(math.exp(t["logprob"]) for t in first["top_logprobs"]), 1.0, rel_tol=1e-6)
    assert "".join(e["token"] for e in choice["logprobs"]) == choice["text"]


async def test_logit_bias_and_penalties_change_the_choice(tiny: LlamaModel) -> None:
    base = {"messages": ASK, "max_tokens": 16, "temperature": 0}
    plain = choices((await run(tiny, base))[0])[0]["text"]
    a = str((await tiny.tokenize("A"))[-1])
    forced = choices((await run(tiny, {**base, "logit_bias": {a: 100}}))[0])[0]["text"]
    assert forced == "A" * 16
    first = str((await tiny.tokenize(plain[0]))[-1])
    banned = choices((await run(tiny, {**base, "logit_bias": {first: -100}}))[0])[0]["text"]
    assert banned[0] != plain[0]
    repeated = choices((await run(tiny, {**base, "max_tokens": 64}))[0])[0]["text"]
    fresh = choices((await run(tiny, {**base, "max_tokens": 64, "presence_penalty": 2.0, "frequency_penalty": 2.0}))[0])
    assert fresh[0]["text"] != repeated
    assert len(set(fresh[0]["text"])) >= len(set(repeated))


async def test_a_tiny_top_p_keeps_only_the_most_likely_token(tiny: LlamaModel) -> None:
    greedy = choices((await run(tiny, {"messages": ASK, "max_tokens": 24, "temperature": 0}))[0])[0]["text"]
    for seed in range(3):
        body = {"messages": ASK, "max_tokens": 24, "temperature": 2.0, "seed": seed}
        assert choices((await run(tiny, {**body, "top_p": 1e-6}))[0])[0]["text"] == greedy
    hot = [choices((await run(tiny, {**body, "seed": seed, "top_p": 1.0}))[0])[0]["text"] for seed in range(3)]
    assert any(text != greedy for text in hot)


async def test_n_choices_are_counted_once_for_the_prompt_and_each_for_the_completion(tiny: LlamaModel) -> None:
    body = {"messages": ASK, "max_tokens": 12, "temperature": 1.0, "seed": 11, "n": 3}
    chunks, detail = await run(tiny, body)
    got = choices(chunks)
    assert sorted(got) == [0, 1, 2]
    assert all(choice["finish"] == "length" and len(choice["text"]) == 12 for choice in got.values())
    _, single = await run(tiny, {**body, "n": 1})
    assert detail == {"prompt_tokens": single["prompt_tokens"], "completion_tokens": 36}
    assert len({choice["text"] for choice in got.values()}) > 1  # sampled choices differ
    again = choices((await run(tiny, body))[0])
    assert [c["text"] for c in again.values()] == [c["text"] for c in got.values()]  # one seed repeats them


async def test_finish_reason_says_length_or_stop(tiny: LlamaModel) -> None:
    chunks, _ = await run(tiny, {"messages": ASK, "max_tokens": 10, "temperature": 0})
    text = choices(chunks)[0]["text"]
    assert choices(chunks)[0]["finish"] == "length"
    chunks, _ = await run(tiny, {"messages": ASK, "max_tokens": 10, "temperature": 0, "stop": [text[4:6]]})
    assert choices(chunks)[0] == {**choices(chunks)[0], "text": text[:4], "finish": "stop"}


async def test_a_token_id_prompt_completes_like_its_text(tiny: LlamaModel) -> None:
    ids = await tiny.tokenize("hello there", add_bos=True)
    as_text = choices((await run(tiny, {"prompt": "hello there", "max_tokens": 8, "temperature": 0}))[0])[0]
    as_ids = choices((await run(tiny, {"prompt": ids, "max_tokens": 8, "temperature": 0}))[0])[0]
    assert as_ids["text"] == as_text["text"]
    with pytest.raises(ClawnodeError, match=r"param: prompt"):
        await run(tiny, {"prompt": [1, 10**7], "max_tokens": 2})


async def test_embeddings_are_unit_length_and_take_token_ids(tiny: LlamaModel) -> None:
    got: list[dict[str, Any]] = []

    async def emit(chunk: dict[str, Any]) -> None:
        got.append(chunk)

    ids = await tiny.tokenize("one two", add_bos=True)
    usage = await EmbeddingService(tiny).run({"input": ["one two", "three"]}, emit)
    await EmbeddingService(tiny).run({"input": ids}, emit)
    await EmbeddingService(tiny).run({"input": [ids, ids[:2]]}, emit)
    text_vector, other = got[0]["embeddings"]
    (ids_vector,) = got[1]["embeddings"]
    for vector in (text_vector, other, ids_vector, *got[2]["embeddings"]):
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-6)
    assert ids_vector == pytest.approx(text_vector, abs=1e-5)
    assert usage.units == len(ids) + len(await tiny.tokenize("three", add_bos=True))
    bad: list[Any]
    for bad in ([], [[]], [1, "a"], [[1], "a"], [10**7]):
        with pytest.raises(ClawnodeError, match=r"param: input"):
            await EmbeddingService(tiny).run({"input": bad}, emit)


async def test_the_model_says_what_it_serves(tiny: LlamaModel) -> None:
    assert tiny.features() == {"tools", "json_schema", "logprobs", "n"}
    assert tiny.context_length == 512
    assert tiny.chat_family == "gguf-template"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
        ({"logit_bias": {"99999": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": "x"}, "frequency_penalty"),
        ({"top_p": 1.5}, "top_p"),
        ({"tools": [ADD] * 65}, "tools"),
        ({"tools": [ADD, ADD]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
        ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [ADD], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"n": 2, "continue_from": "Once"}, "continue_from"),
    ],
)
async def test_what_cannot_be_honoured_is_refused_naming_the_param(
    tiny: LlamaModel, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(ClawnodeError) as raised:
        await run(tiny, {"messages": ASK, "max_tokens": 4, **extra})
    assert raised.value.code == ErrorCode.INVALID_ARGUMENT
    assert raised.value.message.endswith(f"(param: {param})"), raised.value.message


# A template with a tools slot, tool calls and the tool role (as Hermes/Qwen-style templates have).
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|im_start|>system\n# Tools\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}"
    "{% elif message['role'] == 'tool' %}<tool_response>{{ message['content'] }}</tool_response>"
    "{% else %}{{ message['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


async def test_a_template_with_a_tools_slot_renders_the_tools_itself(tmp_path: Path) -> None:
    model = LlamaModel(write_tiny_llama_gguf(tmp_path / "tools.gguf", chat_template=TOOLS_TEMPLATE), n_ctx=2048)
    await model.load()
    try:
        assert model.slots.tools and model.slots.tool_calls and model.slots.tool_role
        call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
        history: list[dict[str, Any]] = [
            {"role": "user", "content": "Add 1 and 2"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3"},
        ]
        prompt = await model.format_chat(history, parse_tools([ADD], "auto", None))
        assert prompt.startswith('<s><|im_start|>system\n# Tools\n{"type": "function", "function": {"name": "add"')
        assert "You can call these functions" not in prompt  # not the generic format
        assert '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' in prompt
        assert "<|im_start|>tool\n<tool_response>3</tool_response>" in prompt
        body = {"messages": history, "tools": [ADD], "tool_choice": "required", "max_tokens": 400, "seed": 1}
        chunks, _ = await run(model, body)
        (only,) = choices(chunks)[0]["calls"].values()
        jsonschema.validate(json.loads(only["arguments"]), SCHEMAS["add"])
    finally:
        await model.aclose()


async def test_continue_from_follows_a_token_id_prompt(tiny: LlamaModel) -> None:
    ids = await tiny.tokenize("hello there", add_bos=True)
    whole = choices((await run(tiny, {"prompt": ids, "max_tokens": 8, "temperature": 0}))[0])[0]["text"]
    rest = choices(
        (await run(tiny, {"prompt": ids, "continue_from": whole[:3], "max_tokens": 5, "temperature": 0}))[0]
    )[0]["text"]
    assert whole[:3] + rest == whole


async def test_schemas_with_refs_are_left_as_sent_and_kept_apart(tiny2k: LlamaModel) -> None:
    """Two tools whose $defs share a name each get their own; the body's schemas are not rewritten."""

    def tool(name: str, inner: dict[str, Any]) -> dict[str, Any]:
        parameters = {
            "type": "object",
            "$defs": {"Arg": inner},
            "properties": {"x": {"$ref": "#/$defs/Arg"}},
            "required": ["x"],
            "additionalProperties": False,
        }
        return {"type": "function", "function": {"name": name, "parameters": parameters}}

    tools = [tool("count", {"type": "integer"}), tool("flag", {"type": "boolean"})]
    sent = json.dumps(tools)
    for seed in range(4):
        body = {"messages": ASK, "tools": tools, "tool_choice": "required", "max_tokens": 300, "seed": seed}
        chunks, _ = await run(tiny2k, body)
        for call in choices(chunks)[0]["calls"].values():
            (schema,) = [t["function"]["parameters"] for t in tools if t["function"]["name"] == call["name"]]
            jsonschema.validate(json.loads(call["arguments"]), schema)
    assert json.dumps(tools) == sent


async def test_the_rendering_bound_covers_what_the_engine_writes_around_the_strings(tiny2k: LlamaModel) -> None:
    """The tiny vocabulary is one character a token: the prompt's tokens stay within the bytes of the
    body's strings (plus a little per string and per template) plus rendering_bytes_bound."""

    def string_bytes(value: Any) -> int:
        if isinstance(value, str):
            return len(value.encode()) + 8
        if isinstance(value, dict):
            return sum(string_bytes(v) for v in value.values())
        if isinstance(value, list):
            return sum(string_bytes(v) for v in value)
        return 0

    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    history: list[dict[str, Any]] = [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Add 1 and 2"},
        {"role": "assistant", "content": None, "tool_calls": [call, call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    for tool_choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        body = {"messages": history, "tools": [WEATHER, ADD], "tool_choice": tool_choice, "max_tokens": 1}
        _, detail = await run(tiny2k, body)
        assert detail["prompt_tokens"] <= string_bytes(body) + 64 + rendering_bytes_bound(body)


def test_merged_chunks_reassemble_into_the_same_reply() -> None:
    """What a frame carries (chunks merged) reassembles like the chunks one by one."""
    one_by_one = [
        {
            "index": 0,
            "tokens": 1,
            "text": "",
            "tool_calls": [
                {"index": 0, "id": "call_a", "type": "function", "function": {"name": "add", "arguments": ""}}
            ],
        },
        {"index": 0, "tokens": 1, "text": "", "tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]},
        {"index": 0, "tokens": 1, "text": "", "tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
        {
            "index": 0,
            "tokens": 1,
            "text": "",
            "tool_calls": [
                {"index": 1, "id": "call_b", "type": "function", "function": {"name": "add", "arguments": "{}"}}
            ],
        },
        {"index": 1, "tokens": 1, "text": "x", "logprobs": [{"token": "x", "logprob": -1.0}]},
        {"index": 1, "tokens": 1, "text": "y", "logprobs": [{"token": "y", "logprob": -2.0}]},
        {"index": 0, "tokens": 0, "text": "", "finish_reason": "tool_calls"},
        {"index": 1, "tokens": 0, "text": "", "finish_reason": "length"},
    ]
    merged = merge_chunks([dict(c) for c in one_by_one])
    assert len(merged) == 4
    assert choices(merged) == choices(one_by_one)
    assert sum(c["tokens"] for c in merged) == 6


@pytest.mark.parametrize("pattern", ["^[^\\s\\S]$", "^(a)\\1$"])
async def test_a_pattern_llama_cpp_cannot_parse_is_refused_before_any_prompt_is_decoded(
    tiny: LlamaModel, pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request checks take these patterns, llama.cpp's grammar parser does not: the engine built the
    grammar only for the first token, after the prompt was decoded (work no one was billed for)."""
    import llama_cpp

    decoded: list[int] = []
    decode, evaluate = llama_cpp.llama_decode, LlamaModel._eval_prompt

    def counted_decode(ctx: Any, batch: Any) -> Any:
        decoded.append(batch.n_tokens)
        return decode(ctx, batch)

    def counted_eval(self: LlamaModel, llama: Any, tokens: Any, owner: str) -> Any:
        decoded.append(len(tokens))
        return evaluate(self, llama, tokens, owner)

    monkeypatch.setattr(llama_cpp, "llama_decode", counted_decode)
    monkeypatch.setattr(LlamaModel, "_eval_prompt", counted_eval)
    schema = {"type": "string", "pattern": pattern}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(ClawnodeError) as raised:
        await run(tiny, {"messages": ASK, "max_tokens": 8, "response_format": response_format})
    assert raised.value.code == ErrorCode.INVALID_ARGUMENT
    assert "grammar" in raised.value.message and raised.value.message.endswith("(param: response_format)")
    assert decoded == []
