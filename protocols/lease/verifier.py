"""Leased verifiers (verified inference, docs/verified-inference.md): ``verify:<sha256>``.

A node that serves a model may also sell checks of calls served with that file: capability
``verify:<the GGUF file's sha256>``, priced per token checked (the prompt and completion tokens one
prefill evaluates), leased and metered like any capability. Its service (:class:`VerifierService`)
takes a call's proof, the request as the consumer sent it and the text it received, renders the prompt
with its own copy of the file, runs ``runtime.verify.spot.check_call`` on a worker thread, and answers
the facts, the verdict (``protocols.machines.verify.check_verdict``) and the prompt ids it rendered.

A consumer that does not hold the file a drawn call's proof names asks one
(:class:`RemoteVerifier`): discovery's ``verify:<sha256>`` providers, never the provider under check
(``protocols.machines.verify.choose_verifiers``: at random among those at an acceptable price, weighted
by their standing with this node, at most 3 tried), a lease whose
budget covers the tokens to check at the verifier's price, one call, the lease ended at once. The
consumer applies the answer exactly as its own check (``protocols.lease.verifying``), its own
signature check of the root and binding to the lease first. A verifier that lies to fail an honest
provider is overruled by the lease's arbiter, which re-runs the check on its own copy of the file.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from protocols.machines.verify import CheckFacts, VerifierOffer, check_verdict, choose_verifiers
from runtime.errors import ClawnodeError, ErrorCode
from runtime.service import Emit, Usage
from runtime.verify.commitment import MAX_TOKENS
from runtime.verify.evidence import LATEST_VERSION, CallProof
from runtime.verify.reports import SignedReport
from wire.rpc import request, serve_requests

log = logging.getLogger(__name__)

VERIFY_KIND = "verify"
VERIFY_TIMEOUT_S = 60.0  # one leased check, from its lease's open to its answer
DISCOVER_TIMEOUT_S = 10.0
OFFERS_FRESH_S = 60.0  # a file's verifiers, as found, are looked up again after this long
MAX_FILES = 256  # files whose verifiers are remembered
LEASE_S = 300  # a verifier's lease: one call, then ended
MAX_STOP_CHARS = 4096
MAX_TEXT_CHARS = 1 << 20

VERIFY_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["proof", "request"],
    "properties": {
        # The newest body version taken, as the schema's own bound on it (``body_versions_read``).
        "proof": {
            "type": "object",
            "properties": {"commitment": {"properties": {"body": {"properties": {"v": {"maximum": LATEST_VERSION}}}}}},
        },
        "request": {"type": "object"},
        "text": {"type": ["string", "null"]},
        "longest_stop": {"type": "integer", "minimum": 0},
        "max_tokens": {"type": "integer", "minimum": 1},
    },
}
VERIFY_REPLY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["verdict", "facts"],
    "properties": {
        "verdict": {"type": "object"},
        "facts": {"type": "object"},
        "prompt_ids": {"type": ["array", "null"]},
    },
}


def body_versions_read(params_schema: dict[str, Any]) -> int:
    """The newest commitment body version a ``verify:`` offer's request schema says its verifier
    takes (``proof.commitment.body.v``'s ``maximum``); 3 where it states none (every release before v4
    bodies published ``{"type": "object"}``: such a verifier refuses a v4 proof)."""
    try:
        bound = params_schema["properties"]["proof"]["properties"]["commitment"]["properties"]["body"]
        return int(bound["properties"]["v"]["maximum"])
    except (KeyError, TypeError, ValueError):
        return 3


def verify_capability(sha256: str) -> str:
    return f"{VERIFY_KIND}:{sha256}"


def verify_offer_fields(model_offers: list[dict[str, Any]], price_per_token: int = 0) -> list[dict[str, Any]]:
    """A ``verify:<sha256>`` offer per file among the node's model offers (``ModelHost.offer_fields``),
    priced ``price_per_token`` per token checked, or the model's own price per token when 0."""
    offers: dict[str, dict[str, Any]] = {}
    for offer in model_offers:
        sha256 = offer.get("sha256") or ""
        if not sha256 or not str(offer.get("name", "")).startswith("model:") or sha256 in offers:
            continue
        offers[sha256] = {
            "name": verify_capability(sha256),
            "summary": f"checks calls served with {offer['name']}'s file",
            "unit": "token",
            "price_per_unit": price_per_token or int(offer.get("price_per_unit", 0)),
            "params_schema": VERIFY_REQUEST_SCHEMA,
            "returns": VERIFY_REPLY_SCHEMA,
            "examples": [],
        }
    return list(offers.values())


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    proof: CallProof
    request: dict[str, Any]
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    longest_stop: int = Field(0, ge=0, le=MAX_STOP_CHARS)
    max_tokens: int | None = Field(None, ge=1)


