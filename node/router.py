"""The router: answers a model request locally, or buys it from the network, with fallback.

Order of preference for ``model:<name>``: a model this node serves itself; then providers found
through discovery, ranked by health, load, price and measured latency (EWMA), each used through
a lease the router opens itself and reuses; then a configured upstream OpenAI-compatible URL.
A provider that refuses, stalls or disconnects mid-stream costs a short pause: the router moves
to the next one and asks it to continue the same answer (the text so far is sent back as the
start of the assistant's reply), so the agent's stream goes on where it stopped. Only a plain text
answer can be continued so: a request with ``n`` > 1, ``tools`` or a ``response_format`` other than
text (its grammar state is not in the text) fails over before its first chunk only, never mid-answer.

Chunks: the API receives every chunk dict a service emits (``text``, ``tokens``, ``index``,
``logprobs``, ``tool_calls``, ``finish_reason``: the chunk contract of ``runtime/inference/service.py``),
checked first by :func:`clean_chunk` (a provider is a stranger); ``tokens`` is counted even when a
chunk holds no text (tool-call tokens are metered too). Discovery is asked only for providers whose
model descriptor serves the request's features (``required_features``).

Leases: before each request the router checks that the provider's lease still covers it, by budget
(what the request may reserve at most, ``call_units_needed``, beside the units already used and those
held by calls in flight) and by time (``RENEW_BEFORE_S`` before it expires); one that does not is
retired and a new one opened first, so no agent request meets a spent lease (``lease_fits``, a pure
verdict in ``protocols/machines/lease.py``, beside the reservation rule it mirrors). A retired lease
is ended once its last call returns: its rest is refunded and it leaves the live set. A refusal
retires the lease only when its reason says it is spent (``ended``, ``expired``, ``over_budget``:
``lease_outlives``); one that is only ``paused`` (a receipt waits for our countersignature) is kept,
so the request fails over but no second lock goes on chain, and the lease serves again once the
countersignature lands.

Busy: a provider whose model queue is full refuses with ``E_RATE_LIMITED`` reason ``busy`` and a
``retry_after_s`` hint; that is no fault (the provider stays in rotation): the next provider is
tried, and when every one is busy the request waits the soonest hint and tries again while that fits
in ``busy_wait_s``, then fails with ``E_RATE_LIMITED`` carrying the hint (``/v1``: 429 with
``Retry-After``, before any byte of a stream).

Ranking (``protocols/machines/routing.py``, a pure function of the facts fetched here): a provider
with a free slot first, then one that would queue the request, a full one (or one whose busy hint
still runs) only when no other is left, one out of rotation last; within that, cheaper, less loaded,
faster, better verified. The load is the provider's own live answer (its capability protocol's
``load``, unsigned), fetched before a request that has more than one provider to choose from when the
last answer is older than ``LOAD_FRESH_S`` (at most ``LOAD_FETCH_TIMEOUT_S`` spent on it; a provider
that does not answer in time keeps its last answer for up to ``LOAD_MAX_AGE_S``), plus the calls this
router started on it since; without one, the router's own calls in flight against the capacity its
record states. A provider this node failed in a verification check is never asked.

Health: every ``health_interval_s`` the router asks each provider it knows for its capability answer
(a round trip it also feeds into the latency EWMA, and the live load); ``failures_to_failover``
consecutive failures (calls or checks) take a provider out of rotation until a check succeeds again.
A provider that served or answered a check within ``REMEMBER_S`` stays a candidate when discovery's
latest answer misses it (its live record fetch timed out under load): discovery's last copy of its
signed record is used while that record has not expired.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from pydantic import ValidationError

from dht.capability import ErrorReply, Reply, ask_record
from dht.discovery import DiscoveryQuery, ProviderResult
from node.config import RouterSection
from protocols.lease import LeaseMarket
from protocols.lease.split import SplitRunner
from protocols.machines.layers import NO_LAYER_SELLERS
from protocols.machines.lease import call_units_needed, lease_fits, lease_outlives
from protocols.machines.model_features import required_features
from protocols.machines.routing import Candidate, LiveLoad, rank_candidates
from protocols.machines.verify import standing
from runtime.errors import ClawnodeError, ErrorCode, Reason
from runtime.jsonsafe import loads_bounded
from runtime.service import ServiceRegistry
from runtime.telemetry import LatencyHistogram

log = logging.getLogger(__name__)

EWMA_ALPHA = 0.3
# Live load (the provider's capability protocol answer): fetched again before a request with a choice
# when older than this; a fetch gets at most this long; an answer older than the last is not used.
LOAD_FRESH_S = 1.0
LOAD_FETCH_TIMEOUT_S = 0.5
LOAD_MAX_AGE_S = 15.0
# A provider that served or answered within this long stays a candidate when discovery misses it.
REMEMBER_S = 60.0
MAX_REMEMBERED = 1024  # peers whose load, and capabilities whose providers, the router keeps
# Errors that say "this provider, not this request": try the next one.
PROVIDER_FAULTS = frozenset(
    {
        ErrorCode.UNAVAILABLE,
        ErrorCode.TIMEOUT,
        ErrorCode.INTERNAL,
        ErrorCode.RATE_LIMITED,
        ErrorCode.CONFLICT,
        ErrorCode.EXPIRED,
        ErrorCode.INSUFFICIENT_FUNDS,
        ErrorCode.FORBIDDEN,
        ErrorCode.NOT_FOUND,
    }
)


def capacity_of(provider: ProviderResult) -> int:
    """The requests a provider's record says its model takes at once (generating and waiting); 1
    where it says nothing."""
    descriptor = provider.record.capability(provider.capability)
    facts = descriptor.model if descriptor is not None else None
    if facts is None or facts.parallel < 1:
        return 1
    return facts.parallel + facts.max_queue


def is_busy(error: ClawnodeError) -> bool:
    """A refusal that says "not now": a model's queue is full (``busy``, with a retry-after hint)."""
    return error.code == ErrorCode.RATE_LIMITED and (error.reason == Reason.BUSY or error.retry_after_s is not None)


