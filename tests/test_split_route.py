"""The router's split path (issue 24, docs/split.md): which sellers a split model goes on, a lost seller's
answer continued by the next placement, a clean error when no seller is left, the config that names
split models, and the placement in ``clawnode status``. The end-to-end run with real sellers, tunnels
and gemma is ``tests/test_split.py``."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.cli import _split_lines
from node.config import Config, RouterSection
from node.router import Router
from protocols.machines.layers import NO_LAYER_SELLERS, Seating, SellerFacts, place_sellers, seller_capacity
from protocols.machines.verdict import Refusal
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.models import ModelSpec
from runtime.service import ServiceRegistry
from runtime.split.layout import layer_ranges, shares_for
from runtime.split.worker import SELLER_LOST
from tests.support.split import needs_rpc


def test_layers_go_on_held_then_cheaper_then_nearer_sellers_never_a_lost_one() -> None:
    sellers = [
        SellerFacts("a", price_per_token=5, rtt_ms=1, layers=18, memory_mb=512),
        SellerFacts("b", price_per_token=2, rtt_ms=9, layers=18, memory_mb=512),
        SellerFacts("c", price_per_token=2, rtt_ms=3, layers=18, memory_mb=512),
        # its weights are loaded: no new lock
        SellerFacts("d", price_per_token=9, rtt_ms=50, held=True, layers=18, memory_mb=512),
    ]

    def peers(lost: set[str], wanted: int) -> list[str] | str:
        plan = place_sellers(sellers, lost=lost, wanted=wanted, n_layers=18, layer_mb=4.0)
        return plan.reason if isinstance(plan, Refusal) else [s.peer for s in plan]

    assert peers(set(), 2) == ["d", "c"]
    assert peers({"d"}, 3) == ["c", "b", "a"]
    # the one seller left takes every layer
    assert place_sellers(sellers, lost={"a", "b", "c"}, wanted=2, n_layers=18) == [Seating("d", 0, 18)]
    refused = place_sellers(sellers, lost={"a", "b", "c", "d"}, wanted=2, n_layers=18)
    assert isinstance(refused, Refusal)
    assert (refused.code, refused.reason) == (ErrorCode.UNAVAILABLE, NO_LAYER_SELLERS)


def test_a_seller_whose_record_states_no_capacity_is_passed_over_not_fatal() -> None:
    sellers = [
        SellerFacts("mute", price_per_token=1),  # cheapest, but its record states no layer capacity
        SellerFacts("a", price_per_token=5, layers=26, memory_mb=4096),
        SellerFacts("b", price_per_token=6, layers=26, memory_mb=4096),
    ]
    plan = place_sellers(sellers, lost=set(), wanted=2, n_layers=26, layer_mb=100.0)
    assert plan == [Seating("a", 0, 13), Seating("b", 13, 26)]
    alone = place_sellers(sellers[:1], lost=set(), wanted=2, n_layers=26)
    assert isinstance(alone, Refusal) and alone.reason == NO_LAYER_SELLERS


def test_a_seller_that_holds_8_of_26_layers_gets_8_at_most_the_rest_in_proportion() -> None:
    small = SellerFacts("small", price_per_token=1, layers=26, memory_mb=800)  # 8 layers of 100 MB
    big = SellerFacts("big", price_per_token=2, layers=26, memory_mb=2600)
    plan = place_sellers([small, big], lost=set(), wanted=2, n_layers=26, layer_mb=100.0)
    assert plan == [Seating("small", 0, 6), Seating("big", 6, 26)]  # 8:26 of 26 layers
    # Two cheap sellers holding 8 each cannot hold 26: the dearer big one is taken in place of one.
    twin = SellerFacts("twin", price_per_token=1, layers=8, memory_mb=9999)
    plan = place_sellers([small, twin, big], lost=set(), wanted=2, n_layers=26, layer_mb=100.0)
    assert isinstance(plan, list) and [s.peer for s in plan] == ["small", "big"]
    three = place_sellers([small, twin, big], lost={"big"}, wanted=3, n_layers=26, layer_mb=100.0)
    assert isinstance(three, Refusal) and three.reason == NO_LAYER_SELLERS  # 8 + 8 < 26


_seller = st.builds(
    SellerFacts,
    peer=st.sampled_from("abcdefgh"),
    price_per_token=st.integers(0, 5),
    rtt_ms=st.floats(0, 100),
    held=st.booleans(),
    layers=st.one_of(st.none(), st.integers(0, 40)),
    memory_mb=st.one_of(st.none(), st.integers(0, 5000)),
)


@settings(max_examples=150, deadline=None, database=None)
@given(
    sellers=st.lists(_seller, max_size=8),
    lost=st.sets(st.sampled_from("abcdefgh"), max_size=3),
    wanted=st.integers(1, 4),
    n_layers=st.integers(1, 40),
    layer_mb=st.sampled_from([0.0, 3.9, 100.0, 700.0]),
)
def test_placement_holds_every_layer_within_each_capacity_or_refuses_only_when_it_cannot(
    sellers: list[SellerFacts], lost: set[str], wanted: int, n_layers: int, layer_mb: float
) -> None:
    plan = place_sellers(sellers, lost=lost, wanted=wanted, n_layers=n_layers, layer_mb=layer_mb)
    capacity: dict[str, int] = {}
    for s in sellers:
        if s.peer not in lost:
            capacity[s.peer] = max(capacity.get(s.peer, 0), seller_capacity(s, n_layers=n_layers, layer_mb=layer_mb))
    best = sum(sorted(capacity.values(), reverse=True)[:wanted])
    if isinstance(plan, Refusal):
        assert (plan.code, plan.reason) == (ErrorCode.UNAVAILABLE, NO_LAYER_SELLERS)
        assert best < n_layers  # refused only when no `wanted` sellers left could hold the model
        return
    assert best >= n_layers
    # Contiguous, in layer order, every layer once, on distinct usable sellers, none beyond its capacity.
    assert plan[0].start == 0 and plan[-1].end == n_layers
    assert all(a.end == b.start for a, b in itertools.pairwise(plan))
    assert len({s.peer for s in plan}) == len(plan) <= wanted
    for seat in plan:
        assert seat.peer not in lost
        assert 1 <= seat.count <= capacity[seat.peer]


@settings(max_examples=300, deadline=None, database=None)
@given(counts=st.lists(st.integers(1, 60), min_size=1, max_size=6))
def test_llama_cpp_gives_each_server_exactly_the_layers_placed_on_it(counts: list[int]) -> None:
    expected, start = [], 0
    for count in counts:
        expected.append((start, start + count))
        start += count
    assert layer_ranges(sum(counts), shares_for(counts)) == expected


class _Runner:
    """Stands in for SplitRunner at the router's seam: answers per try as ``plan`` says."""

    def __init__(self, plan: list[str], *, prefer: bool = False) -> None:
        self.plan = plan
        self.prefer = prefer
        self.max_tries = 3
        self.bodies: list[dict[str, Any]] = []

    def holds(self, model: str) -> bool:
        return model == "big"

    async def chat(self, model: str, body: dict[str, Any], emit: Any) -> dict[str, Any]:
        self.bodies.append(body)
        step = self.plan.pop(0)
        if step == "none":
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "no seller of this model's layers is left", NO_LAYER_SELLERS)
        if not body.get("continue_from"):
            await emit({"text": "The sea ", "tokens": 2})
        if step == "lost":  # the seller's server died after the first piece
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "the split model's worker ended", SELLER_LOST)
        await emit({"text": "is wide.", "tokens": 3, "finish_reason": "stop"})
        return {"units": 3, "detail": {"prompt_tokens": 7, "completion_tokens": 3}}