class VerifyFacts(BaseModel):
    """What the verifier's prefill found (``protocols.machines.verify.CheckFacts``' fields that need the file)."""

    model_config = ConfigDict(extra="ignore")

    root_signed: bool
    openings_match: bool
    holds_file: bool = True
    prompt_matches: bool = True
    findings_reason: str = Field("", max_length=64)
    text_matches: bool = True
    prompt_hash_matches: bool = True
    text_hash_matches: bool = True


class VerifyAnswer(BaseModel):
    model_config = ConfigDict(extra="ignore")

    verdict: dict[str, str]
    facts: VerifyFacts
    prompt_ids: list[int] | None = Field(None, max_length=MAX_TOKENS)


def checked_tokens(proof: CallProof) -> int:
    """The tokens one check of ``proof`` evaluates, as its signed body states them: what a verifier bills."""
    body = proof.commitment.body
    return max(1, body.prompt_tokens + body.completion_tokens)


class VerifierService:
    """``verify:<sha256>``: one leased check per call on this node's copy of the file (a MeteredService)."""

    def __init__(self, model: Any, positions: int = 0) -> None:
        self._model = model  # a loaded LlamaModel of the file (its path, chat template, tokenizer)
        self._positions = positions  # verify.positions: 0 compares every reply position

    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        from protocols.lease.verifying import prompt_ids, run_check  # the consumer's own check, shared

        try:
            asked = VerifyRequest.model_validate(body)
        except ValidationError:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "not a verification request") from None
        proof, signed = asked.proof, asked.proof.commitment.body
        prompt = await prompt_ids(self._model, asked.request, signed.prompt_tokens, signed.chat_format)
        if prompt is None:
            # A request this copy cannot render: nothing was checked, nothing is billed.
            await emit(_answer(CheckFacts(True, True, True, False), None, 0))
            return Usage(units=0, detail={"checked_tokens": 0})
        try:
            spot = await trio.to_thread.run_sync(
                run_check, self._model.path, prompt, proof, asked.text, asked.longest_stop, self._positions
            )
        except ValueError:  # longer than this verifier's context
            await emit(_answer(CheckFacts(True, True, True, False), None, 0))
            return Usage(units=0, detail={"checked_tokens": 0})
        facts = CheckFacts(
            root_signed=spot.root_signed,
            answered=True,
            openings_match=spot.openings_match,
            holds_file=True,
            prompt_matches=spot.prompt_matches,
            findings_reason=spot.findings.reason() if spot.findings is not None else "",
            text_matches=spot.text_matches,
            prompt_hash_matches=spot.prompt_hash_matches,
            text_hash_matches=spot.text_hash_matches,
            body_version=signed.v,
        )
        units = checked_tokens(proof)
        await emit(_answer(facts, prompt, units))
        return Usage(units=units, detail={"checked_tokens": units})


def _answer(facts: CheckFacts, prompt: list[int] | None, units: int) -> dict[str, Any]:
    verdict = check_verdict(facts)
    shown = VerifyFacts(
        root_signed=facts.root_signed,
        openings_match=facts.openings_match,
        holds_file=facts.holds_file,
        prompt_matches=facts.prompt_matches,
        findings_reason=facts.findings_reason,
        text_matches=facts.text_matches,
        prompt_hash_matches=facts.prompt_hash_matches,
        text_hash_matches=facts.text_hash_matches,
    )
    answer = VerifyAnswer(verdict={"outcome": verdict.outcome, "reason": verdict.reason}, facts=shown)
    # ``tokens``: the units the consumer counts from this chunk (the tokens checked).
    return {**answer.model_dump(), "prompt_ids": prompt, "tokens": units}


@dataclass(frozen=True)
class RemoteCheck:
    """A leased verifier's answer to one check."""

    verifier: str
    facts: VerifyFacts
    prompt_ids: list[int] | None
    units: int


# sha256 -> discovery's ``verify:<sha256>`` providers
FindVerifiers = Callable[[str], Awaitable[list[VerifierOffer]]]


