"""The consumer's spot-check of a call (verified inference, docs/verified-inference.md).

After a call's end frame, when the frame carries a proof for a file this node holds (same sha256), the
consumer checks the call if ``verify_sample_rate`` draws it, always on a provider's first checked call
and after any doubt: the prompt as its own copy of the model renders it, the produced tokens and
the committed chunks against the signed root, then one prefill (``runtime.verify.spot.check_call``, on
a worker thread), and whether the ids spell the text received. Every proof's signed sha256 is
compared with the one the provider's signed record advertises for the lease's model (no file needed;
a mismatched call is also checked against the file its proof names, where that file is at hand),
and so are its signed temperature and top_p with the request's (``sampling_mismatch``), and a v3
body's signed ``seeded`` flag with whether the request named a seed (``sampling_mismatch`` too), the
proof's signature and, on an end frame, its signed text hash against the text received: all on every
call, drawn or not (``protocols.machines.verify.every_call_facts``). An end frame that should carry a
proof (the record names a file, the request is verifiable, tokens were produced) but carries none
fails as ``no_proof`` on every call; a cut without one (an unproved cut, let go once) when drawn.
``protocols.machines.verify.check_verdict`` decides; a failure ends the lease (no more countersigned
receipts) and refuses the call with ``E_FORBIDDEN verification_<reason>``; one the provider's signature
binds keeps its evidence for the lease's dispute (``protocols.lease.arbiter``).
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from protocols.machines.lease_consumer import CUT_ENDINGS, ERROR_FRAME_ENDINGS, CallEnding
from protocols.machines.verify import (
    DEFAULT_SECOND_OPINION_RATE,
    CallFacts,
    CheckFacts,
    CheckVerdict,
    check_verdict,
    every_call_facts,
    findings_counted,
    proof_version_met,
    reconcile_opinions,
    sampling_matches,
    second_opinion_drawn,
    seeded_matches,
    signed_hash_matches,
    standing_with_reports,
    verifier_standing,
)
from runtime.ledger import Ledger
from runtime.ledger.verifications import VerificationRow
from runtime.verify.book import Record, VerificationBook
from runtime.verify.check import prefill_for
from runtime.verify.commitment import MAX_TOKENS, Opening
from runtime.verify.evidence import (
    CallProof,
    DisputePackage,
    commitment_signed,
    request_seeded,
    request_sha256,
    text_sha256,
)
from runtime.verify.provider import declared_sampling, verifiable
from runtime.verify.reports import ReportBook
from runtime.verify.sampling import DEFAULT_SAMPLE_RATE, should_check
from runtime.verify.spot import SpotCheck, check_call, openings_of
from runtime.verify.verifiers import VerifierBook
from wire.peer_keys import ed25519_public_key

log = logging.getLogger(__name__)

LocalModel = Callable[[str], Any]  # sha256 -> a loaded LlamaModel of that file, or None
# (provider, proof, request, text received, longest stop string, exclude=verifiers not to ask) -> a leased
# verifier's answer, or None when none could check it (protocols.lease.verifier.RemoteVerifier)
Remote = Callable[..., Awaitable[Any]]
# (provider, lease id) -> the sha256 the provider's signed record advertises for the lease's model ("" if none)
Advertised = Callable[[str, str], Awaitable[str]]
MAX_ADVERTISED = 1024  # leases whose advertised file is remembered
MAX_CUT_PROVIDERS = 1024  # providers whose unproved cuts since their last passed check are counted
MAX_EVIDENCE = 64  # disputable failures whose package is kept (the most recent)
ADVERTISED_WAIT_S = 5.0  # the most a call's end waits for the provider's record (usually discovery's cache)


class Verifying:
    """The consumer's checks; the role holds one."""

    def __init__(self, local_model: LocalModel | None = None, sample_rate: float = DEFAULT_SAMPLE_RATE) -> None:
        self.local_model = local_model
        self.sample_rate = sample_rate
        self.positions = 0  # verify.positions: 0 compares every reply position
        self.book = VerificationBook()
        self.advertised: Advertised | None = None
        self.remote: Remote | None = None  # a leased verifier for files this node does not hold
        # Asks peers for their reports about a provider this node calls (protocols.lease.verifier.ReportPuller)
        self.pull_reports: Callable[[str], None] | None = None
        self._advertised: dict[str, str] = {}  # lease id -> sha256 ("" when the record names none)
        self._cuts: dict[str, int] = {}  # provider -> calls it cut after text without a proof, since a pass
        self.ledger: Ledger | None = None  # where outcomes are kept (``attach``)
        # lease id -> the package of a failed check the provider's signature binds (a v2 body), kept for
        # the lease's dispute (``protocols.lease.arbiter``: sent to the escrow's arbiter, dropped once
        # the arbiter resolved it).
        self.evidence: dict[str, DisputePackage] = {}
        # Signed reports of this node's checks, and those peers shared (``share_reports``); they shift
        # ``standing`` by ``report_weight`` at most, never to 0.
        self.reports = ReportBook()
        self.report_weight = 0.0
        self._sha256_now = ""
        # Leased verifiers' records with this node (their pick's weight), the share of their passes a
        # second verifier checks again, and the draws (unpredictable to a verifier).
        self.verifiers = VerifierBook()
        self.second_opinion_rate = DEFAULT_SECOND_OPINION_RATE
        self.rng: random.Random = random.SystemRandom()

    def verifier_standings(self) -> dict[str, float]:
        """What a leased verifier is picked with: ``protocols.machines.verify.verifier_standing``."""
        return {
            peer: verifier_standing(r.agreed, r.overruled, r.disagreed) for peer, r in self.verifiers.records.items()
        }

    def share_reports(self, key: Any, weight: float) -> None:
        """Sign a report of each check of this node's own with ``key`` (its ReceiptKey), and weigh the
        reports peers share by ``weight`` (``verify.report_weight``)."""
        self.reports = ReportBook(key, ed25519_public_key)
        self.report_weight = weight

    def standing(self, provider: str) -> float:
        """What the router ranks ``provider`` by: 0 after a failed check of this node's own; otherwise
        ``protocols.machines.verify.standing`` of its checks, shifted by peers' reports."""
        record = self.book.get(provider)
        tally = self.reports.tally(provider)
        passed, failed = (record.passed, record.failed) if record is not None else (0, 0)
        return standing_with_reports(passed, failed, tally.passed, tally.failed, self.report_weight)

    async def _advertised_sha256(self, provider: str, lease_id: str) -> str:
        known = self._advertised.get(lease_id)
        if known is None:
            try:
                with trio.fail_after(ADVERTISED_WAIT_S):
                    known = await self.advertised(provider, lease_id) if self.advertised is not None else ""
            except Exception:  # noqa: BLE001 - an unreachable record is "not known" (asked again), never a failure
                return ""
            self._advertised[lease_id] = known
            while len(self._advertised) > MAX_ADVERTISED:
                self._advertised.pop(next(iter(self._advertised)))
        return known

    async def learn_advertised(self, provider: str, lease_id: str) -> None:
        """Ask, as a lease opens, which file the provider's record advertises for it. A call without a
        proof fails ``no_proof`` only where that file is known, and it is asked of the provider itself:
        one that hangs up right after its first reply could otherwise leave it unknown, and that call
        (and every first call of a lease it hangs up on) unchecked."""
        if self.local_model is not None:
            await self._advertised_sha256(provider, lease_id)

    def _drawn(self, provider: str) -> bool:
        checked_before, doubt = self.book.checked_before(provider), self.book.in_doubt(provider)
        return should_check(rate=self.sample_rate, checked_before=checked_before, in_doubt=doubt)

    async def attach(self, ledger: Ledger) -> None:
        """Keep outcomes in ``ledger`` from now on, and read back those kept before (a provider caught
        before a restart stays caught)."""
        for row in await ledger.verification_rows():
            self.book.restore(row.provider, Record(row.passed, row.failed, row.unverifiable, row.last_reason))
        self.ledger = ledger

    def unproved_cut(self, provider: str) -> int:
        """``provider`` ended a call after its text without a proof (cut, stalled or failed:
        ``lease_consumer.unproved_cut``): how many it had ended so since its last passed check
        (``cut_forgiven`` reads it), counting this one from now on."""
        earlier = self._cuts.pop(provider, 0)
        self._cuts[provider] = earlier + 1
        while len(self._cuts) > MAX_CUT_PROVIDERS:
            self._cuts.pop(next(iter(self._cuts)))
        return earlier

    async def _note(self, provider: str, outcome: str, reason: str = "", sha256: str = "") -> None:
        if outcome == "passed":
            self._cuts.pop(provider, None)  # a proven reply since: its next cut is let go again
        record = self.book.note(provider, outcome, reason)
        self.reports.note(provider, outcome, reason, sha256)
        if self.ledger is None or outcome == "unverifiable":
            # Unverifiable calls (no file here) may be every call: counted in memory, not a disk write each.
            return
        row = VerificationRow(provider, record.passed, record.failed, record.unverifiable, record.last_reason)
        try:
            await self.ledger.save_verification(row)
        except Exception as error:  # noqa: BLE001 - a full or failing disk: kept in memory, written next time
            log.warning("a verification outcome was not kept in the ledger (%s)", type(error).__name__)

    def confirmed(self, lease_id: str) -> None:
        """The lease's arbiter found the provider at fault: the verifier whose answer failed the call (if
        one did) gains standing."""
        verifier = self.verifiers.failed_by.pop(lease_id, None)
        if verifier is not None:
            self.verifiers.note(verifier, agreed=1)

    async def overruled(self, provider: str, lease_id: str = "") -> None:
        """The lease's arbiter did not find ``provider`` at fault for a check this node (or a verifier it
        leased) failed: that failure is taken back, so one wrong check (a lying verifier's) does not
        leave an honest provider out of the router's ranking for good; a leased verifier whose answer
        failed the call loses standing."""
        verifier = self.verifiers.failed_by.pop(lease_id, None)
        if verifier is not None:
            self.verifiers.note(verifier, overruled=1)
            log.warning("verifier %s was overruled by the arbiter", verifier[:16])
        record = self.book.overruled(provider)
        if record is not None:
            self.reports.withdraw(provider)  # peers that took this node's failed report take the pass
        if record is None or self.ledger is None:
            return
        row = VerificationRow(provider, record.passed, record.failed, record.unverifiable, record.last_reason)
        try:
            await self.ledger.save_verification(row)
        except Exception as error:  # noqa: BLE001 - a full or failing disk: kept in memory, written next time
            log.warning("a verification outcome was not kept in the ledger (%s)", type(error).__name__)

    async def _failed(self, provider: str, facts: CheckFacts, package: DisputePackage | None = None) -> str:
        verdict = check_verdict(facts)
        # The file the check was about, for this node's signed report (set just before this call).
        sha256, self._sha256_now = self._sha256_now, ""
        await self._note(provider, verdict.outcome, verdict.reason, sha256)
        if package is not None and verdict.dispute:
            self.evidence[package.lease_id] = package
            while len(self.evidence) > MAX_EVIDENCE:
                self.evidence.pop(next(iter(self.evidence)))
        if verdict.outcome == "failed":
            log.warning("provider %s failed verification (%s)", provider[:16], verdict.reason)
            return f"failed:{verdict.reason}"
        return verdict.outcome

    async def check(
        self,
        provider: str,
        lease_id: str,
        body: dict[str, Any],
        proof: CallProof | None,
        *,
        text: str | None = None,
        usage: dict[str, int] | None = None,
        received_tokens: int = 0,
        ending: CallEnding = CallEnding.END,
        owed: int = 1,
    ) -> str:
        """``passed``, ``failed:<reason>``, ``unverifiable`` or ``skipped``. ``body``: the request as the
        provider read it (the call frame's, parsed back); ``text``: the reply as
        received; ``usage``: the end frame's; ``received_tokens``: the tokens of the reply's chunks that
        arrived, text or not (``reply_tokens``: what this side paid as generated, whatever the provider's
        usage says); ``ending``: how the call ended (``lease_consumer.call_ending``: its own end frame,
        or a cut after its text); ``owed``: the body version the call protocol the provider answered on
        owes (``protocols.lease.base.body_version_owed``). What needs no file is checked on every call
        (``protocols.machines.verify.every_call_facts``): an end frame's missing proof, the proof's
        signature, its signed sampling and, on an end frame, its signed text hash; the prefill is drawn."""
        if self.local_model is None:
            return "skipped"
        if self.pull_reports is not None and not self.book.checked_before(provider):
            self.pull_reports(provider)  # in the background; at most once in 10 minutes a provider
        cut, error_frame = ending in CUT_ENDINGS, ending in ERROR_FRAME_ENDINGS
        if proof is None:
            # The chunks that arrived, not only the provider's word: an end frame with no proof and a
            # usage naming no completion tokens was skipped, so a cheat could serve unchecked.
            produced = max(int((usage or {}).get("completion_tokens", 0)), received_tokens)
            if not verifiable(body) or not 0 < produced <= MAX_TOKENS:
                return "skipped"  # a call served without a commitment by design
            if not await self._advertised_sha256(provider, lease_id):
                return "skipped"  # the record names no file: nothing was promised
            # An end frame's on every call (an honest provider always proves it); a cut's when drawn.
            if every_call_facts(CallFacts(False, proof_owed=True, cut=cut)) is None and not self._drawn(provider):
                return "skipped"
            return await self._failed(provider, CheckFacts(False, False, False, False, proof_sent=False))
        signed = proof.commitment.body
        expected = await self._advertised_sha256(provider, lease_id)
        bound = signed.provider == provider and signed.lease_id == lease_id
        if expected and signed.model_sha256 != expected:
            # Needs no file: checked on every call that carries a proof (a prefill only on a mismatch).
            return await self._mismatched(provider, lease_id, body, proof, text, bound)
        # Needs no file either, so checked on every call: the signature (a proof anyone could write would
        # stand in for a missing one); the signed sampling, which every sampling-dependent rule
        # (not_sampled, too_greedy) reads, so a provider that signs a cooler one than asked would pass them
        # served greedily, and one that signs seeded for an unseeded request would make a too_greedy
        # failure undisputable; the signed hash of the request (a v4 dispute's binding); and the signed hash
        # of the text it says it streamed.
        sampled = sampling_matches((signed.temperature_milli, signed.top_p_milli), _declared(body))
        # JSON text of the whole request (~30 ms for a 0.9 MB one): hashed off the trio loop.
        sent = await trio.to_thread.run_sync(request_sha256, body) if max(signed.v, owed) >= 4 else None
        found = every_call_facts(
            CallFacts(
                True,
                cut=cut,
                error_frame=error_frame,
                root_signed=bound and commitment_signed(proof.commitment, ed25519_public_key),
                sampling_matches=sampled and seeded_matches(signed.seeded, request_seeded(body)),
                version_met=proof_version_met(signed.v, owed, request_hashable=sent is not None),
                request_hash_matches=signed_hash_matches(signed.request_sha256, sent),
                text_hash_matches=signed_hash_matches(signed.text_sha256, None if text is None else text_sha256(text)),
                body_version=signed.v,
                signed_seeded=signed.seeded,
            )
        )
        if found is not None and found.text_hash_matches:  # unsigned, or signed for another sampling
            return await self._found(provider, found, signed.model_sha256)
        # ``found``, if any, is a text hash that is not the text received: failed whatever the draw; a drawn
        # check on this node's copy runs first all the same, for a failure it finds before that one
        # (``check_call``'s order: a prompt of another length is disputed, the text hash is not).
        model = self.local_model(signed.model_sha256)
        if model is None:
            if found is not None:  # certain without the file: no leased check is bought for it
                return await self._found(provider, found, signed.model_sha256)
            if self.remote is None:
                await self._note(provider, "unverifiable", "no_file")
                return "unverifiable"
            if not self._drawn(provider):
                return "skipped"
            return await self._check_remotely(provider, lease_id, body, proof, text, bound)
        if not self._drawn(provider):
            if found is not None:
                return await self._found(provider, found, signed.model_sha256)
            return "skipped"
        facts, unverifiable, prompt = await self._local_facts(model, body, proof, text, bound)
        if found is not None and (facts is None or check_verdict(facts).outcome != "failed"):
            return await self._found(provider, found, signed.model_sha256)
        if facts is None:
            await self._note(provider, "unverifiable", unverifiable)
            return "unverifiable"
        self._sha256_now = signed.model_sha256
        return await self._failed(provider, facts, _package(lease_id, proof, prompt, text, bound, body))

    async def _found(self, provider: str, facts: CheckFacts, sha256: str) -> str:
        """A failure ``every_call_facts`` found, about the file ``sha256`` (never disputed: no evidence)."""
        self._sha256_now = sha256
        return await self._failed(provider, facts)

    async def _local_facts(
        self, model: Any, body: dict[str, Any], proof: CallProof, text: str | None, bound: bool
    ) -> tuple[CheckFacts | None, str, list[int]]:
        """This node's own check of a call on its copy of the file the proof names: the facts (None with
        why when it cannot check it: ``prompt``, ``too_long``) and the prompt ids it rendered."""
        signed = proof.commitment.body
        prompt = await prompt_ids(model, body, signed.prompt_tokens, signed.chat_format)
        if prompt is None:
            return None, "prompt", []
        try:
            # The openings are rebuilt on the worker thread too: up to 2,049 chunks of hashing.
            stop = _longest_stop(body)
            spot: SpotCheck = await trio.to_thread.run_sync(
                run_check, model.path, prompt, proof, text, stop, self.positions
            )
        except ValueError:  # longer than the verifier's context: not checked here
            return None, "too_long", prompt
        facts = CheckFacts(
            root_signed=bound and spot.root_signed,
            answered=True,
            openings_match=spot.openings_match,
            holds_file=True,
            prompt_matches=spot.prompt_matches,
            findings_reason=_counted(spot.findings.reason(), body) if spot.findings is not None else "",
            text_matches=spot.text_matches,
            prompt_hash_matches=spot.prompt_hash_matches,
            text_hash_matches=spot.text_hash_matches,
            body_version=signed.v,
            signed_seeded=signed.seeded,
        )
        return facts, "", prompt

    async def _mismatched(
        self, provider: str, lease_id: str, body: dict[str, Any], proof: CallProof, text: str | None, bound: bool
    ) -> str:
        """A proof signed for another file than the provider's record advertises: ``model_mismatch``, not
        disputed (no signature binds the advertised file to the lease). But the call is also checked
        against the file the proof names, on this node's copy or through a leased verifier, where one
        is at hand: a failure there is the provider's own signed statement proved false, disputed like
        any (the arbiter re-runs that file)."""
        signed_ok = bound and commitment_signed(proof.commitment, ed25519_public_key)
        facts = CheckFacts(signed_ok, True, True, False, model_matches=False)
        package: DisputePackage | None = None
        sha256 = proof.commitment.body.model_sha256
        model = self.local_model(sha256) if signed_ok and self.local_model is not None else None
        if model is not None:
            found, _, prompt = await self._local_facts(model, body, proof, text, bound)
            if found is not None and check_verdict(found).dispute:
                facts, package = found, _package(lease_id, proof, prompt, text, bound, body)
        elif signed_ok and self.remote is not None:
            answer = await self.remote(provider, proof, body, text, _longest_stop(body))
            found = _remote_facts(answer, proof, signed_ok, body) if answer is not None else None
            if found is not None and check_verdict(found).dispute and answer.prompt_ids:
                facts, package = found, _package(lease_id, proof, answer.prompt_ids, text, bound, body)
                self.verifiers.failed_lease(lease_id, answer.verifier)
        self._sha256_now = sha256
        return await self._failed(provider, facts, package)

    async def _check_remotely(
        self, provider: str, lease_id: str, body: dict[str, Any], proof: CallProof, text: str | None, bound: bool
    ) -> str:
        """A drawn call whose file this node lacks: a leased verifier checks it
        (``protocols.lease.verifier``); its answer is applied as this node's own check would be, after
        this node's own signature check of the root and of the proof's binding to the lease. A share of
        passes (``second_opinion_rate``) is checked again by another verifier: two that disagree both
        lose standing and leave the provider unchecked (``protocols.machines.verify.reconcile_opinions``;
        a node holding the file checks every drawn call itself and never asks verifiers)."""
        assert self.remote is not None
        stop = _longest_stop(body)
        answer = await self.remote(provider, proof, body, text, stop)
        if answer is None:
            await self._note(provider, "unverifiable", "no_verifier")
            return "unverifiable"
        signed_ok = bound and commitment_signed(proof.commitment, ed25519_public_key)
        facts = _remote_facts(answer, proof, signed_ok, body)
        first = check_verdict(facts)
        if first.outcome == "passed" and second_opinion_drawn(self.second_opinion_rate, self.rng.random()):
            other = await self.remote(provider, proof, body, text, stop, exclude={answer.verifier})
            second: CheckVerdict | None = None
            if other is not None:
                second = check_verdict(_remote_facts(other, proof, signed_ok, body))
            opinions = reconcile_opinions(first, second, None)
            who = {"first": answer.verifier, "second": other.verifier if other is not None else ""}
            for name in opinions.credit:
                self.verifiers.note(who[name], agreed=1)
            for name in opinions.blame:
                self.verifiers.note(who[name], disagreed=1)
            if opinions.outcome == "unverifiable":
                log.warning(
                    "verifiers %s and %s disagree on a call of %s: left unchecked",
                    who["first"][:16],
                    who["second"][:16],
                    provider[:16],
                )
                await self._note(provider, "unverifiable", opinions.reason)
                return "unverifiable"
        elif first.outcome == "failed":
            self.verifiers.failed_lease(lease_id, answer.verifier)  # its dispute says who was right
        prompt = answer.prompt_ids
        package = _package(lease_id, proof, prompt, text, bound, body) if prompt else None
        self._sha256_now = proof.commitment.body.model_sha256
        return await self._failed(provider, facts, package)