@dataclass
class _Delivery:
    """What a request has delivered to its agent so far (across failovers and retries)."""

    texts: list[str] = field(default_factory=list)
    tokens: int = 0
    chunks: int = 0


@dataclass
class ProviderHealth:
    ewma_latency_s: float | None = None
    consecutive_failures: int = 0
    in_flight: int = 0
    served: int = 0
    busy_until: float = 0.0  # a busy refusal's hint: ranked after the others until then
    last_ok: float | None = None  # when it last served, answered a check or was found (router clock)

    def record_latency(self, seconds: float) -> None:
        self.ewma_latency_s = (
            seconds if self.ewma_latency_s is None else EWMA_ALPHA * seconds + (1 - EWMA_ALPHA) * self.ewma_latency_s
        )


@dataclass
class _SeenLoad:
    """A provider's last live-load answer (router clock), and this router's calls started since."""

    fetched_at: float
    loads: dict[str, dict[str, int]]
    started: dict[str, int] = field(default_factory=dict)  # capability -> calls started since, still running


@dataclass
class RouteResult:
    """How a request was answered: usage as the agent should see it and who served each part."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those the provider's KV cache already held
    served_by: list[str] = field(default_factory=list)
    failovers: int = 0


@dataclass
class ConsensusOutcome:
    text: str
    usage: RouteResult
    answers: list[tuple[str, str]]  # (who served it, the answer)
    majority: list[int]
    confidence: float
    reached: bool

    def report(self) -> dict[str, Any]:
        replicas = len(self.answers)
        return {
            "served_by": [who for who, _ in self.answers],
            "failovers": self.usage.failovers,
            "consensus": {
                "replicas": replicas,
                "agreement": f"{len(self.majority)}/{replicas}",
                "agreement_ratio": round(len(self.majority) / replicas, 4) if replicas else 0.0,
                "confidence": round(self.confidence, 4),
                "reached": self.reached,
                "majority": [self.answers[i][0] for i in self.majority],
                "note": None if self.reached else "no answer reached the majority; the best cluster is returned",
            },
        }


# A lease is renewed when it would expire within this many seconds (or a tenth of its duration).
RENEW_BEFORE_S = 30.0


TextSink = Callable[[str], Awaitable[None]]
# A chunk dict as the chat service emits it, checked by ``clean_chunk``.
ChunkSink = Callable[[dict[str, Any]], Awaitable[None]]


class _Counted:
    """A sink that cleans each chunk a provider (or the split model) streams and counts its tokens, so a
    failed try still bills what was delivered before it."""

    def __init__(self, sink: ChunkSink) -> None:
        self.sink = sink
        self.received = 0

    async def __call__(self, data: dict[str, Any]) -> None:
        chunk = clean_chunk(data)
        self.received += chunk_tokens(chunk)
        await self.sink(chunk)


Embed = Callable[[list[str]], Awaitable[list[list[float]]]]
Discover = Callable[[DiscoveryQuery], Awaitable[list[ProviderResult]]]
FetchRtt = Callable[[str], Awaitable[float]]
# A provider's capability protocol answer: (round trip in seconds, live load per capability).
FetchLoad = Callable[[str], Awaitable[tuple[float, dict[str, dict[str, int]]]]]


async def fetch_live_load(
    host: IHost, peer: str, timeout_s: float = LOAD_FETCH_TIMEOUT_S
) -> tuple[float, dict[str, dict[str, int]]]:
    """``peer``'s live load (``RecordReply.load``, unsigned and advisory) and the round trip it took.
    The sealed record beside it is not verified here: discovery does that; only the load is read."""
    frame, rtt = await ask_record(host, ID.from_base58(peer), timeout_s)
    try:
        reply = Reply.validate_json(frame)
    except ValidationError:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "the peer sent an unreadable reply") from None
    if isinstance(reply, ErrorReply):
        raise ClawnodeError(reply.code, reply.message[:200])
    return rtt, reply.load


class Router:
    def __init__(
        self,
        market: LeaseMarket,
        services: ServiceRegistry,
        discover: Discover,
        settings: RouterSection,
        *,
        fetch_rtt: FetchRtt | None = None,
        fetch_load: FetchLoad | None = None,
        embed: Embed | None = None,
        clock: Callable[[], float] = time.monotonic,
        unpayable_note: Callable[[str], str | None] | None = None,
    ) -> None:
        self.embed = embed
        # "3 providers on other chains" for a capability discovery found only unpayable providers of.
        self.unpayable_note = unpayable_note
        self.market = market
        self.services = services
        self.discover = discover
        self.settings = settings
        self.fetch_rtt = fetch_rtt
        self.fetch_load = fetch_load
        self.clock = clock
        self.health: dict[str, ProviderHealth] = {}
        self._loads: dict[str, _SeenLoad] = {}  # peer -> its last live-load answer
        self._load_locks: dict[str, trio.Lock] = {}
        # capability -> peer -> discovery's last result for it (a candidate while recently healthy)
        self._remembered: dict[str, dict[str, ProviderResult]] = {}
        self._leases: dict[tuple[str, str], str] = {}
        self._lease_locks: dict[tuple[str, str], trio.Lock] = {}
        self._reserved: dict[str, int] = {}  # lease id -> units its calls in flight may use
        self._in_flight: dict[str, int] = {}  # lease id -> calls in flight
        self._retired: set[str] = set()  # replaced leases, ended when their last call returns
        self.leases_opened = 0
        self.leases_renewed = 0
        # Models this node runs split, over layers leased from peers (docs/split.md); set by the daemon.
        self.split: SplitRunner | None = None
        # For /metrics: model calls answered by this node's own services.
        self.local_first_chunk_s = LatencyHistogram()
        self.local_duration_s = LatencyHistogram()

    # -- health --

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        while True:
            await trio.sleep(self.settings.health_interval_s)
            if self.fetch_rtt is None:
                continue
            async with trio.open_nursery() as nursery:
                for peer in list(self.health):
                    nursery.start_soon(self._check, peer)
                    nursery.start_soon(self._refresh_load, peer)

    async def _check(self, peer: str) -> None:
        assert self.fetch_rtt is not None
        health = self.health[peer]
        try:
            with trio.fail_after(self.settings.stall_timeout_s):
                rtt = await self.fetch_rtt(peer)
        except (ClawnodeError, trio.TooSlowError):
            health.consecutive_failures += 1
            return
        health.consecutive_failures = 0
        health.last_ok = self.clock()
        health.record_latency(rtt)

    async def _refresh_load(self, peer: str) -> None:
        """``peer``'s live load asked again when the last answer is older than ``LOAD_FRESH_S``; one
        ask per peer at a time (a request finding one under way goes on with what is known). A peer
        that does not answer within ``LOAD_FETCH_TIMEOUT_S`` keeps its last answer: no fault counted."""
        seen = self._loads.get(peer)
        lock = self._load_locks.setdefault(peer, trio.Lock())
        if self.fetch_load is None or lock.locked() or (seen and self.clock() - seen.fetched_at < LOAD_FRESH_S):
            return
        async with lock:
            loads: dict[str, dict[str, int]] | None = None
            with trio.move_on_after(LOAD_FETCH_TIMEOUT_S):
                try:
                    _, loads = await self.fetch_load(peer)
                except ClawnodeError as error:
                    log.debug("no live load from %s (%s)", peer[:16], error.code)
            if loads is None:
                return
            self._loads.pop(peer, None)
            self._loads[peer] = _SeenLoad(self.clock(), loads)
            while len(self._loads) > MAX_REMEMBERED:
                evicted = next(iter(self._loads))
                del self._loads[evicted]
                self._load_locks.pop(evicted, None)

    async def _refresh_loads(self, providers: list[ProviderResult]) -> None:
        """Live loads of the candidates, when there is a choice to make (two or more)."""
        peers = {p.peer_id for p in providers if not p.is_self}
        if self.fetch_load is None or len(peers) < 2:
            return
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(self._refresh_load, peer)

    async def _candidates(self, query: DiscoveryQuery) -> list[ProviderResult]:
        """Discovery's providers, and those it missed this time that served, answered a check or were
        found within ``REMEMBER_S`` (a busy provider's record fetch can time out under load), while
        the signed record discovery last returned for them has not expired; then their live loads."""
        found = await self.discover(query)
        now = self.clock()
        remembered = self._remembered.pop(query.capability, {})
        self._remembered[query.capability] = remembered  # the most recently asked last (evicted last)
        for provider in found:
            if not provider.is_self:
                self._health(provider.peer_id).last_ok = now
                remembered.pop(provider.peer_id, None)
                remembered[provider.peer_id] = provider
        while len(remembered) > MAX_REMEMBERED // 16:
            del remembered[next(iter(remembered))]
        while len(self._remembered) > MAX_REMEMBERED:
            del self._remembered[next(iter(self._remembered))]
        listed = {provider.peer_id for provider in found}
        wall = time.time()
        for peer, provider in remembered.items():
            health = self._health(peer)
            if (
                peer not in listed
                and health.consecutive_failures == 0
                and health.last_ok is not None
                and now - health.last_ok <= REMEMBER_S
                and provider.record.expires_at > wall
                and set(query.features) <= set(provider.features)
            ):
                log.info("discovery missed %s; still a candidate (healthy %.0f s ago)", peer[:16], now - health.last_ok)
                found = [*found, provider]
        await self._refresh_loads(found)
        return found

    def usable(self, peer: str) -> bool:
        return self._health(peer).consecutive_failures < self.settings.failures_to_failover

    def _health(self, peer: str) -> ProviderHealth:
        return self.health.setdefault(peer, ProviderHealth())

    def rank(self, providers: list[ProviderResult]) -> list[ProviderResult]:
        """The providers in the order to try them (``protocols.machines.routing.rank_candidates``):
        by room (live load, else our calls in flight against the record's capacity), health and busy
        hints, then price, load, latency and verification standing; never a provider that failed one
        of this node's verification checks."""
        by_peer: dict[str, ProviderResult] = {}
        for provider in providers:
            if not provider.is_self:
                by_peer.setdefault(provider.peer_id, provider)
        now = self.clock()
        return [by_peer[peer] for peer in rank_candidates([self._candidate(p, now) for p in by_peer.values()])]

    def _candidate(self, provider: ProviderResult, now: float) -> Candidate:
        """What the router knows of ``provider``, as the ranking's plain facts."""
        health = self._health(provider.peer_id)
        descriptor = provider.record.capability(provider.capability)
        facts = descriptor.model if descriptor is not None else None
        seen = self._loads.get(provider.peer_id)
        load = None
        if seen is not None and now - seen.fetched_at <= LOAD_MAX_AGE_S:
            load = LiveLoad.parse(seen.loads.get(provider.capability))
        # Verified inference: a provider that failed one of this node's checks has standing 0; peers'
        # signed reports shift it, never to 0.
        verifying = getattr(self.market, "verifying", None)
        return Candidate(
            peer_id=provider.peer_id,
            price_per_unit=provider.price_per_unit,
            latency_s=health.ewma_latency_s if health.ewma_latency_s is not None else provider.rtt_ms / 1000,
            standing=verifying.standing(provider.peer_id) if verifying is not None else standing(0, 0),
            load=load,
            since_report=seen.started.get(provider.capability, 0) if load is not None and seen is not None else 0,
            in_flight=health.in_flight,
            parallel=facts.parallel if facts is not None else 0,
            max_queue=facts.max_queue if facts is not None else 0,
            healthy=self.usable(provider.peer_id),
            busy=health.busy_until > now,
        )

    # -- answering --

    async def chat(self, model: str, body: dict[str, Any], on_text: TextSink) -> RouteResult:
        """Answer a chat request for ``model``, streaming only its text pieces to ``on_text``."""

        async def text_only(chunk: dict[str, Any]) -> None:
            text = chunk.get("text")
            if isinstance(text, str) and text:
                await on_text(text)

        return await self.chat_chunks(model, body, text_only)

    async def chat_chunks(self, model: str, body: dict[str, Any], on_chunk: ChunkSink) -> RouteResult:
        """Answer a chat request for ``model``, streaming every (checked) chunk dict to ``on_chunk``."""
        capability = f"model:{model}"
        result = RouteResult()
        delivery = _Delivery()

        async def sink(chunk: dict[str, Any]) -> None:
            text = chunk.get("text")
            if isinstance(text, str):
                delivery.texts.append(text)
            delivery.tokens += chunk_tokens(chunk)
            delivery.chunks += 1
            await on_chunk(chunk)

        # A busy answer (every provider's queue full, or ours) is waited out while the hint fits in
        # ``busy_wait_s``; after that the agent is told to retry (HTTP 429 with Retry-After).
        give_up_at = trio.current_time() + self.settings.busy_wait_s
        while True:
            try:
                return await self._chat_attempt(model, capability, body, sink, result, delivery)
            except ClawnodeError as error:
                if not is_busy(error) or delivery.chunks:
                    raise
                wait = error.retry_after_s if error.retry_after_s is not None else 1.0
                if trio.current_time() + wait > give_up_at:
                    raise
                log.info("%s is busy; retrying in %.1f s", model, wait)
                await trio.sleep(wait)

    async def _chat_attempt(
        self,
        model: str,
        capability: str,
        body: dict[str, Any],
        sink: ChunkSink,
        result: RouteResult,
        delivery: _Delivery,
    ) -> RouteResult:
        local = self.services.get(capability)
        if local is not None:
            started = time.monotonic()
            first_chunk = [True]

            async def emit(data: dict[str, Any]) -> None:
                if first_chunk[0]:
                    first_chunk[0] = False
                    self.local_first_chunk_s.observe(time.monotonic() - started)
                await sink(clean_chunk(data))

            usage = await local.run(body, emit)
            self.local_duration_s.observe(time.monotonic() - started)
            result.prompt_tokens = usage.detail.get("prompt_tokens", 0)
            result.completion_tokens = usage.detail.get("completion_tokens", 0)
            result.cached_tokens = _cached(usage.detail)
            result.served_by.append("local")
            return result

        errors: list[ClawnodeError] = []
        resumable = continuable(body)
        split = self.split if self.split is not None and self.split.holds(model) else None
        if split is not None and split.prefer and await self._from_split(model, body, sink, result, delivery, errors):
            return result
        providers = self.rank(await self._candidates(discovery_query(capability, body)))
        for provider in providers[: self.settings.max_providers]:
            if not self.usable(provider.peer_id) and any(self.usable(p.peer_id) for p in providers):
                continue
            try:
                body_now = _continued(body, delivery.texts, delivery.tokens)
                await self._from_provider(provider, capability, body_now, sink, result)
                return result
            except ClawnodeError as error:
                if error.code not in PROVIDER_FAULTS:
                    raise
                errors.append(error)
                result.failovers += 1
                log.info("provider %s failed (%s %s); trying the next", provider.peer_id[:16], error.code, error.reason)
                if delivery.chunks and not resumable:
                    raise ClawnodeError(
                        ErrorCode.UNAVAILABLE,
                        f"the provider of {model} failed mid-answer ({error.code}); an answer with n > 1, "
                        "tools or a response_format cannot be continued by another provider",
                    ) from None
        if (
            split is not None
            and not split.prefer
            and await self._from_split(model, body, sink, result, delivery, errors)
        ):
            return result
        if self.settings.upstream_url and (resumable or not delivery.chunks):
            await self._from_upstream(model, _continued(body, delivery.texts, delivery.tokens), sink, result)
            return result
        busy = [error for error in errors if is_busy(error)]
        if busy:
            # Someone can take it later: the agent is told when (the soonest hint), not that it failed.
            hint = min(error.retry_after_s or 1.0 for error in busy)
            raise ClawnodeError(
                ErrorCode.RATE_LIMITED,
                f"every provider of {model} is busy or failed; retry after {hint:g} s",
                Reason.BUSY,
                retry_after_s=hint,
            )
        if errors:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, f"every provider of {model} failed (last: {errors[-1].code})")
        needs = sorted(required_features(body))
        serving = f"{model} with {', '.join(needs)}" if needs else model
        note = self.unpayable_note(f"model:{model}") if self.unpayable_note is not None else None
        if note is not None:
            raise ClawnodeError(
                ErrorCode.NOT_FOUND, f"no node this one can pay serves {serving} ({note}); no upstream is configured"
            )
        raise ClawnodeError(ErrorCode.NOT_FOUND, f"no node serves {serving} and no upstream is configured")

    async def embeddings(self, model: str, texts: list[str] | list[list[int]]) -> tuple[list[list[float]], int, str]:
        """Vectors for ``texts`` (strings or token-id lists) from ``embedding:<model>``: local, else the
        first provider that answers.

        Returns (vectors, input tokens, who served them).
        """
        capability = f"embedding:{model}"
        body: dict[str, Any] = {"input": texts}
        chunks: list[dict[str, Any]] = []

        async def collect(data: dict[str, Any]) -> None:
            chunks.append(data)

        served_by = "local"
        local = self.services.get(capability)
        if local is not None:
            usage = await local.run(body, collect)
            tokens = usage.detail.get("prompt_tokens", usage.units)
        else:
            providers = self.rank(await self._candidates(DiscoveryQuery(capability=capability, limit=20)))
            if not providers:
                raise ClawnodeError(ErrorCode.NOT_FOUND, f"no node serves embeddings of {model}")
            last: ClawnodeError | None = None
            for provider in providers[: self.settings.max_providers]:
                chunks.clear()
                try:
                    lease_id = await self._lease(provider, capability, body)
                    async with self._using(lease_id, body):
                        end = await self.market.stream_call(
                            lease_id, body, collect, stall_s=self.settings.stall_timeout_s
                        )
                except ClawnodeError as error:
                    if error.code not in PROVIDER_FAULTS:
                        raise
                    self._health(provider.peer_id).consecutive_failures += 1
                    last = error
                    continue
                tokens, served_by = end.usage.get("prompt_tokens", end.units), provider.peer_id
                break
            else:
                assert last is not None
                raise ClawnodeError(ErrorCode.UNAVAILABLE, f"every provider of {capability} failed ({last.code})")
        vectors = [
            vector for chunk in sorted(chunks, key=lambda c: c.get("index", 0)) for vector in chunk["embeddings"]
        ]
        if len(vectors) != len(texts):
            raise ClawnodeError(ErrorCode.INTERNAL, "the provider returned a different number of vectors")
        return vectors, tokens, served_by

    async def consensus(self, model: str, body: dict[str, Any], replicas: int) -> ConsensusOutcome:
        """The same prompt on ``replicas`` providers at temperature 0; the majority cluster's answer.

        Answers are compared by the cosine similarity of their embeddings (the local engine's when
        it has a model loaded, else a character-trigram profile); two answers agree at
        ``consensus_similarity``, and the largest group of mutually agreeing answers wins when it
        holds at least ``consensus_majority`` of the replicas.
        """
        capability = f"model:{model}"
        providers = self.rank(await self._candidates(DiscoveryQuery(capability=capability, limit=20)))
        if len(providers) < replicas:
            raise ClawnodeError(
                ErrorCode.UNAVAILABLE, f"consensus needs {replicas} providers of {model}; {len(providers)} found"
            )
        answers: list[tuple[str, str]] = []
        usage = RouteResult()
        queue = list(providers)

        async def one() -> None:
            while queue:
                provider = queue.pop(0)
                pieces: list[str] = []

                async def sink(chunk: dict[str, Any], pieces: list[str] = pieces) -> None:
                    text = chunk.get("text")
                    if isinstance(text, str):
                        pieces.append(text)

                result = RouteResult()
                try:
                    await self._from_provider(provider, capability, body, sink, result)
                except ClawnodeError as error:
                    if error.code not in PROVIDER_FAULTS:
                        raise
                    usage.failovers += 1
                    continue
                answers.append((provider.peer_id, "".join(pieces)))
                usage.prompt_tokens += result.prompt_tokens
                usage.completion_tokens += result.completion_tokens
                usage.served_by.append(provider.peer_id)
                return

        async with trio.open_nursery() as nursery:
            for _ in range(replicas):
                nursery.start_soon(one)
        if not answers:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, f"no provider of {model} answered")
        vectors = await (self.embed or _trigram_vectors)([text for _, text in answers])
        majority, confidence = majority_cluster(vectors, self.settings.consensus_similarity)
        reached = len(majority) / replicas >= self.settings.consensus_majority
        return ConsensusOutcome(answers[majority[0]][1], usage, answers, majority, confidence, reached)

    async def _from_provider(
        self, provider: ProviderResult, capability: str, body: dict[str, Any], sink: ChunkSink, result: RouteResult
    ) -> None:
        health = self._health(provider.peer_id)
        lease_id = await self._lease(provider, capability, body)
        on_chunk = _Counted(sink)
        started = self.clock()
        health.in_flight += 1
        # Counted on top of its last live-load answer while it runs, until the next answer counts it.
        seen = self._loads.get(provider.peer_id)
        if seen is not None:
            seen.started[capability] = seen.started.get(capability, 0) + 1
        try:
            async with self._using(lease_id, body):
                end = await self.market.stream_call(lease_id, body, on_chunk, stall_s=self.settings.stall_timeout_s)
        except ClawnodeError as error:
            if is_busy(error):  # a full queue is not a fault: the provider stays in rotation, ranked later
                hint = error.retry_after_s if error.retry_after_s is not None else 1.0
                health.busy_until = self.clock() + min(hint, 60.0)
            else:
                health.consecutive_failures += 1
            result.completion_tokens += on_chunk.received  # delivered before the failure
            if on_chunk.received:
                result.served_by.append(provider.peer_id)
            # A lease only paused (its receipt waits for our countersignature) or busy serves again by
            # itself: kept, so no second lock goes on chain for it; an ended, expired or spent one goes.
            if not lease_outlives(error.code, error.reason):
                if self._leases.get((provider.peer_id, capability)) == lease_id:
                    del self._leases[(provider.peer_id, capability)]
                await self._retire(lease_id)
            raise
        finally:
            health.in_flight -= 1
            if seen is not None and seen.started.get(capability, 0) > 0:
                seen.started[capability] -= 1
        health.consecutive_failures = 0
        health.last_ok = self.clock()
        health.served += 1
        health.record_latency(self.clock() - started)
        result.prompt_tokens = end.usage.get("prompt_tokens", 0)
        result.completion_tokens += end.usage.get("completion_tokens", end.units)
        result.cached_tokens = _cached(end.usage)
        result.served_by.append(provider.peer_id)

    async def _from_split(
        self,
        model: str,
        body: dict[str, Any],
        sink: ChunkSink,
        result: RouteResult,
        delivery: _Delivery,
        errors: list[ClawnodeError],
    ) -> bool:
        """Run ``model`` split over leased layers (docs/split.md). A lost layer seller fails the try
        (the runner places the layers anew without it) and the next try continues the answer, as a
        whole-model provider's would be; False when every try failed (the caller falls back)."""
        assert self.split is not None
        resumable = continuable(body)
        for _ in range(self.split.max_tries):
            if delivery.chunks and not resumable:
                raise ClawnodeError(
                    ErrorCode.UNAVAILABLE,
                    f"a layer seller of {model} was lost mid-answer; an answer with n > 1, tools or a "
                    "response_format cannot be continued",
                )
            on_chunk = _Counted(sink)
            try:
                usage = await self.split.chat(model, _continued(body, delivery.texts, delivery.tokens), on_chunk)
            except ClawnodeError as error:
                if error.code not in PROVIDER_FAULTS:
                    raise
                errors.append(error)
                result.completion_tokens += on_chunk.received
                if on_chunk.received:
                    result.served_by.append("split")
                if error.reason == NO_LAYER_SELLERS:
                    return False
                result.failovers += 1
                log.info("split %s failed (%s %s)", model, error.code, error.reason)
                continue
            detail = usage.get("detail") or {}
            result.prompt_tokens = int(detail.get("prompt_tokens", 0))
            result.completion_tokens += int(detail.get("completion_tokens", usage.get("units", 0)))
            result.cached_tokens = _cached(detail)
            result.served_by.append("split")
            return True
        return False

    async def _lease(self, provider: ProviderResult, capability: str, body: dict[str, Any]) -> str:
        """The provider's lease for ``capability``, renewed first when it cannot carry ``body``."""
        key = (provider.peer_id, capability)
        need = call_units_needed(body)
        async with self._lease_locks.setdefault(key, trio.Lock()):
            lease_id = self._leases.get(key)
            if lease_id is not None:
                held = self.market.held.get(lease_id)
                if held is not None and held.ended_reason is None:
                    grant = held.grant
                    fit = lease_fits(
                        budget=grant.budget,
                        price_per_unit=grant.price_per_unit,
                        used_units=held.seen_units,
                        reserved_units=self._reserved.get(lease_id, 0),
                        need_units=need,
                        expires_at=grant.expires_at,
                        now=self.market.clock(),
                        renew_before_s=min(RENEW_BEFORE_S, self.settings.lease_duration_s / 10),
                    )
                    if fit.ok:
                        return lease_id
                    log.info("lease %s runs out (%s); opening the next one first", lease_id[:12], fit.reason)
                    self.leases_renewed += 1
                del self._leases[key]
                await self._retire(lease_id)
            units = max(self.settings.lease_units, 2 * need)
            budget = max(1, provider.price_per_unit) * units
            view = await self.market.open_lease(
                provider.peer_id,
                capability,
                budget=budget,
                duration_s=self.settings.lease_duration_s,
                expected_units=units,
                channel=self.settings.channels,  # drawn on the pair's payment channel: no lock per lease
            )
            self.leases_opened += 1
            self._leases[key] = view.lease_id
            return view.lease_id

    @asynccontextmanager
    async def _using(self, lease_id: str, body: dict[str, Any]) -> AsyncIterator[None]:
        """One call on ``lease_id``: its units held against the lease while it runs; a retired lease
        is ended when its last call returns."""
        units = call_units_needed(body)
        self._reserved[lease_id] = self._reserved.get(lease_id, 0) + units
        self._in_flight[lease_id] = self._in_flight.get(lease_id, 0) + 1
        try:
            yield
        finally:
            self._reserved[lease_id] -= units
            self._in_flight[lease_id] -= 1
            if not self._in_flight[lease_id]:
                del self._reserved[lease_id], self._in_flight[lease_id]
                if lease_id in self._retired:
                    with trio.CancelScope(shield=True):
                        await self._end(lease_id)

    async def _retire(self, lease_id: str) -> None:
        """A lease the router no longer uses: ended now when idle, else after its last call."""
        if self._in_flight.get(lease_id):
            self._retired.add(lease_id)
            return
        await self._end(lease_id)

    async def _end(self, lease_id: str) -> None:
        self._retired.discard(lease_id)
        held = self.market.held.get(lease_id)
        if held is None or held.ended_reason is not None:
            return
        try:
            with trio.move_on_after(self.settings.stall_timeout_s):
                await self.market.revoke(lease_id)  # the rest is refunded; it leaves the live set
        except ClawnodeError as error:
            log.info("could not end the spent lease %s (%s)", lease_id[:12], error.code)

    async def _from_upstream(self, model: str, body: dict[str, Any], sink: ChunkSink, result: RouteResult) -> None:
        url = self.settings.upstream_url.rstrip("/") + "/chat/completions"
        headers = (
            {"authorization": f"Bearer {self.settings.upstream_api_key}"} if self.settings.upstream_api_key else {}
        )
        request = {**_openai_body(body), "model": model, "stream": True, "stream_options": {"include_usage": True}}
        try:
            async with httpx.AsyncClient(timeout=self.settings.upstream_timeout_s) as client:
                async with client.stream("POST", url, json=request, headers=headers) as reply:
                    if reply.status_code != 200:
                        raise ClawnodeError(ErrorCode.UNAVAILABLE, f"the upstream answered {reply.status_code}")
                    async for event in _sse_events(reply.aiter_lines()):
                        for choice in event.get("choices") or []:
                            if isinstance(choice, dict):
                                await sink(clean_chunk(_upstream_chunk(choice)))
                        usage = event.get("usage")
                        if isinstance(usage, dict):
                            result.prompt_tokens = int(usage.get("prompt_tokens", 0))
                            result.completion_tokens += int(usage.get("completion_tokens", 0))
                            details = usage.get("prompt_tokens_details")
                            if isinstance(details, dict):
                                cached = {"cached_tokens": details.get("cached_tokens", 0)}
                                result.cached_tokens = _cached({**cached, "prompt_tokens": result.prompt_tokens})
        except httpx.HTTPError as error:
            # The URL may carry credentials: say what failed, never where.
            raise ClawnodeError(ErrorCode.UNAVAILABLE, f"the upstream failed ({type(error).__name__})") from None
        result.served_by.append("upstream")

    async def fetch_rtt_via(self, describe: Callable[[ID], Awaitable[Any]], peer: str) -> float:
        started = self.clock()
        await describe(ID.from_base58(peer))
        return self.clock() - started


