"""A served model's identity: the sha256 of its GGUF file, hashed once per (path, size, mtime)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

CHUNK = 1 << 20
MAX_CACHED = 64  # files remembered; a node serves a handful

_lock = threading.Lock()
_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The file's sha256 as lowercase hex (blocking: call it on a worker thread). Cached by path, size
    and modification time, so a file replaced in place is hashed again."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _lock:
        known = _cache.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    value = digest.hexdigest()
    with _lock:
        if len(_cache) >= MAX_CACHED:
            _cache.pop(next(iter(_cache)))
        _cache[key] = value
    return value
