"""The router spreads load before anyone refuses (issue 19): it ranks providers by their live load
(the capability protocol's unsigned ``load`` answer), skips a full one while another has room, never
asks one that failed a verification check, and keeps a provider that just served as a candidate when
a discovery lookup under load misses it.

The ranking is a pure function (``protocols.machines.routing``), checked here with hypothesis; the
rest runs real nodes: two providers of the tiny llama.cpp model, one kept busy, and word-echo
providers whose record fetch stalls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dht.capability import CAPABILITY_PROTOCOL, capability_handler
from dht.discovery import DiscoveryQuery
from node import router as router_module
from node.daemon import Node
from node.router import REMEMBER_S, RouteResult
from protocols.lease.base import INFER_PROTOCOL
from protocols.machines.routing import FULL, ROOM, Candidate, LiveLoad, rank_candidates, tier
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.engine import LlamaModel
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.market import WORD_OFFER, WORDS, market_nodes

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

MODEL = "Tiny/Random-1:q8"

loads = st.builds(
    LiveLoad,
    running=st.integers(0, 8),
    parallel=st.integers(1, 8),
    queued=st.integers(0, 8),
    max_queue=st.integers(0, 8),
)
candidates = st.builds(
    Candidate,
    peer_id=st.text("abcdef", min_size=1, max_size=4),
    price_per_unit=st.integers(0, 3),
    latency_s=st.floats(0, 2),
    standing=st.sampled_from([0.0, 0.5, 0.75, 0.9]),
    load=st.none() | loads,
    since_report=st.integers(0, 3),
    in_flight=st.integers(0, 6),
    parallel=st.integers(0, 4),
    max_queue=st.integers(0, 4),
    healthy=st.booleans(),
    busy=st.booleans(),
)
unique_candidates = st.lists(candidates, max_size=8, unique_by=lambda c: c.peer_id)


@settings(max_examples=300, deadline=None)
@given(unique_candidates)
def test_the_ranking_never_picks_a_failed_provider_and_puts_full_ones_after_any_with_room(
    pool: list[Candidate],
) -> None:
    order = rank_candidates(pool)
    by_peer = {c.peer_id: c for c in pool}
    # Every provider with standing above 0, once; a provider that failed a check never.
    assert sorted(order) == sorted(c.peer_id for c in pool if c.standing > 0)
    assert rank_candidates(list(reversed(pool))) == order  # the order does not depend on discovery's
    tiers = [tier(by_peer[peer]) for peer in order]
    assert tiers == sorted(tiers)
    # A healthy provider with a free slot is tried before any full, busy or failing one.
    if ROOM in tiers:
        assert tiers[0] == ROOM
    assert all(t < FULL for t in tiers[: tiers.index(FULL)]) if FULL in tiers else True


@settings(max_examples=300, deadline=None)
@given(candidates, st.integers(1, 4), st.integers(0, 4))
def test_more_load_never_moves_a_provider_earlier(candidate: Candidate, more: int, other_in_flight: int) -> None:
    # Two providers alike but for load: the less loaded one is tried first (same price, latency, standing).
    candidate = Candidate(**{**candidate.__dict__, "peer_id": "a", "standing": 0.5})
    busier = Candidate(
        **{
            **candidate.__dict__,
            "peer_id": "b",
            "since_report": candidate.since_report + more,
            "in_flight": candidate.in_flight + more,
        }
    )
    assert rank_candidates([busier, candidate]) == ["a", "b"]
    # A third provider never changes the relative order of the other two.
    third = Candidate("c", price_per_unit=1, latency_s=0.1, in_flight=other_in_flight)
    order = rank_candidates([busier, third, candidate])
    assert order.index("a") < order.index("b")


def test_a_full_provider_is_skipped_while_a_pricier_one_has_room() -> None:
    cheap_full = Candidate("cheap", 1, 0.01, load=LiveLoad(running=2, parallel=2, queued=4, max_queue=4))
    cheap_busy = Candidate("cheap", 1, 0.01, load=LiveLoad(running=2, parallel=2, queued=1, max_queue=4))
    pricey_idle = Candidate("pricey", 5, 0.5, load=LiveLoad(running=0, parallel=1, queued=0, max_queue=2))
    assert rank_candidates([cheap_full, pricey_idle]) == ["pricey", "cheap"]
    assert rank_candidates([cheap_busy, pricey_idle]) == ["pricey", "cheap"]  # a free slot beats a queue
    # Our own calls started since its answer fill the last slot.
    one_left = Candidate("cheap", 1, 0.01, load=LiveLoad(running=1, parallel=2, queued=0, max_queue=0))
    assert rank_candidates([one_left, pricey_idle]) == ["cheap", "pricey"]
    assert rank_candidates([Candidate(**{**one_left.__dict__, "since_report": 1}), pricey_idle])[0] == "pricey"
    # Two idle ones: the cheaper; a failed verification check: never, however cheap and idle.
    assert rank_candidates([Candidate("b", 2, 0.01), Candidate("a", 1, 0.9)]) == ["a", "b"]
    assert rank_candidates([Candidate("a", 0, 0.01, standing=0.0), pricey_idle]) == ["pricey"]


def test_a_stranger_s_load_figures_are_checked() -> None:
    assert LiveLoad.parse({"running": 1, "parallel": 4, "queued": 0, "max_queue": 8}) == LiveLoad(1, 4, 0, 8)
    bad: object
    for bad in (None, [], {"running": 1}, {"running": -1, "parallel": 1, "queued": 0, "max_queue": 0}):
        assert LiveLoad.parse(bad) is None
    assert LiveLoad.parse({"running": 0, "parallel": 0, "queued": 0, "max_queue": 0}) is None
    assert LiveLoad.parse({"running": True, "parallel": 1, "queued": 0, "max_queue": 0}) is None
    assert LiveLoad.parse({"running": 10**9, "parallel": 1, "queued": 0, "max_queue": 0}) is None


async def _ask(consumer: Node, model: str) -> RouteResult:
    async def ignore(text: str) -> None:
        return None

    body: dict[str, Any] = {"messages": [{"role": "user", "content": "a b"}], "max_tokens": 4, "temperature": 0}
    return await consumer.router.chat(model, body, ignore)


def _fresh_for(monkeypatch: pytest.MonkeyPatch) -> float:
    """A provider's load is asked again once its last answer is older than LOAD_FRESH_S (1 s): 0.3 s
    here, and the seconds a test waits for the next request to ask again."""
    monkeypatch.setattr(router_module, "LOAD_FRESH_S", 0.3)
    return 0.4


async def test_new_requests_go_to_the_idle_provider_while_the_cheaper_one_is_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale_after_s = _fresh_for(monkeypatch)
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    tiny_gguf = await trio.to_thread.run_sync(write_tiny_llama_gguf, tmp_path / "tiny.gguf")
    specs = [
        ModelSpec(name=MODEL, path=str(tiny_gguf), n_threads=1, max_queue=2, parallel=1, price_per_unit=price)  # type: ignore[call-arg]
        for price in (1, 3)
    ]
    async with market_nodes([{"models": (specs[0],)}, {"models": (specs[1],)}, {}]) as (nodes, _):
        cheap, pricey, consumer = nodes
        cheap_id, pricey_id = str(cheap.host.get_id()), str(pricey.host.get_id())
        with trio.fail_after(60):
            while len(await consumer.discover(DiscoveryQuery(capability=f"model:{MODEL}"))) < 2:
                await trio.sleep(0.2)
        assert (await _ask(consumer, MODEL)).served_by == [cheap_id]  # both idle: the cheaper
        model = cheap.model_host.get(MODEL)
        assert isinstance(model, LlamaModel)
        await trio.sleep(stale_after_s)  # past LOAD_FRESH_S: the next request asks both for their load again
        holder = model.stream_complete("busy", max_tokens=4)
        async with holder:  # the cheaper provider's one slot is taken until this block ends
            with trio.fail_after(20):  # asked anyway, the request would wait in its queue for this block
                for _ in range(3):
                    assert (await _ask(consumer, MODEL)).served_by == [pricey_id]
            assert model.admission.refused == 0  # nobody was turned away: it was never asked
            await holder.collect()
        await trio.sleep(stale_after_s)
        assert (await _ask(consumer, MODEL)).served_by == [cheap_id]  # idle again: the cheaper


async def test_a_provider_that_just_served_stays_a_candidate_when_discovery_misses_it() -> None:
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}]) as (nodes, _):
        provider, consumer = nodes
        provider_id = str(provider.host.get_id())
        with trio.fail_after(60):
            while not await consumer.discover(DiscoveryQuery(capability=WORDS)):
                await trio.sleep(0.2)
        assert (await _ask(consumer, "words")).served_by == [provider_id]

        # Under load its record fetch times out: discovery no longer lists it.
        async def stall(stream: Any) -> None:
            await trio.sleep_forever()

        provider.host.set_stream_handler(CAPABILITY_PROTOCOL, stall)
        consumer.discovery.fetch_timeout_s = 0.2
        consumer.discovery._cache.clear()
        assert not await consumer.discover(DiscoveryQuery(capability=WORDS))
        assert (await _ask(consumer, "words")).served_by == [provider_id]  # no 404: it just served

        # Bounded: one not healthy within REMEMBER_S is not asked.
        real_clock = consumer.router.clock
        consumer.router.clock = lambda: real_clock() + REMEMBER_S + 1
        with pytest.raises(ClawnodeError) as refused:
            await _ask(consumer, "words")
        assert refused.value.code == ErrorCode.NOT_FOUND
        consumer.router.clock = real_clock


async def test_a_provider_that_always_answers_idle_draws_no_more_than_its_signed_capacity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale_after_s = _fresh_for(monkeypatch)
    # The cheaper provider answers "idle, 1000 slots" every time it is asked, while its signed record
    # states one slot and no queue: this router's own call in flight there fills that slot, so the
    # next request goes to the pricier provider with room instead of queueing behind the lie.
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    tiny_gguf = await trio.to_thread.run_sync(write_tiny_llama_gguf, tmp_path / "tiny.gguf")
    specs = [
        ModelSpec(name=MODEL, path=str(tiny_gguf), n_threads=1, max_queue=1, parallel=1, price_per_unit=price)  # type: ignore[call-arg]
        for price in (1, 3)
    ]
    async with market_nodes([{"models": (specs[0],)}, {"models": (specs[1],)}, {}]) as (nodes, _):
        liar, pricey, consumer = nodes
        liar_id, pricey_id = str(liar.host.get_id()), str(pricey.host.get_id())
        idle = {f"model:{MODEL}": {"running": 0, "parallel": 1000, "queued": 0, "max_queue": 1000}}
        answer = capability_handler(lambda: liar.publisher.sealed, lambda: idle)
        liar.host.set_stream_handler(CAPABILITY_PROTOCOL, answer)
        with trio.fail_after(60):
            while len(await consumer.discover(DiscoveryQuery(capability=f"model:{MODEL}"))) < 2:
                await trio.sleep(0.2)
        release = trio.Event()

        async def held(stream: Any) -> None:  # the router's first call there runs until released
            await release.wait()
            await liar.market._handle_call(stream)

        liar.host.set_stream_handler(INFER_PROTOCOL, held)

        served: list[list[str]] = []

        async def first() -> None:
            served.append((await _ask(consumer, MODEL)).served_by)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            with trio.fail_after(20):
                while consumer.router._health(liar_id).in_flight < 1:
                    await trio.sleep(0.05)
            await trio.sleep(stale_after_s)  # past LOAD_FRESH_S: the liar is asked again and says idle again
            with trio.fail_after(20):  # sent to the liar, it would wait behind the held call
                assert (await _ask(consumer, MODEL)).served_by == [pricey_id]
            release.set()
        assert served == [[liar_id]]  # both idle at first: the cheaper
