"""Grammar-constrained decoding: JSON Schemas and tool calls as llama.cpp GBNF grammars.

A schema from a request is checked first (size, depth, and only keywords the grammar can enforce:
a reply that passes the grammar must validate against the schema), then turned into GBNF with
llama-cpp-python's ``SchemaConverter`` (a port of llama.cpp's ``json_schema_to_grammar``). The
grammar runs as llama.cpp's own grammar sampler (``llama_sampler_init_grammar``) on logits the
engine's token loop holds in numpy: :class:`GrammarConstraint` asks it whether one token is
allowed (microseconds), which of a shortlist are (0.1 ms for 64), or masks the whole vocabulary
(milliseconds: the last resort, see ``sampling.py``), then advances it with the token chosen.

Refused, with ``INVALID_ARGUMENT`` naming the request param: a schema that is not a JSON object,
is larger than :data:`MAX_SCHEMA_BYTES` or deeper than :data:`MAX_SCHEMA_DEPTH`, is not a valid
JSON Schema, uses a keyword listed in :data:`UNENFORCED_KEYWORDS` (``oneOf``, numeric bounds,
``not``, ...): decoding could not keep a reply valid under them, or has a ``pattern`` that repeats
what can match nothing (``(a?){n}``, ``(a*)*``: llama.cpp's grammar engine takes seconds a token on it).
"""

from __future__ import annotations

import copy
import ctypes
import json
import math
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from runtime.errors import ClawnodeError, ErrorCode

if TYPE_CHECKING:  # numpy loads with the engine's first generation, not at the node's start
    import numpy as np

MAX_SCHEMA_BYTES = 16_384  # a schema as compact JSON
MAX_SCHEMA_DEPTH = 12  # nested objects/arrays of a schema document
MAX_GRAMMAR_BYTES = 256_000  # the GBNF a request's schemas (all tools together) turn into
# Repetition counts (minLength, maxLength, minItems, maxItems, a pattern's {m,n}) become that many
# nested groups in the grammar: 10**8 took the converter 48 s and 6 GB, 20 000 overflowed the stack
# of llama.cpp's grammar parser (the process died). Bounded per count and per schema.
MAX_SCHEMA_REPEAT = 1000
MAX_SCHEMA_REPEAT_TOTAL = 16_000
_REPEAT_KEYWORDS = frozenset({"minLength", "maxLength", "minItems", "maxItems"})
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")

# Keywords whose constraint the GBNF converter does not enforce: a grammar-valid reply could fail
# validation, so a schema using them is refused rather than honoured half way.
UNENFORCED_KEYWORDS = frozenset(
    {
        "oneOf",
        "allOf",
        "not",
        "if",
        "then",
        "else",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "patternProperties",
        "propertyNames",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "minProperties",
        "maxProperties",
        "unevaluatedProperties",
        "unevaluatedItems",
        "$dynamicRef",
        "$recursiveRef",
    }
)
# Keywords whose value is a map of names to schemas (their keys are names, not keywords).
_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions"})
# Keywords whose value is data, never a schema.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "description", "title", "required"})


def invalid(message: str, param: str) -> ClawnodeError:
    return ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"{message} (param: {param})")


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _count(digits: str) -> int:
    return int(digits) if len(digits) <= 6 else MAX_SCHEMA_REPEAT_TOTAL + 1


def _repeats(schema: Any) -> Iterator[int]:
    """Every repetition count in a schema document (names under ``properties`` are not keywords)."""
    if isinstance(schema, list):
        for item in schema:
            yield from _repeats(item)
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if key in _DATA_KEYWORDS:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for sub in value.values():
                yield from _repeats(sub)
        elif key in _REPEAT_KEYWORDS and isinstance(value, int):
            yield value
        elif key == "pattern" and isinstance(value, str):
            for low, high in _QUANTIFIER.findall(value):
                yield max(_count(low), _count(high or "0"))
        else:
            yield from _repeats(value)


