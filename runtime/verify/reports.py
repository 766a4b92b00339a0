"""Signed verification reports (docs/verified-inference.md, "Shared reports").

After each check of its own that passed or failed, a node signs a report: the provider, the file's
sha256, the outcome, the reason and when, with the Ed25519 key it signs receipts with. It keeps its
newest report per provider and hands them to peers that ask; what it receives from others is kept,
the newest per (reporter, provider), and counted once per reporter. Reports only shift the standing a
receiver computes (``protocols.machines.verify.standing_with_reports``, weighted as it configures);
nothing a stranger reports alone excludes a provider.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey
from pydantic import BaseModel, ConfigDict, Field

from runtime.ledger.canonical import canonical_bytes
from runtime.ledger.receipts import PEER_ID_PATTERN, PeerKeys, ReceiptKey

REPORT_DOMAIN = b"clawnode/verify-report/v1\x00"
MAX_OWN = 1024  # providers this node keeps its own newest report about
MAX_RECEIVED = 4096  # (reporter, provider) pairs kept from others
MAX_AGE_S = 30 * 24 * 3600  # a report older than this is not taken
MAX_AHEAD_S = 300  # nor one dated this far in the future


class ReportBody(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: int = Field(1, ge=1, le=1)
    reporter: str = Field(pattern=PEER_ID_PATTERN)
    provider: str = Field(pattern=PEER_ID_PATTERN)
    model_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    outcome: Literal["passed", "failed"]
    reason: str = Field("", max_length=64, pattern=r"^[a-z0-9_]*$")
    at: int = Field(ge=0, description="unix seconds of the check")

    def canonical(self) -> bytes:
        return canonical_bytes(self.model_dump())


class SignedReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    body: ReportBody
    sig: str = Field(max_length=200)


def sign_report(body: ReportBody, key: ReceiptKey) -> SignedReport:
    if key.peer_id != body.reporter:
        raise ValueError("only the reporter signs its reports")
    return SignedReport(body=body, sig=base64.b64encode(key.sign(REPORT_DOMAIN + body.canonical())).decode())


def report_signed(report: SignedReport, peer_keys: PeerKeys) -> bool:
    """Whether the reporter named in the body signed it."""
    try:
        public_key = peer_keys(report.body.reporter)
        if public_key is None:
            return False
        VerifyKey(public_key).verify(
            REPORT_DOMAIN + report.body.canonical(), base64.b64decode(report.sig, validate=True)
        )
    except (CryptoError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class Tally:
    """Other nodes' newest reports about one provider, one per reporter."""

    passed: int = 0
    failed: int = 0


class ReportBook:
    """This node's own newest report per provider, and the reports others shared with it."""

    def __init__(self, key: ReceiptKey | None = None, peer_keys: PeerKeys | None = None) -> None:
        self.key = key  # this node's signing key; None: it makes no reports
        self.peer_keys = peer_keys
        self.own: dict[str, SignedReport] = {}
        self.received: dict[tuple[str, str], ReportBody] = {}

    def note(self, provider: str, outcome: str, reason: str, sha256: str = "", now: float | None = None) -> None:
        """This node's own check of ``provider`` passed or failed: sign and keep a report of it."""
        if self.key is None or outcome not in ("passed", "failed") or provider == self.key.peer_id:
            return
        try:
            body = ReportBody(
                reporter=self.key.peer_id,
                provider=provider,
                model_sha256=sha256,
                outcome=outcome,  # type: ignore[arg-type]
                reason=reason if outcome == "failed" else "",
                at=int(time.time() if now is None else now),
            )
        except ValueError:
            return
        self.own.pop(provider, None)
        self.own[provider] = sign_report(body, self.key)
        while len(self.own) > MAX_OWN:
            self.own.pop(next(iter(self.own)))

    def withdraw(self, provider: str, now: float | None = None) -> bool:
        """The arbiter found ``provider`` not at fault for a check this node failed: its newest own
        report, when it says failed, is replaced by a signed ``passed`` one with reason ``overruled``,
        dated after it, so a peer that already took the failure takes this in its place (a report's
        newest per reporter counts; an older node reads it as any pass). False when there was none."""
        old = self.own.get(provider)
        if self.key is None or old is None or old.body.outcome != "failed":
            return False
        at = max(int(time.time() if now is None else now), old.body.at + 1)
        body = old.body.model_copy(update={"outcome": "passed", "reason": "overruled", "at": at})
        self.own.pop(provider)
        self.own[provider] = sign_report(ReportBody.model_validate(body.model_dump()), self.key)
        return True

    def shared(self, providers: Iterable[str], limit: int) -> list[SignedReport]:
        """This node's own reports about ``providers`` (its newest ones when none is named)."""
        wanted = list(providers)
        if wanted:
            found = [self.own[p] for p in dict.fromkeys(wanted) if p in self.own]
        else:
            found = list(reversed(self.own.values()))
        return found[:limit]

    def take(self, report: SignedReport, sender: str, now: float | None = None) -> bool:
        """Keep a report another node shared: signed by its reporter, who is the peer that sent it (no
        relaying of third parties' reports), not about this node or by it, dated sensibly, and newer
        than the one kept from that reporter about that provider."""
        body = report.body
        mine = self.key.peer_id if self.key is not None else ""
        moment = time.time() if now is None else now
        if body.reporter != sender or mine in (body.reporter, body.provider) or body.reporter == body.provider:
            return False
        if not moment - MAX_AGE_S <= body.at <= moment + MAX_AHEAD_S:
            return False
        known = self.received.get((body.reporter, body.provider))
        if known is not None and known.at >= body.at:
            return False
        if self.peer_keys is None or not report_signed(report, self.peer_keys):
            return False
        self.received.pop((body.reporter, body.provider), None)
        self.received[(body.reporter, body.provider)] = body
        while len(self.received) > MAX_RECEIVED:
            self.received.pop(next(iter(self.received)))
        return True

    def tally(self, provider: str) -> Tally:
        passed = failed = 0
        for (_, about), body in self.received.items():
            if about == provider:
                passed += body.outcome == "passed"
                failed += body.outcome == "failed"
        return Tally(passed, failed)