async def _nothing(_query: Any) -> list[Any]:
    return []


def _router(runner: _Runner) -> Router:
    router = Router(None, ServiceRegistry(), _nothing, RouterSection())  # type: ignore[arg-type]
    router.split = runner  # type: ignore[assignment]
    return router


async def test_a_lost_seller_mid_answer_is_replaced_and_the_answer_goes_on() -> None:
    runner = _Runner(["lost", "ok"])
    pieces: list[str] = []

    async def sink(chunk: dict[str, Any]) -> None:
        pieces.append(chunk.get("text") or "")

    body = {"messages": [{"role": "user", "content": "the sea?"}], "max_tokens": 20}
    result = await _router(runner).chat_chunks("big", body, sink)
    # the second placement was asked to continue from what the agent already has
    assert runner.bodies[1]["continue_from"] == "The sea "
    assert pieces == ["The sea ", "is wide."]
    assert (result.failovers, result.served_by, result.completion_tokens) == (1, ["split", "split"], 2 + 3)


async def test_no_seller_left_is_a_clean_error_and_other_models_never_go_split() -> None:
    router = _router(_Runner(["none"]))

    async def sink(chunk: dict[str, Any]) -> None:
        raise AssertionError("nothing to deliver")

    body = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ClawnodeError) as caught:
        await router.chat_chunks("big", body, sink)
    assert caught.value.code == ErrorCode.UNAVAILABLE
    with pytest.raises(ClawnodeError) as other:
        await router.chat_chunks("small", body, sink)
    assert other.value.code == ErrorCode.NOT_FOUND


