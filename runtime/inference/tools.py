"""Tool calling for any model: the tool list in the prompt, calls constrained by a grammar, parsed.

**Prompt.** Where the model's chat template has a tools slot (a Jinja template that reads
``tools``) the tool list is handed to the template. Otherwise the *generic format*: a system text
(:func:`generic_tools_text`) lists each function as one JSON line ``{"name", "description",
"parameters"}`` and tells the model the exact output format below.

**Output.** Either free text, or one or more calls, each written as::

    <tool_call>
    {"name": "<function name>", "arguments": {<the arguments as JSON>}}
    </tool_call>

(calls separated by one newline). A grammar (:func:`tools_grammar`) enforces it: with
``tool_choice`` ``auto`` the reply is text that does not start with ``<``, or calls; with
``required`` or a named function it is calls only (of that function when named); with
``parallel_tool_calls`` false exactly one call. Each call's ``arguments`` are constrained by that
tool's ``parameters`` JSON Schema, so they validate. ``none`` leaves the tools out of the prompt
and the output free.

**Parsing.** :class:`ToolCallParser` turns the streamed text into OpenAI's streamed
``tool_calls`` deltas: the first delta of a call carries ``id`` (``call_<24 hex>``), ``type`` and
``function.name``, the next ones pieces of ``function.arguments``; the pieces joined are the
arguments JSON.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from runtime.errors import ClawnodeError
from runtime.inference.grammar import GrammarBuilder, check_schema, invalid, literal
from runtime.jsonsafe import loads_bounded

MAX_TOOLS = 64
# All tools' parameter schemas together, as compact JSON: each is checked (jsonschema, the grammar
# converter) in a worker thread, and 64 schemas of 16 KB took about 30 s of CPU for one request.
MAX_TOOLS_SCHEMA_BYTES = 65_536
MAX_DESCRIPTION = 2048
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CALL_OPEN = "<tool_call>\n"
CALL_HEAD = CALL_OPEN + '{"name": "'
ARGS_SEP = '", "arguments": '
CALL_TAIL = "}\n</tool_call>"
RESPONSE_OPEN = "<tool_response>\n"
RESPONSE_CLOSE = "\n</tool_response>"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolUse:
    """The tools of a request and how they may be used."""

    tools: tuple[Tool, ...]
    choice: str  # auto | required | none | the name of the function it must call
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice not in ("auto", "none")


def parse_tools(tools: Any, tool_choice: Any, parallel_tool_calls: Any) -> ToolUse | None:
    """The ``tools``, ``tool_choice`` and ``parallel_tool_calls`` of a body, checked; None without tools."""
    if parallel_tool_calls is None:
        parallel_tool_calls = True
    if not isinstance(parallel_tool_calls, bool):
        raise invalid("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise invalid("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise invalid("tools must be a list", "tools")
    if len(tools) > MAX_TOOLS:
        raise invalid(f"at most {MAX_TOOLS} tools", "tools")
    parsed: list[Tool] = []
    schema_bytes = 0
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise invalid(f"tools[{index}] must be a function tool", "tools")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(f"tools[{index}].function must be an object", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise invalid(f"tools[{index}].function.name must match [A-Za-z0-9_-]{{1,64}}", "tools")
        description = function.get("description") or ""
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
            raise invalid(f"tools[{index}].function.description must be a string of at most {MAX_DESCRIPTION}", "tools")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        try:
            schema_bytes += len(json.dumps(parameters, separators=(",", ":")))
        except (TypeError, ValueError):
            raise invalid(f"tools[{index}].function.parameters is not JSON", "tools") from None
        if schema_bytes > MAX_TOOLS_SCHEMA_BYTES:
            raise invalid(f"the tools' parameter schemas hold more than {MAX_TOOLS_SCHEMA_BYTES} bytes in all", "tools")
        parameters = check_schema(parameters, "tools")
        if parameters.get("type", "object") != "object":
            raise invalid(f"tools[{index}].function.parameters must describe an object", "tools")
        if any(t.name == name for t in parsed):
            raise invalid(f"two tools are named {name!r}", "tools")
        parsed.append(Tool(name, description, parameters))
    if tool_choice is None:
        choice = "auto"
    elif tool_choice in ("auto", "none", "required"):
        choice = str(tool_choice)
    elif (
        isinstance(tool_choice, dict)
        and tool_choice.get("type") == "function"
        and isinstance(tool_choice.get("function"), dict)
    ):
        choice = tool_choice["function"].get("name")
        if not any(t.name == choice for t in parsed):
            raise invalid(f"tool_choice names no tool in tools: {str(choice)[:64]!r}", "tool_choice")
    else:
        raise invalid("tool_choice must be auto, none, required or {type: function, function: {name}}", "tool_choice")
    return ToolUse(tuple(parsed), choice, parallel_tool_calls)


def tools_grammar(use: ToolUse) -> str:
    """The GBNF of a reply under ``use`` (free text and/or calls, see the module doc)."""
    builder = GrammarBuilder()
    alternatives = []
    for index, tool in enumerate(use.tools):
        if use.forced and use.choice != "required" and tool.name != use.choice:
            continue
        args = builder.schema(tool.parameters, f"args{index}", "tools")
        builder.rule(f"tool{index}", f"{literal(tool.name + ARGS_SEP)} {args}")
        alternatives.append(f"tool{index}")
    builder.rule("call", f"{literal(CALL_HEAD)} ({' | '.join(alternatives)}) {literal(CALL_TAIL)}")
    builder.rule("calls", 'call ("\\n" call)*' if use.parallel else "call")
    if use.forced:
        builder.rule("root", "calls")
    else:
        builder.rule("text", "([^<] [^\\x00]*)?")
        builder.rule("root", "calls | text")
    return builder.build("tools")


def generic_tools_text(use: ToolUse) -> str:
    """The system text that describes the tools where the template has no tools slot."""
    lines = ["You can call these functions (the arguments of each follow its JSON Schema):"]
    for tool in use.tools:
        lines.append(json.dumps({"name": tool.name, "description": tool.description, "parameters": tool.parameters}))
    lines.append("To call a function, reply with this block and nothing else:")
    lines.append(CALL_OPEN + '{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>')
    if use.choice == "required":
        lines.append("You must call at least one function.")
    elif use.forced:
        lines.append(f"You must call the function {use.choice}.")
    else:
        lines.append("If no function is needed, answer in plain text.")
    lines.append("Write one block per call, one after another." if use.parallel else "Call one function at most.")
    lines.append("A function's result comes back as " + RESPONSE_OPEN + "...\n</tool_response>.")
    return "\n".join(lines)


def render_call(call: dict[str, Any]) -> str:
    """An assistant's earlier call (OpenAI shape) in the generic output format."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = loads_bounded(arguments, what="a tool call's arguments")
        except (ValueError, ClawnodeError):
            pass  # kept as the client sent it: a string
    body = json.dumps({"name": function.get("name", ""), "arguments": arguments if arguments is not None else {}})
    return CALL_OPEN + body + "\n</tool_call>"


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallParser:
    """Streamed reply text → (plain text, ``tool_calls`` deltas), for one choice."""

    def __init__(self, forced: bool) -> None:
        self.mode = "calls" if forced else "undecided"
        self.state = "head"
        self.buf = ""
        self.calls = 0
        self.depth = 0
        self.in_string = False
        self.escape = False

    @property
    def called(self) -> bool:
        return self.calls > 0

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        if self.mode == "undecided" and text:
            self.mode = "calls" if text.startswith("<") else "text"
        if self.mode == "text":
            return text, []
        self.buf += text
        deltas: list[dict[str, Any]] = []
        while True:
            if self.state == "head":
                self.buf = self.buf.lstrip("\n") if self.calls else self.buf
                if len(self.buf) < len(CALL_HEAD):
                    break
                self.buf = self.buf[len(CALL_HEAD) :]
                self.state = "name"
            elif self.state == "name":
                end = self.buf.find(ARGS_SEP)
                if end < 0:
                    break
                name, self.buf = self.buf[:end], self.buf[end + len(ARGS_SEP) :]
                deltas.append(
                    {
                        "index": self.calls,
                        "id": new_call_id(),
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                )
                self.state, self.depth, self.in_string, self.escape = "args", 0, False, False
            elif self.state == "args":
                taken = self._scan_args()
                if taken:
                    deltas.append({"index": self.calls, "function": {"arguments": self.buf[:taken]}})
                    self.buf = self.buf[taken:]
                if self.state == "args":
                    break
            else:  # tail
                self.buf = self.buf.lstrip(" ")
                if len(self.buf) < len(CALL_TAIL):
                    break
                self.buf = self.buf[len(CALL_TAIL) :]
                self.calls += 1
                self.state = "head"
        return "", merge_deltas(deltas)

    def _scan_args(self) -> int:
        for i, char in enumerate(self.buf):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif char == "\\":
                    self.escape = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.state = "tail"
                    return i + 1
        return len(self.buf)


def merge_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join consecutive deltas of one call into one (a first delta keeps its id, type and name); new dicts."""
    merged: list[dict[str, Any]] = []
    for delta in deltas:
        if merged and merged[-1]["index"] == delta["index"] and "id" not in delta:
            merged[-1]["function"]["arguments"] += delta["function"]["arguments"]
        else:
            merged.append({**delta, "function": dict(delta["function"])})
    return merged


GENERIC_TEXT_FIXED_BYTES = 512  # the instruction lines of generic_tools_text, a named function included
PER_TOOL_BYTES = 64  # a tool's line beyond its own JSON (a default parameters schema, the newline)
CALL_WRAPPER_BYTES = 64  # an earlier call's "<tool_call>\n{"name": …, "arguments": …}\n</tool_call>" and newline
RESPONSE_WRAPPER_BYTES = 40  # a tool result's "<tool_response>\n…\n</tool_response>" and newline


def rendering_bytes_bound(body: Any) -> int:
    """An upper bound on the UTF-8 bytes the engine's generic rendering adds to the strings of a chat
    body (the tool list and its instructions, the wrapper around each earlier call and each tool
    result). A token is at least one byte, so a consumer bounding a prompt's tokens by the bytes of
    the body's strings adds this for what the engine writes around them. Pure: no model needed."""
    if not isinstance(body, dict):
        return 0
    extra = 0
    tools = body.get("tools")
    if isinstance(tools, list) and tools and body.get("tool_choice") != "none":
        try:
            extra += len(json.dumps(tools).encode()) + PER_TOOL_BYTES * len(tools) + GENERIC_TEXT_FIXED_BYTES
        except (TypeError, ValueError):
            extra += GENERIC_TEXT_FIXED_BYTES
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            extra += CALL_WRAPPER_BYTES * len(calls)
        if message.get("role") == "tool":
            extra += RESPONSE_WRAPPER_BYTES
    return extra
