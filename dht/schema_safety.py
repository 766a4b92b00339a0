"""JSON Schemas from strangers, made safe to evaluate.

A capability record carries a ``params_schema`` and a ``returns`` schema written by whoever signed
it, and every node that validates the record evaluates them (the record's examples must satisfy its
schema). Three things in a schema could hurt the evaluating node, and each is ruled out here:

- **Regular expressions that backtrack.** ``pattern`` and ``patternProperties`` run on RE2
  (``google-re2``), whose matching time is linear in the input; a pattern RE2 cannot compile
  (back-references, look-around) is refused.
- **References.** ``$ref`` may only point inside the schema (``#/...``) at a subschema, and never
  in a cycle; ``$id``, anchors and dynamic references are refused. Nothing is ever fetched, and a
  reference that does not resolve is a refusal, never an exception.
- **Size and work.** A schema is at most :data:`MAX_SCHEMA_BYTES` of canonical JSON, at most
  :data:`MAX_SCHEMA_DEPTH` deep, and at most :data:`MAX_EXPANDED_NODES` subschemas once every
  reference is expanded (references can otherwise double the work at each level). Evaluating one
  takes at most a time budget (:func:`validation_budget`); running out is a refusal.

:func:`schema_problem` is the pure verdict on a schema; :func:`instance_problems` evaluates one.
"""

from __future__ import annotations

import contextvars
import functools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import re2
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema.validators import extend
from pydantic import BaseModel, ConfigDict

MAX_SCHEMA_BYTES = 4096
MAX_SCHEMA_DEPTH = 32
MAX_EXPANDED_NODES = 2000
MAX_PATTERN_CHARS = 512
# CPU seconds. Enough for every example of a full record many times over (a chat schema against its
# example takes well under a millisecond); a schema that needs more is refused, not waited for.
DEFAULT_BUDGET_S = 0.25

ProblemKind = Literal[
    "not_a_schema",
    "too_large",
    "too_deep",
    "too_complex",
    "forbidden_keyword",
    "nonlocal_ref",
    "unresolvable_ref",
    "ref_cycle",
    "unsafe_pattern",
    "budget_exceeded",
]


class SchemaProblem(BaseModel):
    """Why a schema is refused: a stable kind and a short detail (never the schema itself)."""

    model_config = ConfigDict(frozen=True)

    kind: ProblemKind
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


class SchemaBudgetExceeded(Exception):
    """Evaluating a schema took longer than the budget allowed."""


