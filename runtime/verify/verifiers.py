"""Leased verifiers' records with this node (verified inference, docs/verified-inference.md): answers a
second verifier or the lease's arbiter confirmed (``agreed``), failures the arbiter overruled, and
disagreements with a second verifier. ``protocols.machines.verify.verifier_standing`` turns them into
the weight a verifier is picked with. In memory, bounded (the :data:`MAX_VERIFIERS` most recent);
which verifier failed which lease is remembered for the lease's dispute (:data:`MAX_FAILED_BY`)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_VERIFIERS = 1024
MAX_FAILED_BY = 256


@dataclass
class VerifierRecord:
    agreed: int = 0
    overruled: int = 0
    disagreed: int = 0


class VerifierBook:
    def __init__(self, limit: int = MAX_VERIFIERS) -> None:
        self.limit = limit
        self.records: dict[str, VerifierRecord] = {}
        self.failed_by: dict[str, str] = {}  # lease id -> the verifier whose answer failed its call

    def get(self, verifier: str) -> VerifierRecord | None:
        return self.records.get(verifier)

    def note(self, verifier: str, *, agreed: int = 0, overruled: int = 0, disagreed: int = 0) -> VerifierRecord:
        record = self.records.pop(verifier, None) or VerifierRecord()
        record.agreed += agreed
        record.overruled += overruled
        record.disagreed += disagreed
        self.records[verifier] = record  # most recent last
        while len(self.records) > self.limit:
            self.records.pop(next(iter(self.records)))
        return record

    def failed_lease(self, lease_id: str, verifier: str) -> None:
        """``verifier``'s answer failed a call of ``lease_id`` (its dispute will say who was right)."""
        self.failed_by.pop(lease_id, None)
        self.failed_by[lease_id] = verifier
        while len(self.failed_by) > MAX_FAILED_BY:
            self.failed_by.pop(next(iter(self.failed_by)))
