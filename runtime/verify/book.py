"""Verification outcomes per provider, as this node saw them: checks passed, failed, unverifiable.

Bounded (the most recent :data:`MAX_PROVIDERS` providers); ``standing`` is what the router may rank by
(``protocols.machines.verify.standing`` computes it from these counts)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_PROVIDERS = 4096


@dataclass
class Record:
    passed: int = 0
    failed: int = 0
    unverifiable: int = 0
    last_reason: str = ""


class VerificationBook:
    def __init__(self, limit: int = MAX_PROVIDERS) -> None:
        self.limit = limit
        self.records: dict[str, Record] = {}

    def get(self, provider: str) -> Record | None:
        return self.records.get(provider)

    def checked_before(self, provider: str) -> bool:
        record = self.records.get(provider)
        return record is not None and (record.passed + record.failed) > 0

    def in_doubt(self, provider: str) -> bool:
        record = self.records.get(provider)
        return record is not None and record.failed > 0

    def restore(self, provider: str, record: Record) -> None:
        """A record read back from the ledger at start (oldest first: the newest stay within the bound)."""
        self.records.pop(provider, None)
        self.records[provider] = record
        while len(self.records) > self.limit:
            self.records.pop(next(iter(self.records)))

    def note(self, provider: str, outcome: str, reason: str = "") -> Record:
        record = self.records.pop(provider, None) or Record()
        if outcome == "passed":
            record.passed += 1
        elif outcome == "failed":
            record.failed += 1
            record.last_reason = reason
        else:
            record.unverifiable += 1
        self.records[provider] = record  # most recent last
        while len(self.records) > self.limit:
            self.records.pop(next(iter(self.records)))
        return record

    def overruled(self, provider: str) -> Record | None:
        """The escrow's arbiter re-ran a call this node counted as failed and did not find the provider
        at fault: that failure counts as a pass (None when there is no failure to take back)."""
        record = self.records.get(provider)
        if record is None or record.failed < 1:
            return None
        record.failed -= 1
        record.passed += 1
        record.last_reason = "overruled"
        return record