def _cached(usage: dict[str, Any]) -> int:
    """A usage's ``cached_tokens``, never more than its prompt tokens (a provider is a stranger)."""
    cached, prompt = usage.get("cached_tokens", 0), usage.get("prompt_tokens", 0)
    if not isinstance(cached, int) or isinstance(cached, bool) or not isinstance(prompt, int):
        return 0
    return max(0, min(cached, prompt))


def chunk_tokens(chunk: dict[str, Any]) -> int:
    """Tokens a checked chunk stands for (its ``tokens``; one for a text chunk that does not say)."""
    tokens = chunk.get("tokens")
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
        return tokens
    return 1 if chunk.get("text") else 0


CHUNK_KEYS = frozenset({"text", "tokens", "index", "logprobs", "tool_calls", "finish_reason"})
MAX_CHOICES = 8
MAX_TOOL_CALLS = 64
MAX_CHUNK_LOGPROBS = 4096
MAX_TOP_LOGPROBS = 20


def _bad_chunk(what: str) -> ClawnodeError:
    # The provider's fault, not the request's: the router fails over (before the first chunk).
    return ClawnodeError(ErrorCode.INTERNAL, f"the provider sent a malformed chunk ({what})")


def _logprob_entry(entry: Any, top: bool) -> dict[str, Any]:
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        raise _bad_chunk("logprobs")
    logprob = entry.get("logprob")
    if isinstance(logprob, bool) or not isinstance(logprob, int | float) or math.isnan(logprob) or logprob > 1e-3:
        raise _bad_chunk("logprobs")
    raw = entry.get("bytes")
    out: dict[str, Any] = {
        "token": entry["token"],
        "logprob": min(0.0, max(float(logprob), -9999.0)),
        "bytes": [b for b in raw if isinstance(b, int) and 0 <= b < 256] if isinstance(raw, list) else None,
    }
    if not top:
        tops = entry.get("top_logprobs") or []
        if not isinstance(tops, list) or len(tops) > MAX_TOP_LOGPROBS:
            raise _bad_chunk("top_logprobs")
        out["top_logprobs"] = [_logprob_entry(t, True) for t in tops]
    return out