async def test_an_answer_that_cannot_be_continued_fails_cleanly_when_a_seller_is_lost() -> None:
    router = _router(_Runner(["lost", "ok"]))

    async def sink(chunk: dict[str, Any]) -> None:
        return None

    body = {"messages": [{"role": "user", "content": "hi"}], "n": 2}
    with pytest.raises(ClawnodeError) as caught:
        await router.chat_chunks("big", body, sink)
    assert caught.value.code == ErrorCode.UNAVAILABLE and "cannot be continued" in caught.value.message


def test_split_models_name_models_entries(tmp_path: Path) -> None:
    from node.daemon import Node

    gguf = tmp_path / "big.gguf"
    gguf.write_bytes(b"GGUF")
    models = [ModelSpec(name="big", path=str(gguf)), ModelSpec(name="small", path=str(gguf))]
    config = Config.model_validate({"models": [m.model_dump() for m in models], "split": {"models": ["big"]}})
    # the split model is not loaded whole; the other one is; /v1/models lists it all the same
    node = Node(config, tmp_path / "node")
    assert [spec.name for spec in node.model_host.specs] == ["small"]
    assert node.local_models() == ["big"]  # "small" is listed once it is loaded and served
    with pytest.raises(ValueError, match=r"split.models names no \[\[models\]\] entry: huge"):
        Config.model_validate({"models": [m.model_dump() for m in models], "split": {"models": ["huge"]}})


def test_status_shows_which_peer_holds_which_layers() -> None:
    seats = [
        {"model": "big", "peer": "QmAaaaaa", "lease_id": "0" * 12, "layers": "0-9", "tokens": 31, "state": "running"},
        {"model": "big", "peer": "QmBbbbbb", "lease_id": "1" * 12, "layers": "10-17", "tokens": 31, "state": "running"},
    ]
    assert _split_lines({"split_models": seats}) == [
        "split          big: layers 0-9 on …QmAaaaaa (lease 000000000000), 31 tokens, running",
        "split          big: layers 10-17 on …QmBbbbbb (lease 111111111111), 31 tokens, running",
    ]
    assert _split_lines({"split_models": []}) == ["split          placed on no sellers yet"]
    assert _split_lines({}) == []


async def test_an_error_inside_a_tunnel_reaches_its_caller_as_raised() -> None:
    """The runner's tunnels wrap a worker's load: its error must come out as it went in (a tunnel that
    swallowed it left the runner's task without an answer, and a test's failed check without a failure)."""
    from libp2p import generate_new_ed25519_identity

    from node.host import build_host
    from protocols.lease.layers import open_tunnel

    host = build_host(generate_new_ed25519_identity())
    with pytest.raises(ClawnodeError) as caught:
        async with open_tunnel(host, host.get_id(), "lease0", "token0"):
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "the split model's worker ended", SELLER_LOST)
    assert caught.value.reason == SELLER_LOST


@needs_rpc
async def test_a_seller_stops_the_server_of_a_lease_that_ended_so_the_renewed_one_gets_its_own() -> None:
    """With one layer server allowed, a consumer that replaced its spent lease reaches a server for the
    new lease: the ended lease's server stops instead of refusing the new one ``layers_busy``."""
    import time

    import multiaddr
    import trio
    from libp2p import generate_new_ed25519_identity
    from libp2p.peer.peerinfo import PeerInfo

    from node.host import build_host
    from protocols.lease.base import token_digest
    from protocols.lease.layers import LayerSeller, open_tunnel
    from protocols.lease.split import answers
    from protocols.machines.layers import LayerLeaseFacts

    loopback = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
    consumer, seller_host = (build_host(generate_new_ed25519_identity()) for _ in range(2))
    ended: set[str] = set()

    def facts(lease_id: str) -> LayerLeaseFacts:
        return LayerLeaseFacts(
            str(consumer.get_id()), token_digest("t-" + lease_id), time.time() + 600, lease_id in ended
        )

    async with consumer.run([loopback]), seller_host.run([loopback]):
        seller = LayerSeller(seller_host, facts=facts, max_servers=1)
        seller.mount()
        await consumer.connect(PeerInfo(seller_host.get_id(), seller_host.get_addrs()))
        try:
            async with open_tunnel(consumer, seller_host.get_id(), "old", "t-old") as old:
                assert await answers(old.endpoint)
            first = seller.leases["old"].server
            assert first is not None and first.alive
            ended.add("old")  # the consumer revoked it: spent
            async with open_tunnel(consumer, seller_host.get_id(), "new", "t-new") as new:
                assert await answers(new.endpoint)
            with trio.fail_after(10):
                while first.alive:
                    await trio.sleep(0.05)
            assert seller.leases["old"].ended and seller._servers() == 1
        finally:
            await seller.aclose()


