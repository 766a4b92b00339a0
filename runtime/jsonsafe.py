"""JSON from outside the process, decoded without letting its nesting reach the decoder's recursion.

Python's JSON decoder recurses once per nesting level, and py_ecc (imported with web3) raises the
interpreter's recursion limit to 100,000: a few hundred thousand ``[`` from a peer, an HTTP client
or an RPC endpoint would overflow the C stack and kill the node with SIGSEGV instead of raising.
Every ``json.loads`` of bytes that came from elsewhere goes through :func:`loads_bounded` (or asks
:func:`json_too_deep` first); pydantic's ``model_validate_json`` has a recursion guard of its own.
"""

from __future__ import annotations

import itertools
import json
import operator
import re
from typing import Any

from runtime.errors import ClawnodeError, ErrorCode

# Deeper than anything this project sends or reads (an RPC receipt's logs are 4 deep; API bodies, tool
# arguments and records a handful), far below what overflows the stack.
MAX_JSON_DEPTH = 64
JSON_TOO_DEEP = "json_too_deep"

# A JSON string, complete or cut off at the end of the text (then the decoder stops there too).
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_OPEN_AS_2 = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def json_depth_exceeds(raw: bytes | str, limit: int) -> bool:
    """True when ``raw``, read as JSON text, nests arrays and objects deeper than ``limit``.

    Works on any bytes, valid JSON or not, without decoding them, at C speed (a 4 MiB body of
    brackets in well under a second). Brackets inside strings do not count. Depth is not clamped at
    zero: a decoder stops at the first stray closing bracket, so what follows one never nests.
    """
    body = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if limit < 0:
        return True
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # cannot nest deeper than the brackets it holds
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    if len(brackets) <= limit:
        return False
    # After i brackets, 2 x (openings so far) - i is the depth; each opening counts 2 here.
    depths = map(operator.sub, itertools.accumulate(brackets.translate(_OPEN_AS_2)), range(1, len(brackets) + 1))
    return max(depths) > limit


def json_too_deep(raw: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``raw`` nests deeper than ``max_depth`` (default :data:`MAX_JSON_DEPTH`)."""
    return json_depth_exceeds(raw, max_depth)


def loads_bounded(raw: bytes | str, *, what: str = "the JSON", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(raw)``, refused ``E_INVALID_ARGUMENT`` ``json_too_deep`` when it nests deeper than
    ``max_depth``; a malformed document raises ``ValueError`` as ``json.loads`` does."""
    if json_depth_exceeds(raw, max_depth):
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"{what} nests deeper than {max_depth} levels", JSON_TOO_DEEP)
    return json.loads(raw)
