"""A JSON Schema's repetition counts are bounded before any grammar is built.

``maxLength``/``maxItems`` (and a pattern's ``{m,n}``) expand into nested optional groups: a count of
10**8 took the converter 48 s and 6 GB on the trio loop, and a count of 20 000 (a 140 KB grammar,
under the grammar bound) crashed the process with a stack overflow inside llama.cpp's grammar
parser. One request from a stranger buying a lease could do either to a provider.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.engine import LlamaModel
from runtime.inference.grammar import MAX_SCHEMA_REPEAT, check_schema
from runtime.inference.service import ChatService

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

HOSTILE: list[dict[str, Any]] = [
    {"type": "string", "maxLength": 10**8},
    {"type": "string", "minLength": 30_000},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 10**8},
    {"type": "array", "items": {"type": "integer"}, "minItems": 20_000},
    {"type": "string", "pattern": "^a{0,20000}$"},
    {"type": "string", "pattern": "^(ab){30000,}$"},
    {"type": "object", "properties": {"a": {"type": "string", "pattern": "^x{1, 99999999}$"}}},
    # Each count within the bound, their sum far above it.
    {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": MAX_SCHEMA_REPEAT} for i in range(40)}},
]


@pytest.mark.parametrize("schema", HOSTILE, ids=lambda s: json.dumps(s)[:48])
def test_huge_repetition_counts_are_refused_naming_the_param(schema: dict[str, Any]) -> None:
    with pytest.raises(ClawnodeError) as raised:
        check_schema(schema, "response_format")
    assert raised.value.code == ErrorCode.INVALID_ARGUMENT
    assert raised.value.message.endswith("(param: response_format)")


async def test_a_schema_at_the_bound_is_still_served(tiny_path: Path) -> None:
    schema = {"type": "string", "pattern": f"^a{{0,{MAX_SCHEMA_REPEAT}}}$"}
    model = LlamaModel(tiny_path, name="tiny", n_ctx=512, n_threads=1)
    await model.load()
    try:
        chunks: list[dict[str, Any]] = []

        async def emit(chunk: dict[str, Any]) -> None:
            chunks.append(chunk)

        body = {
            "messages": [{"role": "user", "content": "a"}],
            "max_tokens": 64,
            "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
        }
        await ChatService(model).run(body, emit)
    finally:
        await model.aclose()
    text = "".join(chunk.get("text", "") for chunk in chunks)
    if chunks[-1].get("finish_reason") == "stop":
        jsonschema.validate(json.loads(text), schema)
    assert set(text) <= set('"a ')


async def test_schemas_are_checked_off_the_trio_loop(tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """jsonschema's check of one 13 KB schema takes about 0.5 s, and its conversion to a grammar can
    take seconds: 64 tools held a provider's trio loop (every lease, DHT query and API call) for
    8-13 s per request."""
    from runtime.inference import service, tools

    threads: list[bool] = []

    def watched(real: Any) -> Any:
        def check(schema: Any, param: str) -> Any:
            threads.append(threading.current_thread() is threading.main_thread())
            return real(schema, param)

        return check

    def watched1(real: Any) -> Any:
        def build(*args: Any) -> Any:
            threads.append(threading.current_thread() is threading.main_thread())
            return real(*args)

        return build

    from runtime.inference import engine

    monkeypatch.setattr(tools, "check_schema", watched(tools.check_schema))
    monkeypatch.setattr(service, "check_schema", watched(service.check_schema))
    # Converting schemas to a grammar: 64 tools of 300 optional properties took 8 s.
    for module in (service, engine):
        monkeypatch.setattr(module, "schema_grammar", watched1(module.schema_grammar))
        monkeypatch.setattr(module, "tools_grammar", watched1(module.tools_grammar))
    add = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    model = LlamaModel(tiny_path, name="tiny", n_ctx=2048, n_threads=1)
    await model.load()
    try:

        async def emit(chunk: dict[str, Any]) -> None:
            pass

        messages = [{"role": "user", "content": "a"}]
        tool = {"type": "function", "function": {"name": "add", "parameters": add}}
        await ChatService(model).run({"messages": messages, "max_tokens": 4, "tools": [tool]}, emit)
        schema_format = {"type": "json_schema", "json_schema": {"name": "r", "schema": add}}
        await ChatService(model).run({"messages": messages, "max_tokens": 4, "response_format": schema_format}, emit)
    finally:
        await model.aclose()
    assert threads == [False, False, False, False]  # two checks, two grammars


def test_the_tools_parameter_schemas_are_bounded_in_all() -> None:
    """64 tools of 16 KB schemas each cost ~30 s of CPU to check and convert for one request."""
    from runtime.inference.tools import MAX_TOOLS_SCHEMA_BYTES, parse_tools

    def tool(index: int, filler: int) -> dict[str, Any]:
        properties = {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(filler)}
        return {
            "type": "function",
            "function": {"name": f"t{index}", "parameters": {"type": "object", "properties": properties}},
        }

    each = len(json.dumps(tool(0, 100)["function"]["parameters"], separators=(",", ":")))
    fits = MAX_TOOLS_SCHEMA_BYTES // each
    assert parse_tools([tool(i, 100) for i in range(fits)], "auto", None) is not None
    with pytest.raises(ClawnodeError) as raised:
        parse_tools([tool(i, 100) for i in range(fits + 1)], "auto", None)
    assert raised.value.code == ErrorCode.INVALID_ARGUMENT and raised.value.message.endswith("(param: tools)")