# A worker that loads nothing: ready at once, then per request what its argument says.
_STAND_IN = """
import json, sys, time
sys.stdin.readline()
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
print(json.dumps({"chunk": {"text": "The sea ", "tokens": 2}}), flush=True)
if sys.argv[1] == "stall":
    time.sleep(60)
print("ggml_abort: remote RPC server crashed", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize(
    ("behaviour", "code", "reason"),
    [("stall", ErrorCode.TIMEOUT, "layer_seller_stalled"), ("garbage", ErrorCode.UNAVAILABLE, SELLER_LOST)],
)
async def test_a_worker_that_stalls_or_writes_garbage_fails_with_a_stable_code_and_ends(
    behaviour: str, code: ErrorCode, reason: str
) -> None:
    """Never a hang: a split model that hears nothing from its layers for the stall timeout, or whose
    worker writes something that is no reply (a dying llama.cpp), fails the call with a stable code
    after the chunks already sent, and its worker process is ended."""
    import sys

    import trio

    from runtime.split.worker import SplitWorker

    worker = SplitWorker("unused.gguf", endpoints=["127.0.0.1:1"], command=[sys.executable, "-c", _STAND_IN, behaviour])
    await worker.load()
    pieces: list[str] = []

    async def emit(chunk: dict[str, Any]) -> None:
        pieces.append(chunk["text"])

    try:
        with trio.fail_after(20), pytest.raises(ClawnodeError) as caught:
            await worker.run({"messages": [{"role": "user", "content": "hi"}]}, emit, stall_s=0.5)
        assert (caught.value.code, caught.value.reason, pieces) == (code, reason, ["The sea "])
        with trio.fail_after(10):
            while worker._proc is not None and worker._proc.poll() is None:
                await trio.sleep(0.02)
        with pytest.raises(ClawnodeError):  # a later call fails at once
            await worker.run({"messages": [{"role": "user", "content": "hi"}]}, emit, stall_s=0.5)
    finally:
        await worker.aclose()


async def test_a_placement_closed_to_renew_a_lease_blames_no_seller() -> None:
    """A request still running on a placement closed for a lease's renewal loses its worker; that is no
    seller's fault: none is marked lost (its tunnels are going, so no server would answer a probe)."""
    from protocols.lease.split import Placement, Seat, SplitRunner

    no_leases = type("Market", (), {"held": {}})()  # the lease is gone already: nothing to end
    runner = SplitRunner(None, no_leases, _nothing, [])  # type: ignore[arg-type]
    closed = Placement("big", [Seat("QmSeller", "lease0", (0, 18))], state="closed")
    await runner._blame(closed)
    assert closed.done.is_set() and runner._lost_peers("big") == set()
    loading = Placement("big", [Seat("QmSeller", "lease0", (0, 18))], state="loading")
    await runner._blame(loading)  # its load failed: no tunnel answers, the seller is lost
    assert loading.state == "lost" and runner._lost_peers("big") == {"QmSeller"}


def test_a_gguf_file_says_how_many_layers_it_has_and_how_large_the_largest_is(tmp_path: Path) -> None:
    from runtime.inference.tiny_model import N_LAYER, write_tiny_llama_gguf
    from runtime.split import rpc
    from runtime.split.layout import file_layers

    if rpc.library_dir() is None:
        pytest.skip("llama_cpp is not installed")
    layers = file_layers(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))
    assert layers is not None and layers.count == N_LAYER and layers.max_bytes > 0
    (tmp_path / "not.gguf").write_bytes(b"no gguf here")
    assert file_layers(tmp_path / "not.gguf") is None


def test_a_split_model_saves_no_prefixes_whose_kv_cache_it_would_read_back_from_its_sellers() -> None:
    from runtime.split.model import SplitLlamaModel

    # Saving a prefix reads the sequence's KV cache back: on a split model it lives on the layer
    # servers, one GET_TENSOR round trip per cell row per layer before the next prompt's first token.
    assert SplitLlamaModel("m.gguf", endpoints=["127.0.0.1:1"]).prefix_cache_bytes == 0
    assert SplitLlamaModel("m.gguf", endpoints=["127.0.0.1:1"], prefix_cache_mb=8).prefix_cache_bytes == 8 << 20