class RemoteVerifier:
    """The consumer's side: lease a verifier for one check (``Verifying.remote``)."""

    def __init__(self, market: Any, find: FindVerifiers, *, self_id: str, max_price: int | None = None) -> None:
        self.market = market  # a LeaseMarket: open_lease, call, revoke_held
        self.find = find
        self.self_id = self_id
        self.max_price = max_price
        self.spent_units = 0  # tokens checked by leased verifiers, in all
        # sha256 -> (when found, its verifiers); a lookup runs in the background, never in a call's way
        self._offers: dict[str, tuple[float, list[VerifierOffer]]] = {}
        self._looking: set[str] = set()

    async def look_up(self, sha256: str) -> list[VerifierOffer]:
        """Discovery's ``verify:<sha256>`` providers, remembered for the next checks."""
        self._looking.add(sha256)
        offers: list[VerifierOffer] = []
        try:
            with trio.move_on_after(DISCOVER_TIMEOUT_S), contextlib.suppress(Exception):
                offers = await self.find(sha256)
        finally:
            self._looking.discard(sha256)
        self._offers.pop(sha256, None)
        self._offers[sha256] = (trio.current_time(), offers)
        while len(self._offers) > MAX_FILES:
            self._offers.pop(next(iter(self._offers)))
        return offers

    def _known(self, sha256: str) -> list[VerifierOffer] | None:
        """The file's verifiers as last found (None: never looked up); a stale or missing entry starts a
        lookup in the background, so a call never waits for discovery: the first call served with a
        file this node never looked up is left unchecked, and the next drawn one is checked."""
        entry = self._offers.get(sha256)
        if (entry is None or trio.current_time() - entry[0] > OFFERS_FRESH_S) and sha256 not in self._looking:
            self._looking.add(sha256)
            self.market._spawn(self.look_up, sha256)
        return entry[1] if entry is not None else None

    async def __call__(
        self,
        provider: str,
        proof: CallProof,
        request: dict[str, Any],
        text: str | None,
        longest_stop: int,
        *,
        exclude: Collection[str] = (),
    ) -> RemoteCheck | None:
        sha256 = proof.commitment.body.model_sha256
        offers = self._known(sha256) or []
        verifying = self.market.verifying
        held = self.market.held.get(proof.commitment.body.lease_id)
        chosen = choose_verifiers(
            offers,
            provider=provider,
            self_id=self.self_id,
            rng=verifying.rng,
            standing=verifying.verifier_standings(),
            max_price=self.max_price,
            checked_price=held.grant.price_per_unit if held is not None else None,
            exclude=exclude,
            body_version=proof.commitment.body.v,
        )
        prices = {offer.peer_id: offer.price_per_unit for offer in offers}
        units = checked_tokens(proof)
        body = {
            "proof": proof.model_dump(mode="json"),
            "request": request,
            "text": text,
            "longest_stop": min(longest_stop, MAX_STOP_CHARS),
            "max_tokens": units,
        }
        for verifier in chosen:
            with trio.move_on_after(VERIFY_TIMEOUT_S):
                try:
                    return await self._ask(verifier, sha256, prices[verifier], units, body)
                except (ClawnodeError, ValidationError) as error:
                    code = error.code.value if isinstance(error, ClawnodeError) else "E_INVALID_ARGUMENT"
                    log.info("verifier %s did not check the call (%s)", verifier[:16], code)
        return None

    async def _ask(self, verifier: str, sha256: str, price: int, units: int, body: dict[str, Any]) -> RemoteCheck:
        lease = await self.market.open_lease(
            verifier,
            verify_capability(sha256),
            budget=max(1, price) * units,
            duration_s=LEASE_S,
            expected_units=units,
        )
        try:
            result = await self.market.call(lease.lease_id, body, timeout_s=VERIFY_TIMEOUT_S)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10), contextlib.suppress(Exception):
                await self.market.revoke_held(lease.lease_id)  # one call: the rest of the lock comes back
        if not result.chunks:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "the verifier answered nothing")
        answer = VerifyAnswer.model_validate(result.chunks[0])
        if not answer.facts.holds_file:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "the verifier could not check the call")
        self.spent_units += result.units
        return RemoteCheck(verifier, answer.facts, answer.prompt_ids, result.units)


