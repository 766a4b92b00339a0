"""A panel member (or arbiter) repeating its vote with a new signed re-run record each time fills no disk:
a task keeps at most MAX_RUN_EVIDENCE records from one sender, and the same record again is harmless."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from protocols import task_wire as w
from protocols.machines.task_checks import MAX_RUN_EVIDENCE
from protocols.task.base import TaskCore
from runtime.errors import ClawnodeError
from runtime.ledger import Ledger

MEMBER = "12D3KooWPu9mDMxJtpfKmTAkrmevSCKia7Kx1J5qt1Zhmzpxop1e"
TASK = "t" * 32


def _record(note: str, attachment: bytes) -> w.EvidenceNotice:
    return w.EvidenceNotice(
        task_id=TASK,
        party=MEMBER,
        note=note,
        content_hash=hashlib.sha256(attachment).hexdigest(),
        size=len(attachment),
        submitted_at=1,
    )


async def test_repeated_run_records_from_one_member_are_bounded(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.db")
    node = SimpleNamespace(local={}, ledger=ledger)
    attachment = b"x" * w.MAX_EVIDENCE_ATTACHMENT
    try:
        for i in range(MAX_RUN_EVIDENCE):
            await TaskCore._keep_run_evidence(node, _record(f"run {i}", attachment), "env", attachment)  # type: ignore[arg-type]
        # The same record again (a vote re-sent) is taken quietly; a new one past the bound is refused.
        await TaskCore._keep_run_evidence(node, _record("run 0", attachment), "env", attachment)  # type: ignore[arg-type]
        with pytest.raises(ClawnodeError) as refused:
            await TaskCore._keep_run_evidence(node, _record("run again", attachment), "env", attachment)  # type: ignore[arg-type]
        assert refused.value.reason == "too_much_evidence"
        assert len(await ledger.list_evidence(TASK)) == MAX_RUN_EVIDENCE
    finally:
        await ledger.aclose()