def _remote_facts(answer: Any, proof: CallProof, signed_ok: bool, body: dict[str, Any]) -> CheckFacts:
    """A leased verifier's findings as ``check_verdict`` reads them, with this node's own signature check
    (``too_greedy`` not applied to a seeded request: ``findings_counted``)."""
    found = answer.facts
    return CheckFacts(
        root_signed=signed_ok and found.root_signed,
        answered=True,
        openings_match=found.openings_match,
        holds_file=found.holds_file,
        prompt_matches=found.prompt_matches,
        findings_reason=_counted(found.findings_reason, body),
        text_matches=found.text_matches,
        prompt_hash_matches=found.prompt_hash_matches,
        text_hash_matches=found.text_hash_matches,
        body_version=proof.commitment.body.v,
        signed_seeded=proof.commitment.body.seeded,
    )


def _package(
    lease_id: str, proof: CallProof, prompt: list[int], text: str | None, bound: bool, request: dict[str, Any]
) -> DisputePackage | None:
    """A failed check's evidence, kept when the provider's v2 to v4 signature binds it to this lease;
    ``request``: the request sent, which a v4 body binds (the arbiter renders the prompt from it)."""
    version = proof.commitment.body.v
    if version < 2 or text is None or not bound:
        return None
    try:
        sent = request if version >= 4 else None
        return DisputePackage(lease_id=lease_id, proof=proof, prompt_ids=prompt, text=text, request=sent)
    except ValueError:  # beyond the package's bounds: refused all the same, kept without evidence
        log.warning("lease %s: the failed call's evidence is beyond a package's bounds, not kept", lease_id[:12])
        return None


