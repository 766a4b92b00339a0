"""The router's split path (issue 24, docs/split.md): which sellers a split model goes on, a lost seller's
answer continued by the next placement, a clean error when no seller is left, the config that names
split models, and the placement in ``clawnode status``. The end-to-end run with real sellers, tunnels
and gemma is ``tests/test_split.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from node.cli import _split_lines
from node.config import Config, RouterSection
from node.router import Router
from protocols.machines.layers import NO_LAYER_SELLERS, SellerFacts, place_sellers
from protocols.machines.verdict import Refusal
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.models import ModelSpec
from runtime.service import ServiceRegistry
from runtime.split.worker import SELLER_LOST
from tests.support.split import needs_rpc


def test_layers_go_on_held_then_cheaper_then_nearer_sellers_never_a_lost_one() -> None:
    sellers = [
        SellerFacts("a", price_per_token=5, rtt_ms=1),
        SellerFacts("b", price_per_token=2, rtt_ms=9),
        SellerFacts("c", price_per_token=2, rtt_ms=3),
        SellerFacts("d", price_per_token=9, rtt_ms=50, held=True),  # its weights are loaded: no new lock
    ]
    assert place_sellers(sellers, lost=set(), wanted=2) == ["d", "c"]
    assert place_sellers(sellers, lost={"d"}, wanted=3) == ["c", "b", "a"]
    # the one seller left takes every layer
    assert place_sellers(sellers, lost={"a", "b", "c"}, wanted=2) == ["d"]
    refused = place_sellers(sellers, lost={"a", "b", "c", "d"}, wanted=2)
    assert isinstance(refused, Refusal)
    assert (refused.code, refused.reason) == (ErrorCode.UNAVAILABLE, NO_LAYER_SELLERS)


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