def _tool_call_delta(call: Any) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise _bad_chunk("tool_calls")
    index = call.get("index", 0)
    function = call.get("function") or {}
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_TOOL_CALLS:
        raise _bad_chunk("tool_calls.index")
    if not isinstance(function, dict):
        raise _bad_chunk("tool_calls.function")
    out: dict[str, Any] = {"index": index}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"][:128]
    if call.get("type") is not None:
        out["type"] = "function"
    fn: dict[str, Any] = {}
    if isinstance(function.get("name"), str):
        fn["name"] = function["name"][:256]
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, str):
        raise _bad_chunk("tool_calls.arguments")
    fn["arguments"] = arguments or ""
    out["function"] = fn
    return out


def clean_chunk(data: Any) -> dict[str, Any]:
    """A chunk from a chat service (local or a stranger's) reduced to the contract's keys, each checked;
    anything else is dropped. Raises ``E_INTERNAL`` (a provider fault) for a malformed one."""
    if not isinstance(data, dict):
        raise _bad_chunk("not an object")
    chunk: dict[str, Any] = {}
    text = data.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise _bad_chunk("text")
        chunk["text"] = text
    tokens = data.get("tokens")
    if tokens is not None:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= 1_000_000:
            raise _bad_chunk("tokens")
        chunk["tokens"] = tokens
    index = data.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_CHOICES:
        raise _bad_chunk("index")
    chunk["index"] = index
    logprobs = data.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, list) or len(logprobs) > MAX_CHUNK_LOGPROBS:
            raise _bad_chunk("logprobs")
        chunk["logprobs"] = [_logprob_entry(entry, False) for entry in logprobs]
    calls = data.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or len(calls) > MAX_TOOL_CALLS:
            raise _bad_chunk("tool_calls")
        chunk["tool_calls"] = [_tool_call_delta(call) for call in calls]
    finish = data.get("finish_reason")
    if finish is not None:
        if finish not in ("stop", "length", "tool_calls", "content_filter"):
            raise _bad_chunk("finish_reason")
        chunk["finish_reason"] = finish
    return chunk