def register_verifiers(model_host: Any, services: Any, positions: int = 0) -> None:
    """Serve ``verify:<sha256>`` for each file ``model_host`` loaded (a ServiceRegistry); ``positions`` as
    ``verify.positions``."""
    for name, sha256 in model_host.sha256s.items():
        model = model_host.get(name)
        if sha256 and model is not None:
            services.register(verify_capability(sha256), VerifierService(model, positions))


def discovery_verifiers(discover: Callable[[Any], Awaitable[list[Any]]]) -> FindVerifiers:
    """``RemoteVerifier.find`` over a node's ``discover`` (the providers it can pay)."""
    from dht.discovery import DiscoveryQuery

    async def find(sha256: str) -> list[VerifierOffer]:
        found = await discover(DiscoveryQuery(capability=verify_capability(sha256)))
        offers = []
        for p in found:
            offer = None if p.is_self else p.record.capability(p.capability)
            if offer is not None:
                offers.append(VerifierOffer(p.peer_id, p.price_per_unit, body_versions_read(offer.params_schema)))
        return offers

    return find


# Shared reports (runtime/verify/reports.py): a peer asks a node for its own signed reports about some
# providers (or its newest ones) and keeps those that verify; they shift its standing, never exclude.
REPORTS_PROTOCOL = TProtocol("/clawnode/verify-reports/1.0.0")
MAX_ASKED = 32  # providers one ask names
MAX_REPORTS = 64  # reports one answer carries
REPORTS_FRAME = 64 * 1024
REPORTS_TIMEOUT_S = 10.0


class ReportsAsk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["reports_ask"] = "reports_ask"
    providers: list[str] = Field(default_factory=list, max_length=MAX_ASKED)


class ReportsAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["reports"] = "reports"
    reports: list[SignedReport] = Field(default_factory=list, max_length=MAX_REPORTS)


REPORTS_ANSWER: TypeAdapter[ReportsAnswer] = TypeAdapter(ReportsAnswer)


def reports_handler(verifying: Any) -> Callable[[INetStream], Awaitable[None]]:
    """The stream handler of :data:`REPORTS_PROTOCOL`: this node's own reports, as ``verifying`` keeps them."""

    async def answer(frame: bytes, remote: ID) -> BaseModel:
        asked = ReportsAsk.model_validate_json(frame)
        return ReportsAnswer(reports=verifying.reports.shared(asked.providers, MAX_REPORTS))

    return serve_requests(answer, max_frame=REPORTS_FRAME, read_timeout_s=REPORTS_TIMEOUT_S)


async def fetch_reports(host: Any, verifying: Any, peer: str, providers: list[str] | None = None) -> int:
    """Ask ``peer`` for its reports about ``providers`` (its newest when None) and keep those that
    verify (``ReportBook.take``); how many were kept."""
    answer = await request(
        host,
        ID.from_base58(peer),
        REPORTS_PROTOCOL,
        ReportsAsk(providers=(providers or [])[:MAX_ASKED]),
        REPORTS_ANSWER,
        timeout_s=REPORTS_TIMEOUT_S,
        max_frame=REPORTS_FRAME,
    )
    return sum(verifying.reports.take(report, peer) for report in answer.reports)


PULL_PEERS = 3  # connected peers asked about a provider this node has not checked yet
PULL_EVERY_S = 600.0  # a provider is asked about again after this long
MAX_PULLED = 1024  # providers remembered as asked about


class ReportPuller:
    """Asks a few connected peers for their reports about a provider the first time this node calls it
    (``Verifying.pull_reports``), in the background: never in a call's way."""

    def __init__(self, market: Any, verifying: Any) -> None:
        self.market = market  # a LeaseMarket: its host, its nursery
        self.verifying = verifying
        self._asked: dict[str, float] = {}  # provider -> when its peers were last asked

    def __call__(self, provider: str) -> None:
        now = trio.current_time()
        if now - self._asked.get(provider, -PULL_EVERY_S) < PULL_EVERY_S:
            return
        self._asked.pop(provider, None)
        self._asked[provider] = now
        while len(self._asked) > MAX_PULLED:
            self._asked.pop(next(iter(self._asked)))
        self.market._spawn(self._pull, provider)

    async def _pull(self, provider: str) -> None:
        host = self.market.host
        peers = [str(p) for p in host.get_connected_peers() if str(p) != provider][:PULL_PEERS]
        for peer in peers:
            with contextlib.suppress(Exception):  # an unreachable or odd peer: the next one
                await fetch_reports(host, self.verifying, peer, [provider])
