"""JSON from peers, HTTP clients and upstreams nested 300,000 deep: refused or kept as text, never decoded.

py_ecc (imported with web3) raises the recursion limit to 100,000, so ``json.loads`` of 300 KB of
``[`` recurses until the C stack overflows and the node dies with SIGSEGV (this whole test process
would die with it). Every such parse goes through ``runtime.jsonsafe.loads_bounded``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import pytest
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.peer.envelope import Envelope

import runtime.escrow.client  # noqa: F401 - imports py_ecc, which raises the recursion limit
from dht.record_validator import sequence_of
from dht.records import RECORD_DOMAIN, RECORD_PAYLOAD_TYPE, RecordRejected, _content_verdict
from node.anthropic_api import _tool_input
from node.router import _sse_events
from protocols.task_wire import sandbox_terms
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.chat_formats import TemplateSlots, prepare_messages
from runtime.jsonsafe import JSON_TOO_DEEP, MAX_JSON_DEPTH, json_too_deep, loads_bounded
from wire.signed import make_unsigned

DEEP = "[" * 300_000


def test_the_recursion_limit_is_high_enough_to_crash() -> None:
    assert sys.getrecursionlimit() >= 100_000  # else these tests could not fail


def test_loads_bounded_refuses_with_its_stable_reason() -> None:
    with pytest.raises(ClawnodeError) as refused:
        loads_bounded(DEEP.encode())
    assert refused.value.code == ErrorCode.INVALID_ARGUMENT and refused.value.reason == JSON_TOO_DEEP
    assert loads_bounded('{"a": ["' + "[" * 100 + '"]}') == {"a": ["[" * 100]}  # brackets in a string
    nested = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert loads_bounded(nested) is not None and json_too_deep("[" + nested + "]")


def _sealed_raw(payload: bytes) -> bytes:
    """A record envelope around any payload, signed by a stranger's own key (anyone can make one)."""
    key = generate_new_ed25519_identity().private_key
    signature = key.sign(make_unsigned(RECORD_DOMAIN, RECORD_PAYLOAD_TYPE, payload))
    return Envelope(key.get_public_key(), RECORD_PAYLOAD_TYPE, payload, signature).marshal_envelope()


def test_a_dht_record_nested_deep_is_rejected() -> None:
    sealed = _sealed_raw(DEEP.encode())
    verdict = _content_verdict(sealed)
    assert isinstance(verdict, RecordRejected) and verdict.reason.value == "schema_invalid"
    assert sequence_of(sealed) is None


def test_tool_call_arguments_nested_deep_stay_text() -> None:
    """What a client (or a consumer over a lease) sends in an assistant turn's tool call."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": DEEP}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    for slots in (TemplateSlots(family="", tool_calls=True), TemplateSlots(family="")):
        out = prepare_messages(messages, slots, None)  # type: ignore[arg-type]
        assert DEEP in str(out[-1])
    with pytest.raises(ClawnodeError) as refused:  # a model's (or a provider's) reply, on the Anthropic API
        _tool_input(DEEP)
    assert refused.value.code == ErrorCode.INTERNAL


def test_task_params_nested_deep_name_no_sandbox() -> None:
    assert sandbox_terms(DEEP) is None


async def test_an_upstream_event_nested_deep_is_skipped() -> None:
    async def lines() -> AsyncIterator[str]:
        yield "data: " + DEEP
        yield 'data: {"choices": []}'
        yield "data: [DONE]"

    events = [event async for event in _sse_events(lines())]
    assert events == [{"choices": []}]
    await trio.lowlevel.checkpoint()