def continuable(body: dict[str, Any]) -> bool:
    """Whether another provider can continue this request's answer from its text so far: only a single
    plain-text answer (no ``n`` > 1, no tools, no constrained ``response_format``)."""
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        return False
    if body.get("tools"):
        return False
    response_format = body.get("response_format")
    return not (isinstance(response_format, dict) and response_format.get("type", "text") != "text")


def discovery_query(capability: str, body: dict[str, Any]) -> DiscoveryQuery:
    """What discovery is asked for: providers of ``capability`` that serve the request's features."""
    return DiscoveryQuery(capability=capability, features=sorted(required_features(body)), limit=20)


def _upstream_chunk(choice: dict[str, Any]) -> dict[str, Any]:
    """An upstream OpenAI stream choice as our chunk (text, tool-call deltas, logprobs, finish)."""
    delta = choice.get("delta") or {}
    chunk: dict[str, Any] = {"index": choice.get("index", 0)}
    if isinstance(delta, dict):
        if delta.get("content"):
            chunk["text"] = delta["content"]
            chunk["tokens"] = 1
        if delta.get("tool_calls"):
            chunk["tool_calls"] = delta["tool_calls"]
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and logprobs.get("content"):
        chunk["logprobs"] = logprobs["content"]
    if choice.get("finish_reason"):
        chunk["finish_reason"] = choice["finish_reason"]
    return chunk


