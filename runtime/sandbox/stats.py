"""What the sandboxes did, counted for ``/metrics`` and the repeated-violation alert.

Counts only (no module hashes, no paths): runs per kind, kills by limit per kind and outcome,
refusals per kind and stable reason, and the system calls the sandbox refused per name (escape
attempts). Thread-safe: runs finish in worker threads.
"""

from __future__ import annotations

import threading
from collections import Counter


class SandboxStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.runs: Counter[str] = Counter()  # kind
        self.kills: Counter[tuple[str, str]] = Counter()  # (kind, outcome or reason)
        self.refusals: Counter[tuple[str, str]] = Counter()  # (kind, reason)
        self.denied_calls: Counter[tuple[str, str]] = Counter()  # (kind, call)

    def ran(self, kind: str) -> None:
        with self._lock:
            self.runs[kind] += 1

    def killed(self, kind: str, why: str) -> None:
        with self._lock:
            self.kills[(kind, why)] += 1

    def refused(self, kind: str, reason: str) -> None:
        with self._lock:
            self.refusals[(kind, reason)] += 1

    def denied(self, kind: str, calls: tuple[str, ...]) -> None:
        with self._lock:
            for call in calls:
                self.denied_calls[(kind, call)] += 1

    def violations(self, kind: str) -> int:
        """Kills by limit plus refused system calls of one kind: what the alert watches grow."""
        with self._lock:
            kills = sum(count for (k, _), count in self.kills.items() if k == kind)
            return kills + sum(count for (k, _), count in self.denied_calls.items() if k == kind)
