"""A small random JSON Schema generator: the shapes structured-output clients send, bounded so a
random-weight model's constrained reply ends well inside its token cap."""

from __future__ import annotations

import random
from typing import Any

WORDS = ("name", "age", "city", "tags", "score", "ok", "items", "id", "kind", "note", "level", "unit")


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A schema built from object, array, string (maxLength), integer, number, boolean, null,
    enum, const, anyOf and type unions; objects close with ``additionalProperties: false`` and a
    random subset required."""
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "union"]
    if depth < 3:
        kinds += ["object", "object", "array", "anyOf"]
    kind = rng.choice(kinds)
    if kind == "object" or (depth == 0 and kind not in ("object",)):
        names = rng.sample(WORDS, rng.randint(1, 4))
        return {
            "type": "object",
            "properties": {name: random_schema(rng, depth + 1) for name in names},
            "required": [name for name in names if rng.random() < 0.7],
            "additionalProperties": False,
        }
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1) for _ in range(2)]}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 12), "description": "some text"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, None, True], rng.randint(1, 3))}
    if kind == "const":
        return {"const": rng.choice(["fixed", 7, False])}
    if kind == "union":
        return {"type": ["integer", "null"]}
    return {"type": kind}