def _continued(body: dict[str, Any], delivered: list[str], tokens: int) -> dict[str, Any]:
    """The request for the next provider: the same, asked to continue the answer given so far."""
    so_far = "".join(delivered)
    if not so_far:
        return body
    max_tokens = body.get("max_tokens")
    update: dict[str, Any] = {"continue_from": so_far}
    if isinstance(max_tokens, int):
        update["max_tokens"] = max(1, max_tokens - tokens)
    return {**body, **update}


def _openai_body(body: dict[str, Any]) -> dict[str, Any]:
    """Our continuation as plain OpenAI: the text so far as a partial assistant message."""
    out = {k: v for k, v in body.items() if k not in ("continue_from", "clawnode", "model", "stream", "stream_options")}
    so_far = body.get("continue_from")
    if isinstance(so_far, str) and so_far:
        out["messages"] = [*body.get("messages", []), {"role": "assistant", "content": so_far}]
    return out


async def _sse_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = loads_bounded(data, what="an event")
        except (ValueError, ClawnodeError):
            continue
        if isinstance(event, dict):
            yield event


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def majority_cluster(vectors: list[list[float]], similarity: float) -> tuple[list[int], float]:
    """The largest group of answers that each agree with its centre, and their mean similarity.

    Ties go to the tighter group. The centre is the answer returned.
    """
    best: tuple[int, float, list[int]] = (0, -1.0, [])
    for centre, vector in enumerate(vectors):
        members = [i for i, other in enumerate(vectors) if cosine(vector, other) >= similarity]
        if centre not in members:
            members.insert(0, centre)
        members.sort(key=lambda i: i != centre)
        pairs = [cosine(vectors[a], vectors[b]) for a in members for b in members if a < b]
        tightness = sum(pairs) / len(pairs) if pairs else 1.0
        if (len(members), tightness) > best[:2]:
            best = (len(members), tightness, members)
    return best[2], best[1]


async def _trigram_vectors(texts: list[str]) -> list[list[float]]:
    """A fallback profile when no embedding model is loaded: character-trigram counts, hashed."""
    vectors = []
    for text in texts:
        vector = [0.0] * 512
        padded = f"  {text.lower()}  "
        for index in range(len(padded) - 2):
            vector[zlib.crc32(padded[index : index + 3].encode()) % 512] += 1.0
        vectors.append(vector)
    return vectors