# Keywords whose value is one subschema, a list of them, or a map of name → subschema (2020-12,
# plus the older spellings jsonschema still honours). Everything else is data, not schema.
_ONE: tuple[str, ...] = ("items", "additionalProperties", "propertyNames", "contains", "not", "if", "then", "else")
_ONE += ("unevaluatedItems", "unevaluatedProperties", "additionalItems")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Change the base URI or resolve at run time: nothing a capability schema needs.
_FORBIDDEN = ("$id", "id", "$anchor", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # RE2 would print the pattern to stderr


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Any:
    return re2.compile(pattern, options=_RE2_OPTIONS)


def pattern_problem(pattern: object) -> str | None:
    """Why ``pattern`` cannot be used (None: RE2 compiles it and it is short enough)."""
    if not isinstance(pattern, str):
        return "a pattern must be a string"
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"a pattern is longer than {MAX_PATTERN_CHARS} characters"
    try:
        _compiled(pattern)
    except Exception:  # noqa: BLE001 - re2.error and friends: the verdict is the same
        return "a pattern RE2 cannot compile (back-references and look-around are not supported)"
    return None


def _pointer_escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _subschemas(node: dict[str, Any], pointer: str) -> Iterator[tuple[str, Any]]:
    for key in _ONE:
        if key in node:
            yield f"{pointer}/{_pointer_escape(key)}", node[key]
    for key in _LIST:
        value = node.get(key)
        if isinstance(value, list):
            for index, item in enumerate(value):
                yield f"{pointer}/{key}/{index}", item
    for key in _MAP:
        value = node.get(key)
        if isinstance(value, dict):
            for name, item in value.items():
                yield f"{pointer}/{_pointer_escape(key)}/{_pointer_escape(str(name))}", item


def _unescape_pointer(pointer: str) -> str:
    """A JSON pointer as written in a ``$ref``, in the spelling :func:`_subschemas` gives pointers."""
    return "/".join(_pointer_escape(token.replace("~1", "/").replace("~0", "~")) for token in pointer.split("/"))


def schema_problem(schema: Any) -> SchemaProblem | None:
    """Whether ``schema`` (a parsed JSON value) is safe to evaluate; None if it is.

    Pure: the same schema always gets the same verdict, and nothing is fetched or evaluated.
    """
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return SchemaProblem(kind="not_a_schema", detail="a schema is an object or a boolean")
    try:
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return SchemaProblem(kind="not_a_schema", detail="not JSON")
    size = len(text.encode())
    if size > MAX_SCHEMA_BYTES:
        return SchemaProblem(kind="too_large", detail=f"{size} bytes, the limit is {MAX_SCHEMA_BYTES}")
    # The same schema is checked again and again (every copy of a record, every example): once is enough.
    return _cached_verdict(text)


@functools.lru_cache(maxsize=512)
def _cached_verdict(text: str) -> SchemaProblem | None:
    return _verdict(json.loads(text))


def _verdict(schema: dict[str, Any]) -> SchemaProblem | None:

    # Every subschema by its JSON pointer, walking only schema positions.
    nodes: dict[str, Any] = {}
    refs: dict[str, str] = {}
    uses_pattern_properties = False
    uses_unevaluated_properties = False
    stack: list[tuple[str, Any, int]] = [("", schema, 0)]
    while stack:
        pointer, node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            return SchemaProblem(kind="too_deep", detail=f"nested deeper than {MAX_SCHEMA_DEPTH}")
        nodes[pointer] = node
        if not isinstance(node, dict):
            continue
        for key in _FORBIDDEN:
            if key in node:
                return SchemaProblem(kind="forbidden_keyword", detail=f"{key} is not allowed")
        if "$ref" in node:
            ref = node["$ref"]
            if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
                return SchemaProblem(kind="nonlocal_ref", detail="$ref may only point inside the schema (#/...)")
            if "%" in ref:  # jsonschema would percent-decode it: one spelling only
                return SchemaProblem(kind="unresolvable_ref", detail="$ref may not be percent-encoded")
            refs[pointer] = _unescape_pointer(ref[1:])
        if "pattern" in node:
            problem = pattern_problem(node["pattern"])
            if problem is not None:
                return SchemaProblem(kind="unsafe_pattern", detail=problem)
        if isinstance(node.get("patternProperties"), dict):
            uses_pattern_properties = True
            for name in node["patternProperties"]:
                problem = pattern_problem(name)
                if problem is not None:
                    return SchemaProblem(kind="unsafe_pattern", detail=problem)
        if "unevaluatedProperties" in node:
            uses_unevaluated_properties = True
        for child_pointer, child in _subschemas(node, pointer):
            stack.append((child_pointer, child, depth + 1))
    if uses_pattern_properties and uses_unevaluated_properties:
        # jsonschema matches those patterns with Python's backtracking engine.
        return SchemaProblem(
            kind="forbidden_keyword", detail="unevaluatedProperties cannot be combined with patternProperties"
        )
    if any(target not in nodes for target in refs.values()):
        return SchemaProblem(kind="unresolvable_ref", detail="a $ref names no subschema of this schema")

    # The size with every reference expanded, memoised per subschema; a cycle is refused.
    expanded: dict[str, int] = {}
    visiting: set[str] = set()

    def weight(pointer: str) -> int:
        if pointer in expanded:
            return expanded[pointer]
        if pointer in visiting:
            raise _Cycle
        visiting.add(pointer)
        node = nodes[pointer]
        total = 1
        if isinstance(node, dict):
            if pointer in refs:
                total += weight(refs[pointer])
            for child_pointer, _ in _subschemas(node, pointer):
                total += weight(child_pointer)
                if total > MAX_EXPANDED_NODES:
                    break
        visiting.discard(pointer)
        expanded[pointer] = min(total, MAX_EXPANDED_NODES + 1)
        return expanded[pointer]

    try:
        total = weight("")
    except _Cycle:
        return SchemaProblem(kind="ref_cycle", detail="$ref cycles are not allowed")
    except RecursionError:
        return SchemaProblem(kind="too_deep", detail="references nest too deeply")
    if total > MAX_EXPANDED_NODES:
        return SchemaProblem(kind="too_complex", detail=f"more than {MAX_EXPANDED_NODES} subschemas once expanded")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        return SchemaProblem(kind="not_a_schema", detail=error.message[:200])
    return None


class _Cycle(Exception):
    pass


# -- evaluation --------------------------------------------------------------------------------

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("schema_deadline", default=None)


@contextmanager
def validation_budget(seconds: float) -> Iterator[None]:
    """Evaluations inside the block stop after ``seconds`` in all (a tighter outer budget wins).

    Seconds of this thread's CPU time, not of the clock: a loaded machine (or a thread waiting for
    the GIL) never makes an honest schema look costly.
    """
    deadline = time.thread_time() + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set(deadline if outer is None else min(outer, deadline))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and _compiled(pattern).search(instance) is None:
        yield ValidationError(f"{instance[:64]!r} does not match {pattern[:64]!r}")


def _pattern_properties(
    validator: Any, pattern_properties: dict[str, Any], instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in pattern_properties.items():
        for key, value in instance.items():
            if _compiled(pattern).search(key) is not None:
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional(instance: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    properties = schema.get("properties", {})
    patterns = [_compiled(p) for p in schema.get("patternProperties", {})]
    return [
        key
        for key in instance
        if key not in properties and not any(pattern.search(key) is not None for pattern in patterns)
    ]


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    extras = _additional(instance, schema)
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        names = ", ".join(repr(extra[:64]) for extra in sorted(extras)[:8])
        yield ValidationError(f"Additional properties are not allowed ({names} unexpected)")


KeywordFn = Callable[[Any, Any, Any, dict[str, Any]], Iterator[ValidationError] | None]


def _budgeted(fn: KeywordFn) -> KeywordFn:
    def check(validator: Any, value: Any, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
        deadline = _DEADLINE.get()
        if deadline is not None and time.thread_time() > deadline:
            raise SchemaBudgetExceeded("schema evaluation ran out of time")
        result = fn(validator, value, instance, schema)
        if result is not None:
            yield from result

    return check


_KEYWORDS: dict[str, KeywordFn] = dict(Draft202012Validator.VALIDATORS)
_KEYWORDS.update(
    pattern=_pattern,
    patternProperties=_pattern_properties,
    additionalProperties=_additional_properties,
)
SafeValidator: Any = extend(Draft202012Validator, validators={name: _budgeted(fn) for name, fn in _KEYWORDS.items()})


def instance_problems(schema: Any, instance: Any, *, limit: int = 8) -> list[str]:
    """Why ``instance`` does not satisfy ``schema`` (empty: it does), at most ``limit`` reasons.

    ``schema`` must have passed :func:`schema_problem`. Raises :class:`SchemaBudgetExceeded` when
    the evaluation outlasts the current :func:`validation_budget` (``DEFAULT_BUDGET_S`` if none).
    """
    with validation_budget(DEFAULT_BUDGET_S):
        problems: list[str] = []
        try:
            for error in SafeValidator(schema).iter_errors(instance):
                problems.append(error.message)
                if len(problems) >= limit:
                    break
        except SchemaBudgetExceeded:
            raise
        except RecursionError:
            raise SchemaBudgetExceeded("schema evaluation nested too deeply") from None
        return problems
