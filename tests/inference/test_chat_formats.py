"""The chat formats a v4 commitment body may name (``signable_chat_formats``) render a conversation as
it is: every message's text, and no text of their own beyond the role markup. A verifier renders a
signed request in the provider's signed format, so a format that dropped a message, or added prose
the consumer never sent (and pays for as prompt tokens), would let a provider sign its way to another
prompt than the request's. The formats left out are left out for exactly that, as rendered here."""

from __future__ import annotations

import re

import pytest

from runtime.inference.chat_formats import TemplateSlots, prepare_messages
from runtime.inference.engine import FAITHFUL_CHAT_FORMATS, _named_formatter, signable_chat_formats

MARKERS = ("SYSTEMQQ", "USERONEQQ", "ASSISTANTQQ", "USERTWOQQ")
PROBE = [
    {"role": "system", "content": MARKERS[0]},
    {"role": "user", "content": MARKERS[1]},
    {"role": "assistant", "content": MARKERS[2]},
    {"role": "user", "content": MARKERS[3]},
]
# Prose: four words or more in a row (role markup is one to three: "GPT4 Correct User", "### Response").
PROSE = re.compile(r"[A-Za-z]+(?: [A-Za-z]+){3,}")
# Left out of FAITHFUL_CHAT_FORMATS, each for what the probe shows.
UNFAITHFUL = ("open-orca", "openbuddy", "phind", "qwen", "snoozy", "mistral-instruct", "intel", "saiga")


def _render(name: str, messages: list[dict[str, str]]) -> str:
    return str(_named_formatter(name)(messages=prepare_messages(messages, TemplateSlots.of(name, None), None)).prompt)


def _faithful(name: str) -> bool:
    with_system, without = _render(name, PROBE), _render(name, PROBE[1:])
    kept = all(marker in with_system for marker in MARKERS) and all(marker in without for marker in MARKERS[1:])
    return kept and not any(PROSE.search(text) for text in (with_system, without))


@pytest.mark.parametrize("name", sorted(signable_chat_formats() - {"gguf-template"}))
def test_a_signable_format_renders_every_message_and_no_text_of_its_own(name: str) -> None:
    assert _faithful(name), _render(name, PROBE[1:])


@pytest.mark.parametrize("name", UNFAITHFUL)
def test_a_format_left_out_drops_a_message_or_adds_text(name: str) -> None:
    assert name not in FAITHFUL_CHAT_FORMATS and name not in signable_chat_formats()
    assert not _faithful(name)


def test_signable_names_are_spelt_exactly() -> None:
    signable = signable_chat_formats()
    assert {"gguf-template", "chatml", "gemma", "llama-2", "llama-3"} <= signable
    assert "gem-ma" not in signable and "llama2" not in signable