def _check_keywords(schema: Any, param: str) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise invalid("a JSON Schema must be an object", param)
    for key, value in schema.items():
        if key in UNENFORCED_KEYWORDS:
            raise invalid(f"JSON Schema keyword {key!r} is not supported by constrained decoding", param)
        if key in _DATA_KEYWORDS:
            continue
        if key in _SCHEMA_MAPS:
            if not isinstance(value, dict):
                raise invalid(f"JSON Schema {key!r} must be an object", param)
            for sub in value.values():
                _check_keywords(sub, param)
        elif key in ("items", "additionalProperties") and isinstance(value, dict | bool):
            _check_keywords(value, param)
        elif key in ("anyOf", "prefixItems", "items"):
            if not isinstance(value, list) or not value:
                raise invalid(f"JSON Schema {key!r} must be a non-empty list", param)
            for sub in value:
                _check_keywords(sub, param)
        elif key == "pattern" and isinstance(value, str):
            if not (value.startswith("^") and value.endswith("$")):
                raise invalid("a JSON Schema pattern must be anchored with ^ and $", param)
            if _repeats_empty(value):
                raise invalid(
                    "a JSON Schema pattern must not repeat what can match nothing (as (a?){n}, (a*)*, (|a)+)", param
                )


def _repeats_empty(pattern: str) -> bool:
    """Whether ``pattern`` repeats (more than once) something that can match the empty string.

    llama.cpp's grammar engine keeps one stack per way the text so far can have matched: under such
    a repetition the ways multiply, and each token took seconds (``^(a?){1000}$``: 2 to 4 s a token,
    on the engine's one worker thread, whoever else was waiting). A pattern Python cannot parse
    counts as one (jsonschema's own check already refuses what is not a regex)."""
    from re import _constants as c  # type: ignore[attr-defined]
    from re import _parser  # type: ignore[attr-defined]

    try:
        parsed = _parser.parse(pattern)
    except Exception:  # noqa: BLE001 - re.error, or a recursion error on a deep nest
        return True
    repeats = (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT)
    found = False

    def nullable(items: Any) -> bool:
        """Whether the sequence ``items`` can match nothing; sets ``found`` on a repeated nullable body."""
        nonlocal found
        empty = True
        for op, arg in items:
            if op in repeats:
                low, high, body = arg
                inner = nullable(body)
                if inner and high > 1:
                    found = True
                item = low == 0 or inner
            elif op == c.SUBPATTERN:  # (group, add flags, del flags, items)
                item = nullable(arg[-1])
            elif op == c.ATOMIC_GROUP:
                item = nullable(arg)
            elif op == c.BRANCH:
                item = any([nullable(branch) for branch in arg[1]])  # a list: every branch is looked at
            elif op in (c.AT, c.ASSERT, c.ASSERT_NOT, c.GROUPREF, c.GROUPREF_EXISTS):
                item = True  # zero width, or what a group matched (which may be nothing)
            else:  # a character, a class, any character
                item = False
            empty = empty and item
        return empty

    try:
        nullable(parsed)
    except RecursionError:
        return True
    return found


def check_schema(schema: Any, param: str) -> dict[str, Any]:
    """Bound and validate a JSON Schema from a request; return it (a dict)."""
    if not isinstance(schema, dict):
        raise invalid("the JSON Schema must be an object", param)
    try:
        size = len(json.dumps(schema, separators=(",", ":")))
    except (TypeError, ValueError):
        raise invalid("the JSON Schema is not JSON", param) from None
    if size > MAX_SCHEMA_BYTES:
        raise invalid(f"the JSON Schema is larger than {MAX_SCHEMA_BYTES} bytes", param)
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise invalid(f"the JSON Schema nests deeper than {MAX_SCHEMA_DEPTH}", param)
    counts = list(_repeats(schema))
    if any(count > MAX_SCHEMA_REPEAT for count in counts) or sum(counts) > MAX_SCHEMA_REPEAT_TOTAL:
        raise invalid(
            f"the JSON Schema repeats more than {MAX_SCHEMA_REPEAT} times in one place or "
            f"{MAX_SCHEMA_REPEAT_TOTAL} in all (minLength, maxLength, minItems, maxItems, a pattern's {{m,n}})",
            param,
        )
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        raise invalid(f"invalid JSON Schema: {error.message[:200]}", param) from None
    _check_keywords(schema, param)
    return schema


