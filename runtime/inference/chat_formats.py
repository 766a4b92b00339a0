"""What a chat format can render, and a conversation rewritten into what it can.

The conversation comes in OpenAI's shape (roles ``system``, ``user``, ``assistant``, ``tool``;
``content`` may be null; an assistant message may carry ``tool_calls``). A chat format that lacks
a slot gets the same information in a form it has:

* no system slot (``gemma``, or a Jinja template that never mentions ``system``): the system
  messages are folded into the first user turn, ``<system text>\\n\\n<user text>``;
* no ``tool_calls`` in the template: an assistant's earlier calls are written into its content in
  the generic tool-call format (see ``tools.py``);
* no ``tool`` role in the template: a tool result becomes a user turn
  ``<tool_response>\\n<content>\\n</tool_response>`` (consecutive results share one turn);
* no tools slot: the tool list is a system text (``tools.generic_tools_text``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.tools import RESPONSE_CLOSE, RESPONSE_OPEN, ToolUse, generic_tools_text, render_call
from runtime.jsonsafe import loads_bounded

Message = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 1024
MAX_TOOL_CALLS_PER_MESSAGE = 64


@dataclass(frozen=True)
class TemplateSlots:
    family: str  # "gguf-template" or a llama-cpp-python chat format name (e.g. "gemma")
    system: bool = True
    tools: bool = False
    tool_calls: bool = False
    tool_role: bool = False

    @classmethod
    def of(cls, chat_format: str, template: str | None) -> TemplateSlots:
        if chat_format == "gguf-template" and template:
            return cls(
                family=chat_format,
                # A template that writes each message's role as given has every role's slot.
                system="system" in template or "message['role']" in template or "message.role" in template,
                tools="tools" in template,
                tool_calls="tool_calls" in template,
                tool_role="'tool'" in template or '"tool"' in template,
            )
        return cls(family=chat_format, system=chat_format not in ("gemma",))


def check_messages(messages: Any) -> None:
    """The engine's own check of a conversation (it comes from strangers)."""
    if not isinstance(messages, list) or not messages:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "messages must be a non-empty list (param: messages)")
    if len(messages) > MAX_MESSAGES:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"at most {MAX_MESSAGES} messages (param: messages)")
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        ok = role in ROLES and (isinstance(content, str) or (content is None and role in ("assistant", "tool")))
        if ok and calls is not None:
            ok = (
                role == "assistant"
                and isinstance(calls, list)
                and len(calls) <= MAX_TOOL_CALLS_PER_MESSAGE
                and all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)
            )
        if not ok:
            raise ClawnodeError(
                ErrorCode.INVALID_ARGUMENT,
                f"messages[{index}] must be an object with role system|user|assistant|tool and string content "
                "(null only for assistant or tool; tool_calls only for assistant) (param: messages)",
            )


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """An earlier call for a template that renders ``tool_calls``: arguments as an object, as HF templates expect."""
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = loads_bounded(arguments, what="a tool call's arguments")
        except (ValueError, ClawnodeError):
            pass  # kept as the client sent it: a string
    return {"id": call.get("id", ""), "type": "function", "function": function}


def prepare_messages(messages: list[Message], slots: TemplateSlots, tools: ToolUse | None) -> list[Message]:
    """``messages`` rewritten for a format with ``slots`` (see the module doc); a new list."""
    out: list[Message] = []
    for message in messages:
        role = message["role"]
        content = message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            if slots.tool_calls:
                out.append(
                    {
                        "role": "assistant",
                        "content": content,
                        "tool_calls": [_template_call(c) for c in message["tool_calls"]],
                    }
                )
            else:
                calls = "\n".join(render_call(c) for c in message["tool_calls"])
                out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        elif role == "tool" and not slots.tool_role:
            text = RESPONSE_OPEN + content + RESPONSE_CLOSE
            if out and out[-1].get("_tool_response"):
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_tool_response": True})
        elif role == "tool":
            entry = {"role": "tool", "content": content}
            if isinstance(message.get("tool_call_id"), str):
                entry["tool_call_id"] = message["tool_call_id"]
            if isinstance(message.get("name"), str):
                entry["name"] = message["name"]
            out.append(entry)
        else:
            out.append({"role": role, "content": content})
    for message in out:
        message.pop("_tool_response", None)
    if tools is not None and tools.active and not slots.tools:
        text = generic_tools_text(tools)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}" if out[0]["content"] else text}
        else:
            out.insert(0, {"role": "system", "content": text})
    if not slots.system:
        out = _fold_system(out)
    return out


def _fold_system(messages: list[Message]) -> list[Message]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for index, message in enumerate(rest):
        if message["role"] == "user":
            rest[index] = {**message, "content": f"{system}\n\n{message['content']}"}
            return rest
    return [{"role": "user", "content": system}, *rest]