def _openings(chunks: list[str]) -> list[Opening]:
    """The openings of chunks that arrived whole (blocking): ``runtime.verify.spot.openings_of``."""
    return openings_of(chunks)


def run_check(
    path: Any, prompt: list[int], proof: CallProof, text: str | None, longest_stop: int, positions: int = 0
) -> SpotCheck:
    """One check on this node's copy of the file at ``path`` (blocking): the consumer's, and a leased
    verifier's (``protocols.lease.verifier.VerifierService``). ``positions`` (``verify.positions``): how many
    reply positions to draw beyond the first and the flagged ones; 0 compares every position."""
    openings = _openings(proof.chunks)
    prefill, tolerances = prefill_for(path)
    signed, keys = proof.commitment, ed25519_public_key
    return check_call(
        prefill, prompt, proof.tokens, signed, openings, keys, tolerances, text, longest_stop, sample=positions
    )


def _declared(body: dict[str, Any]) -> tuple[int, int] | None:
    """The request's own (temperature, top_p) × 1000; None when it names values this node cannot read
    (the provider's service refuses such a request: nothing to compare a proof with)."""
    try:
        return declared_sampling(body)
    except (TypeError, ValueError, OverflowError):
        return None


def _counted(reason: str, body: dict[str, Any]) -> str:
    """A comparison's finding as it counts for this request (``findings_counted``)."""
    return findings_counted(reason, seeded=request_seeded(body))