class GrammarBuilder:
    """Several JSON Schemas (and hand-written rules) in one GBNF grammar."""

    def __init__(self) -> None:
        from llama_cpp.llama_grammar import SchemaConverter

        self._converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self._extra: dict[str, str] = {}
        self._count = 0

    def schema(self, schema: dict[str, Any], name: str, param: str) -> str:
        """Add ``schema`` under the rule ``name``; return the rule's name."""
        try:
            # The converter rewrites $refs in place, and keys them by this name: a copy, its own name.
            self._count += 1
            resolved = self._converter.resolve_refs(copy.deepcopy(schema), f"schema{self._count}")
            return str(self._converter.visit(resolved, name))
        except (AssertionError, AttributeError, KeyError, ValueError, TypeError, RecursionError, IndexError) as error:
            raise invalid(f"the JSON Schema cannot be enforced: {str(error)[:200]}", param) from None

    def rule(self, name: str, body: str) -> None:
        self._extra[name] = body

    def build(self, param: str) -> str:
        # The converter's string characters include raw control characters, which JSON forbids.
        text = self._converter.format_grammar().replace(_LOOSE_CHAR, _JSON_CHAR)
        if self._extra:
            text += "\n" + "\n".join(f"{name} ::= {body}" for name, body in self._extra.items())
        if len(text) > MAX_GRAMMAR_BYTES:
            raise invalid("the schemas make too large a grammar", param)
        return text


_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x00-\\x1F] |'


def literal(text: str) -> str:
    """A GBNF string literal."""
    return json.dumps(text, ensure_ascii=False)


def schema_grammar(schema: dict[str, Any], param: str = "response_format") -> str:
    builder = GrammarBuilder()
    builder.schema(schema, "", param)  # "" is the converter's name for the root rule
    return builder.build(param)


JSON_OBJECT_GRAMMAR_SCHEMA: dict[str, Any] = {"type": "object"}


class GrammarConstraint:
    """llama.cpp's grammar sampler over one generation (made and used on the engine's worker)."""

    def __init__(self, vocab: Any, n_vocab: int, grammar: str, param: str) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self._sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if not self._sampler:
            raise invalid("the grammar could not be parsed", param)
        self.grammar = grammar
        self.n_vocab = n_vocab
        self._one_data = (llama_cpp.llama_token_data * 1)()
        self._one = llama_cpp.llama_token_data_array(data=self._one_data, size=1, selected=-1, sorted=False)
        self._all: Any = None

    def allows(self, token: int) -> bool:
        self._one_data[0].id = token  # type: ignore[assignment]
        self._one_data[0].logit = 0.0
        self._one_data[0].p = 0.0
        self._one.size = 1
        self._llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._one))
        return bool(math.isfinite(self._one_data[0].logit))

    def allowed_among(self, ids: np.ndarray) -> np.ndarray:
        """Which of the tokens ``ids`` the grammar allows here (one pass over just those)."""
        import llama_cpp
        import numpy as np

        data = (llama_cpp.llama_token_data * len(ids))()
        for slot, token in zip(data, ids, strict=True):
            slot.id = int(token)
            slot.logit = 0.0
        candidates = llama_cpp.llama_token_data_array(data=data, size=len(ids), selected=-1, sorted=False)
        self._llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(candidates))
        return np.array([math.isfinite(slot.logit) for slot in data[: candidates.size]], dtype=bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar refuses here set to -inf."""
        import numpy as np
        from llama_cpp._internals import LlamaTokenDataArray

        if self._all is None:
            self._all = LlamaTokenDataArray(n_vocab=self.n_vocab)
        self._all.copy_logits(logits.astype(np.single, copy=False))
        self._llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._all.candidates))
        masked: np.ndarray = np.array(self._all.candidates_data.logit, dtype=np.float64)
        return masked

    def accept(self, token: int) -> None:
        self._llama_cpp.llama_sampler_accept(self._sampler, token)

    def close(self) -> None:
        if self._sampler:
            self._llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None
