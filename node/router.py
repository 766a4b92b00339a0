"""The router: answers a model request locally, or buys it from the network, with fallback.

Order of preference for ``model:<name>``: a model this node serves itself; then providers found
through discovery, ranked by health, load, price and measured latency (EWMA), each used through
a lease the router opens itself and reuses; then a configured upstream OpenAI-compatible URL.
A provider that refuses, stalls or disconnects mid-stream costs a short pause: the router moves
to the next one and asks it to continue the same answer (the text so far is sent back as the
start of the assistant's reply), so the agent's stream goes on where it stopped.

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

Health: every ``health_interval_s`` the router fetches the capability record of each provider it
knows (a round trip it also feeds into the latency EWMA); ``failures_to_failover`` consecutive
failures (calls or checks) take a provider out of rotation until a check succeeds again.
"""

from __future__ import annotations

import json
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
from libp2p.peer.id import ID

from dht.discovery import DiscoveryQuery, ProviderResult
from node.config import RouterSection
from protocols.lease import LeaseMarket
from protocols.machines.lease import call_units_needed, lease_fits, lease_outlives
from runtime.errors import ClawnodeError, ErrorCode
from runtime.service import ServiceRegistry
from runtime.telemetry import LatencyHistogram

log = logging.getLogger(__name__)

EWMA_ALPHA = 0.3
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


@dataclass
class ProviderHealth:
    ewma_latency_s: float | None = None
    consecutive_failures: int = 0
    in_flight: int = 0
    served: int = 0

    def record_latency(self, seconds: float) -> None:
        self.ewma_latency_s = (
            seconds if self.ewma_latency_s is None else EWMA_ALPHA * seconds + (1 - EWMA_ALPHA) * self.ewma_latency_s
        )


