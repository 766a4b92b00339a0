"""A cheating provider's model identity, for verified-inference tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from runtime.verify import identity


def claim_identity(served: Path, claimed: Path | str) -> None:
    """The node that serves ``served`` states ``claimed``'s sha256 for it (a file, or the hex itself) in
    its record and every commitment it signs: ``runtime.verify.identity``'s cache, keyed as it keys it."""
    sha256 = claimed if isinstance(claimed, str) else hashlib.sha256(claimed.read_bytes()).hexdigest()
    stat = served.stat()
    identity._cache[(str(served.resolve()), stat.st_size, stat.st_mtime_ns)] = sha256