def _longest_stop(body: dict[str, Any]) -> int:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    return max((len(s) for s in stops if isinstance(s, str)), default=0)


async def prompt_ids(
    model: Any, body: dict[str, Any], claimed: int, chat_format: str | None = None
) -> list[int] | None:
    """The prompt's token ids as this node's copy of the model renders the request (None if it cannot);
    the provider renders them the same way for a v2 commitment body. ``chat_format``: the format a v4
    body signs the provider rendered a chat request with (its node may set one other than this one's).
    A signed format this copy does not render the request in (not spelt as one of
    ``signable_chat_formats``: formats that drop a message or add text of their own are not, or
    ``gguf-template`` for a file without a template: a substitute's own format) is not the advertised
    file's rendering of the request: it is rendered in this node's format then, as for a body that
    signs none, so a signed format never makes a call unverifiable nor lets a prompt leave the request
    out or add to it."""
    try:
        messages, prompt = body.get("messages"), body.get("prompt")
        if messages is not None:
            text: str | None = None
            if chat_format:
                with contextlib.suppress(Exception):
                    text = await model.format_chat(messages, chat_format=chat_format)
            if text is None:
                text = await model.format_chat(messages)
            ids = await model.tokenize(text, add_bos=True, special=True)
            if len(ids) != claimed:  # a template that writes its own BOS: without the added one
                ids = await model.tokenize(text, add_bos=False, special=True)
            return list(ids)
        if isinstance(prompt, str):
            return list(await model.tokenize(prompt, add_bos=True))
        if isinstance(prompt, list):
            return list(prompt)
    except Exception:  # noqa: BLE001 - a request this node cannot render is unverifiable, not a failure
        return None
    return None