@dataclass
class RouteResult:
    """How a request was answered: usage as the agent should see it and who served each part."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
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
# Internal: text plus how many tokens it holds (a provider's chunk may batch several).
TokenSink = Callable[[str, int], Awaitable[None]]
Embed = Callable[[list[str]], Awaitable[list[list[float]]]]
Discover = Callable[[DiscoveryQuery], Awaitable[list[ProviderResult]]]
FetchRtt = Callable[[str], Awaitable[float]]


class Router:
    def __init__(
        self,
        market: LeaseMarket,
        services: ServiceRegistry,
        discover: Discover,
        settings: RouterSection,
        *,
        fetch_rtt: FetchRtt | None = None,
        embed: Embed | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.embed = embed
        self.market = market
        self.services = services
        self.discover = discover
        self.settings = settings
        self.fetch_rtt = fetch_rtt
        self.clock = clock
        self.health: dict[str, ProviderHealth] = {}
        self._leases: dict[tuple[str, str], str] = {}
        self._lease_locks: dict[tuple[str, str], trio.Lock] = {}
        self._reserved: dict[str, int] = {}  # lease id -> units its calls in flight may use
        self._in_flight: dict[str, int] = {}  # lease id -> calls in flight
        self._retired: set[str] = set()  # replaced leases, ended when their last call returns
        self.leases_opened = 0
        self.leases_renewed = 0
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
        health.record_latency(rtt)

    def usable(self, peer: str) -> bool:
        return self._health(peer).consecutive_failures < self.settings.failures_to_failover

    def _health(self, peer: str) -> ProviderHealth:
        return self.health.setdefault(peer, ProviderHealth())

    def rank(self, providers: list[ProviderResult]) -> list[ProviderResult]:
        """Healthy first, then least loaded, cheapest, fastest (EWMA, else the discovery round trip)."""

        def key(provider: ProviderResult) -> tuple[int, int, int, float]:
            health = self._health(provider.peer_id)
            latency = health.ewma_latency_s if health.ewma_latency_s is not None else provider.rtt_ms / 1000
            return (0 if self.usable(provider.peer_id) else 1, health.in_flight, provider.price_per_unit, latency)

        return sorted((p for p in providers if not p.is_self), key=key)

    # -- answering --

    async def chat(self, model: str, body: dict[str, Any], on_text: TextSink) -> RouteResult:
        """Answer a chat request for ``model``, streaming text pieces to ``on_text``."""
        capability = f"model:{model}"
        result = RouteResult()
        delivered: list[str] = []
        tokens_delivered = 0

        async def sink(text: str, tokens: int = 1) -> None:
            nonlocal tokens_delivered
            delivered.append(text)
            tokens_delivered += tokens
            await on_text(text)

        local = self.services.get(capability)
        if local is not None:
            started = time.monotonic()
            first_chunk = [True]

            async def emit(data: dict[str, Any]) -> None:
                if first_chunk[0]:
                    first_chunk[0] = False
                    self.local_first_chunk_s.observe(time.monotonic() - started)
                text = data.get("text")
                if isinstance(text, str) and text:
                    await sink(text)

            usage = await local.run(body, emit)
            self.local_duration_s.observe(time.monotonic() - started)
            result.prompt_tokens = usage.detail.get("prompt_tokens", 0)
            result.completion_tokens = usage.detail.get("completion_tokens", 0)
            result.served_by.append("local")
            return result

        errors: list[ClawnodeError] = []
        providers = self.rank(await self.discover(DiscoveryQuery(capability=capability, limit=20)))
        for provider in providers[: self.settings.max_providers]:
            if not self.usable(provider.peer_id) and any(self.usable(p.peer_id) for p in providers):
                continue
            try:
                body_now = _continued(body, delivered, tokens_delivered)
                await self._from_provider(provider, capability, body_now, sink, result)
                return result
            except ClawnodeError as error:
                if error.code not in PROVIDER_FAULTS:
                    raise
                errors.append(error)
                result.failovers += 1
                log.info("provider %s failed (%s); trying the next", provider.peer_id[:16], error.code)
        if self.settings.upstream_url:
            await self._from_upstream(model, _continued(body, delivered, tokens_delivered), sink, result)
            return result
        if errors:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, f"every provider of {model} failed (last: {errors[-1].code})")
        raise ClawnodeError(ErrorCode.NOT_FOUND, f"no node serves {model} and no upstream is configured")

    async def embeddings(self, model: str, texts: list[str]) -> tuple[list[list[float]], int, str]:
        """Vectors for ``texts`` from ``embedding:<model>``: local, else the first provider that answers.

        Returns (vectors, input tokens, who served them).
        """
        capability = f"embedding:{model}"
        body = {"input": texts}
        chunks: list[dict[str, Any]] = []

        async def collect(data: dict[str, Any]) -> None:
            chunks.append(data)

        served_by = "local"
        local = self.services.get(capability)
        if local is not None:
            usage = await local.run(body, collect)
            tokens = usage.detail.get("prompt_tokens", usage.units)
        else:
            providers = self.rank(await self.discover(DiscoveryQuery(capability=capability, limit=20)))
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
        providers = [p for p in self.rank(await self.discover(DiscoveryQuery(capability=capability, limit=20)))]
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

                async def sink(text: str, tokens: int = 1, pieces: list[str] = pieces) -> None:
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
        self, provider: ProviderResult, capability: str, body: dict[str, Any], sink: TokenSink, result: RouteResult
    ) -> None:
        health = self._health(provider.peer_id)
        lease_id = await self._lease(provider, capability, body)
        received = 0

        async def on_chunk(data: dict[str, Any]) -> None:
            nonlocal received
            text = data.get("text")
            if isinstance(text, str) and text:
                received += _tokens_in(data)
                await sink(text, _tokens_in(data))

        started = self.clock()
        health.in_flight += 1
        try:
            async with self._using(lease_id, body):
                end = await self.market.stream_call(lease_id, body, on_chunk, stall_s=self.settings.stall_timeout_s)
        except ClawnodeError as error:
            health.consecutive_failures += 1
            result.completion_tokens += received  # delivered before the failure
            if received:
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
        health.consecutive_failures = 0
        health.served += 1
        health.record_latency(self.clock() - started)
        result.prompt_tokens = end.usage.get("prompt_tokens", 0)
        result.completion_tokens += end.usage.get("completion_tokens", end.units)
        result.served_by.append(provider.peer_id)

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

    async def _from_upstream(self, model: str, body: dict[str, Any], sink: TokenSink, result: RouteResult) -> None:
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
                            text = (choice.get("delta") or {}).get("content")
                            if isinstance(text, str) and text:
                                await sink(text, 1)
                        usage = event.get("usage")
                        if isinstance(usage, dict):
                            result.prompt_tokens = int(usage.get("prompt_tokens", 0))
                            result.completion_tokens += int(usage.get("completion_tokens", 0))
        except httpx.HTTPError as error:
            # The URL may carry credentials: say what failed, never where.
            raise ClawnodeError(ErrorCode.UNAVAILABLE, f"the upstream failed ({type(error).__name__})") from None
        result.served_by.append("upstream")

    async def fetch_rtt_via(self, describe: Callable[[ID], Awaitable[Any]], peer: str) -> float:
        started = self.clock()
        await describe(ID.from_base58(peer))
        return self.clock() - started


def _tokens_in(chunk: dict[str, Any]) -> int:
    """Tokens a provider's chunk holds (it says so when it batches; one otherwise)."""
    tokens = chunk.get("tokens", 1)
    return tokens if isinstance(tokens, int) and tokens > 0 else 1


def _continued(body: dict[str, Any], delivered: list[str], tokens: int) -> dict[str, Any]:
    """The request for the next provider: the same, asked to continue the answer given so far."""
    if not delivered:
        return body
    so_far = "".join(delivered)
    max_tokens = body.get("max_tokens")
    update: dict[str, Any] = {"continue_from": so_far}
    if isinstance(max_tokens, int):
        update["max_tokens"] = max(1, max_tokens - tokens)
    return {**body, **update}


def _openai_body(body: dict[str, Any]) -> dict[str, Any]:
    """Our continuation as plain OpenAI: the text so far as a partial assistant message."""
    out = {k: v for k, v in body.items() if k not in ("continue_from", "clawnode", "model")}
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
            event = json.loads(data)
        except ValueError:
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
