"""Verified inference's outcomes are kept in the ledger (a real SQLite file): a provider caught before a
restart is still caught after it, and the table keeps a bounded number of providers."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocols.lease.verifying import Verifying
from runtime.ledger import Ledger, verifications
from runtime.ledger.verifications import VerificationRow

CHEAT = "12D3KooWPu9mDMxJtpfKmTAkrmevSCKia7Kx1J5qt1Zhmzpxop1e"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


async def _advertised(provider: str, lease_id: str) -> str:
    return "ab" * 32  # the provider's record names a file


async def test_a_provider_caught_before_a_restart_stays_caught(tmp_path: Path) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.db")
    verifying = Verifying(local_model=lambda sha256: None)
    verifying.advertised = _advertised
    await verifying.attach(ledger)
    # A drawn call the record promises a proof for, served without one.
    outcome = await verifying.check(CHEAT, "lease-1", CHAT, None, usage={"completion_tokens": 4})
    assert outcome == "failed:no_proof"
    await ledger.aclose()

    ledger = await Ledger.open(tmp_path / "ledger.db")  # the node restarts
    try:
        after = Verifying()
        assert not after.book.in_doubt(CHEAT)
        await after.attach(ledger)
        record = after.book.get(CHEAT)
        assert after.book.in_doubt(CHEAT) and record is not None
        assert (record.failed, record.passed, record.last_reason) == (1, 0, "no_proof")
    finally:
        await ledger.aclose()


async def test_a_proofless_end_frame_that_claims_no_tokens_is_caught_by_the_chunks_that_arrived(
    tmp_path: Path,
) -> None:
    """A cheat streams its reply and ends the call with no proof and a usage naming no completion tokens:
    the chunks this side received say tokens were produced, so the drawn call fails ``no_proof`` (it was
    skipped as a call that produced nothing)."""
    ledger = await Ledger.open(tmp_path / "ledger.db")
    try:
        verifying = Verifying(local_model=lambda sha256: None)
        verifying.advertised = _advertised
        await verifying.attach(ledger)
        assert await verifying.check(CHEAT, "lease-1", CHAT, None, usage={}, received_tokens=0) == "skipped"
        assert await verifying.check(CHEAT, "lease-1", CHAT, None, usage={}, received_tokens=4) == "failed:no_proof"
    finally:
        await ledger.aclose()


async def test_the_table_keeps_the_most_recently_checked_providers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verifications, "MAX_PROVIDERS", 2)
    ledger = await Ledger.open(tmp_path / "ledger.db")
    try:
        for name in ("a", "b", "c"):
            await ledger.save_verification(VerificationRow(name, 1, 0, 0, ""))
        await ledger.save_verification(VerificationRow("c", 2, 1, 0, "logprob"))
        rows = await ledger.verification_rows()
        assert [(r.provider, r.passed, r.failed) for r in rows] == [("b", 1, 0), ("c", 2, 1)]
    finally:
        await ledger.aclose()
