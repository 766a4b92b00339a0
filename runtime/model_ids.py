"""Model ids as the ecosystem writes them, and the capability names built from them.

``Qwen/Qwen2.5-0.5B-Instruct`` (Hugging Face), ``llama3.2:1b`` (Ollama), ``gemma3-270m``,
``hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M``: ASCII letters of either case, digits, ``_``
and ``-``, with ``.``, ``/`` and ``:`` between them. Config (``[[models]] name``), the OpenAI API's
``model``, capability names (``model:<id>``), discovery and the records all use this one rule.

What it refuses by its shape, never by a list of bad words: a URL (``://`` cannot occur: ``/`` and
``:`` must be followed by a letter or digit), a local path (it starts with a letter or digit, so no
leading ``/``, ``~`` or ``.``; no ``..``, ``./``, ``//``, no backslash), whitespace and control
characters (not in the alphabet), and anything longer than :data:`MODEL_ID_MAX_LENGTH`.

The patterns use no look-around (pydantic's Rust regex engine has none) and are anchored with
``^…$``; call ``fullmatch`` with Python's ``re`` (there ``$`` also matches before a final newline).
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal

from pydantic import Field

MODEL_ID_MAX_LENGTH: Final = 128
CAPABILITY_KINDS: Final = ("model", "embedding", "search", "storage", "verify", "layers")
CAPABILITY_NAME_MAX_LENGTH: Final = len("embedding:") + MODEL_ID_MAX_LENGTH

# One letter or digit, then pieces: a letter, digit, "_" or "-"; a "." before one of those; a "/" or
# ":" before a letter or digit. The repetition bound keeps the regex alone bounded (at most 255
# characters); fields add ``max_length`` for the exact limit.
_ID_BODY: Final = r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-]|[/:][A-Za-z0-9]){0,127}"
MODEL_ID_PATTERN: Final = rf"^{_ID_BODY}$"
CAPABILITY_NAME_PATTERN: Final = rf"^(?:{'|'.join(CAPABILITY_KINDS)}):{_ID_BODY}$"

# For pydantic fields: the pattern and the exact length limit together.
ModelId = Annotated[
    str, Field(min_length=1, max_length=MODEL_ID_MAX_LENGTH, pattern=MODEL_ID_PATTERN, examples=["llama3.2:1b"])
]
CapabilityName = Annotated[
    str,
    Field(
        max_length=CAPABILITY_NAME_MAX_LENGTH,
        pattern=CAPABILITY_NAME_PATTERN,
        examples=["model:Qwen/Qwen2.5-0.5B-Instruct"],
    ),
]

# What a model's provider may serve beyond free text, as its capability record lists them
# (``ModelFacts.features``): tool calls, output constrained to a JSON Schema (``json_object`` too),
# log probabilities, several choices (``n`` > 1). protocols.machines.model_features says which a
# request needs; the engine's ``LlamaModel.features()`` says which a loaded model serves.
ModelFeature = Literal["tools", "json_schema", "logprobs", "n"]
MODEL_FEATURES: Final[tuple[ModelFeature, ...]] = ("tools", "json_schema", "logprobs", "n")

_MODEL_ID = re.compile(MODEL_ID_PATTERN)
_CAPABILITY_NAME = re.compile(CAPABILITY_NAME_PATTERN)


def is_model_id(value: object) -> bool:
    """Whether ``value`` is a model id this node accepts (a string of the right shape and length)."""
    return isinstance(value, str) and len(value) <= MODEL_ID_MAX_LENGTH and _MODEL_ID.fullmatch(value) is not None


def is_capability_name(value: object) -> bool:
    """Whether ``value`` is ``<kind>:<model id>`` with a known kind."""
    return (
        isinstance(value, str)
        and len(value) <= CAPABILITY_NAME_MAX_LENGTH
        and _CAPABILITY_NAME.fullmatch(value) is not None
        and len(value.split(":", 1)[1]) <= MODEL_ID_MAX_LENGTH
    )
