"""Canonical JSON: the one byte encoding that is signed and hashed.

Sorted keys, no insignificant whitespace, UTF-8, integers only (a float's text differs between
languages, so a signature over one could not be checked elsewhere). Integers may exceed 2**53
(amounts are wei): other implementations must read them as big integers.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def _check(value: Any) -> None:
    if isinstance(value, float):
        raise ValueError("floats are not allowed in canonical data")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("canonical object keys must be strings")
            _check(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check(item)
    elif not (value is None or isinstance(value, bool | int | str)):
        raise ValueError(f"{type(value).__name__} is not allowed in canonical data")


def canonical_bytes(value: Any) -> bytes:
    _check(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
