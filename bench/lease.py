"""Lease benchmark: discover -> lease -> first usable call, in a loopback swarm.

Usage::

    python bench/lease.py [--nodes 50] [--leases 100] [--providers 4]
    python bench/lease.py --nodes 10 --leases 10        # smoke run

Builds one swarm of ``--nodes`` nodes in one ``trio.run``:

- ``nodes - providers - 1`` lightweight nodes from ``tests.support.swarm.open_swarm``
  (host + ``DhtService`` + ``CapabilityPublisher`` + ``Discovery``, no offers);
- ``--providers`` full ``node.daemon.Node``s offering ``model:words`` (``WordService``)
  and one full consumer ``Node``, from ``tests.support.market.market_nodes``, which
  bootstrap into the swarm's first two nodes and share one in-process EVM chain
  (the Vyper escrow on py-evm).

The build ends when the consumer's ``discover`` returns every provider. Then, one
lease at a time, ``--leases`` times:

1. ``discover``: ``consumer.discover(DiscoveryQuery(capability="model:words"))``, cold:
   the consumer's discovery cache TTL is 0, so every call runs the DHT provider lookup
   and fetches each provider's signed record live. ``lookup=`` is the DHT provider lookup
   alone (timed around ``Discovery.providers_of``); the rest is the record fetches.
2. ``open``: ``consumer.market.open_lease`` with the first (cheapest, then lowest-RTT)
   result: quote over the lease protocol, the consumer's ledger entry, the escrow lock
   transaction on the shared chain, the grant. ``lock=`` is the lock alone (timed
   around the market's ``_lock``).
3. ``first call``: ``consumer.market.call(lease_id, {"prompt": ...})`` (10 words).

``total`` is the sum. The lease is then revoked (not timed); the provider's claim and
the refund run in the settlement queues in the background, as they would in a daemon,
so later iterations share the chain with that work. ``total/discover`` is the ratio of
the p50s (and, in brackets, the median of the per-lease ratios). Also printed: the
discover p50 of the first and second half of the run, and how many leases each provider
got (the consumer always takes the first result: all offers have one price, so the
lowest measured RTT wins).

All nodes share one process and one core: latencies include scheduling behind the other
nodes' work. Yamux RTT pings are off (as in ``bench/dht_swarm.py``). Progress goes to
stderr, the figures to stdout as one line. ``--time-limit`` (default 480 s) bounds the
measurement loop, and a SIGALRM backstop ends the process 30 s after it.
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.stream_muxer.yamux import yamux as yamux_module

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dht.discovery import DiscoveryQuery
from node.daemon import Node
from runtime.errors import ClawnodeError
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, SharedChain, market_nodes, wait_for
from tests.support.swarm import open_swarm

BOOTSTRAP_COUNT = 2
PROMPT = "the quick brown fox jumps over the lazy dog again"  # 10 words
BUDGET = 100 * WORD_PRICE
LEASE_DURATION_S = 120
# Seconds one iteration (discover + open + call) may take before it counts as failed.
ITERATION_TIMEOUT_S = 60.0
# Seconds for the market nodes' offers to become visible to the consumer after they join.
VISIBLE_TIMEOUT_S = 120.0


def progress(text: str) -> None:
    print(f"[lease {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def quiet_logging() -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.getLogger().setLevel(logging.WARNING)


def disable_yamux_rtt_pings() -> None:
    if not isinstance(getattr(yamux_module, "RTT_MEASURE_INTERVAL", None), int | float):
        raise RuntimeError("py-libp2p's Yamux changed: revisit disable_yamux_rtt_pings in bench/lease.py")
    setattr(yamux_module, "RTT_MEASURE_INTERVAL", 10.0**9)  # noqa: B010


def percentile(values: Sequence[float], share: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}s"


def p50_p95(name: str, values: Sequence[float]) -> str:
    return f"{name} p50={fmt(percentile(values, 0.5))} p95={fmt(percentile(values, 0.95))}"


@dataclass
class Figures:
    chain_s: float = 0.0
    swarm_s: float = 0.0
    market_s: float = 0.0
    visible_s: float = 0.0
    build_s: float = 0.0
    tries: int = 0
    ok: int = 0
    discover_s: list[float] = field(default_factory=list)
    open_s: list[float] = field(default_factory=list)
    lookup_s: list[float] = field(default_factory=list)
    lock_s: list[float] = field(default_factory=list)
    call_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    providers_seen: list[int] = field(default_factory=list)
    chosen: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def probe(target: object, method: str, out: list[float]) -> None:
    """Wrap ``target.method`` (a coroutine method) so each call's duration lands in ``out``."""
    original: Callable[..., Awaitable[Any]] = getattr(target, method)

    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = trio.current_time()
        try:
            return await original(*args, **kwargs)
        finally:
            out.append(trio.current_time() - started)

    setattr(target, method, timed)


@dataclass
class Probes:
    lookup: list[float] = field(default_factory=list)
    lock: list[float] = field(default_factory=list)


async def lease_once(consumer: Node, providers: set[str], figures: Figures, probes: Probes) -> str | None:
    """One discover -> open -> first call; the lease id to revoke, or None when it failed before opening."""
    figures.tries += 1
    lease_id: str | None = None
    phase = "discover"
    with trio.move_on_after(ITERATION_TIMEOUT_S) as timeout:
        try:
            del probes.lookup[:], probes.lock[:]
            t0 = trio.current_time()
            found = await consumer.discover(DiscoveryQuery(capability=WORDS))
            t1 = trio.current_time()
            figures.providers_seen.append(len({r.peer_id for r in found} & providers))
            if not found:
                figures.failures["discover: none found"] = figures.failures.get("discover: none found", 0) + 1
                return None
            chosen = found[0].peer_id
            phase = "open"
            lease = await consumer.market.open_lease(chosen, WORDS, budget=BUDGET, duration_s=LEASE_DURATION_S)
            lease_id = lease.lease_id
            t2 = trio.current_time()
            phase = "call"
            result = await consumer.market.call(lease_id, {"prompt": PROMPT})
            t3 = trio.current_time()
            if result.units != len(PROMPT.split()):
                raise RuntimeError(f"the call metered {result.units} units, not {len(PROMPT.split())}")
        except (ClawnodeError, RuntimeError) as error:
            key = f"{phase}: {getattr(error, 'code', type(error).__name__)}"
            figures.failures[key] = figures.failures.get(key, 0) + 1
            progress(f"lease {figures.tries}: {key}: {error}")
            return lease_id
    if timeout.cancelled_caught:
        key = f"{phase}: timeout"
        figures.failures[key] = figures.failures.get(key, 0) + 1
        progress(f"lease {figures.tries}: {key} after {ITERATION_TIMEOUT_S:.0f}s")
        return lease_id
    figures.ok += 1
    figures.discover_s.append(t1 - t0)
    figures.open_s.append(t2 - t1)
    figures.lookup_s.extend(probes.lookup[-1:])
    figures.lock_s.extend(probes.lock[-1:])
    figures.call_s.append(t3 - t2)
    figures.total_s.append(t3 - t0)
    figures.chosen[chosen] = figures.chosen.get(chosen, 0) + 1
    return lease_id


async def revoke(consumer: Node, lease_id: str) -> None:
    with trio.move_on_after(15):
        try:
            await consumer.market.revoke(lease_id)
        except ClawnodeError as error:
            progress(f"revoke {lease_id[:12]}: {error.code}")


async def measure(consumer: Node, providers: set[str], args: argparse.Namespace, figures: Figures) -> None:
    probes = Probes()
    # Benchmark probes on two internals: the DHT provider lookup inside discover, the escrow lock inside open.
    probe(consumer.discovery, "providers_of", probes.lookup)
    probe(consumer.market, "_lock", probes.lock)
    deadline = trio.current_time() + args.time_limit
    for index in range(args.leases):
        if trio.current_time() >= deadline:
            figures.notes.append(f"stopped at {index} leases by the time limit")
            break
        lease_id = await lease_once(consumer, providers, figures, probes)
        if lease_id is not None:
            await revoke(consumer, lease_id)
        if (index + 1) % 10 == 0 or index + 1 == args.leases:
            progress(
                f"leases {index + 1}: {figures.ok}/{figures.tries} ok, "
                f"{p50_p95('discover', figures.discover_s)}, {p50_p95('open', figures.open_s)}, "
                f"{p50_p95('call', figures.call_s)}, {p50_p95('total', figures.total_s)}"
            )


async def all_visible(consumer: Node, providers: set[str]) -> None:
    with trio.fail_after(VISIBLE_TIMEOUT_S):
        while True:
            found = await consumer.discover(DiscoveryQuery(capability=WORDS))
            if providers <= {r.peer_id for r in found}:
                return
            await trio.sleep(0.2)


def report(args: argparse.Namespace, figures: Figures, light: int) -> str:
    success = 100.0 * figures.ok / figures.tries if figures.tries else math.nan
    ratio = percentile(figures.total_s, 0.5) / percentile(figures.discover_s, 0.5) if figures.ok else math.nan
    ratios = [t / d for t, d in zip(figures.total_s, figures.discover_s, strict=True) if d > 0]
    per_lease = statistics.median(ratios) if ratios else math.nan
    seen = f"{min(figures.providers_seen)}-{max(figures.providers_seen)}" if figures.providers_seen else "n/a"
    half = len(figures.discover_s) // 2
    drift = (
        f"first half p50={fmt(percentile(figures.discover_s[:half], 0.5))}, "
        f"second half p50={fmt(percentile(figures.discover_s[half:], 0.5))}"
    )
    spread = "/".join(str(count) for count in sorted(figures.chosen.values(), reverse=True)) or "n/a"
    failures = ", ".join(f"{k} x{v}" for k, v in sorted(figures.failures.items()))
    notes = "; ".join(figures.notes + ([f"failures: {failures}"] if failures else []))
    return (
        f"lease N={args.nodes} ({light} swarm + {args.providers} providers + 1 consumer) "
        f"leases={figures.ok}/{figures.tries} success={success:.1f}% "
        f"| {p50_p95('discover', figures.discover_s)} ({p50_p95('lookup', figures.lookup_s)}; "
        f"{drift}; providers seen {seen}/{args.providers}) "
        f"| {p50_p95('open', figures.open_s)} ({p50_p95('lock', figures.lock_s)}; leases per provider {spread}) "
        f"| {p50_p95('first-call', figures.call_s)} "
        f"| {p50_p95('total', figures.total_s)} "
        f"| total/discover={ratio:.2f} (per-lease median {per_lease:.2f}) "
        f"(build {figures.build_s:.1f}s: chain {figures.chain_s:.1f}s, swarm {figures.swarm_s:.1f}s, "
        f"market nodes {figures.market_s:.1f}s, offers visible {figures.visible_s:.1f}s)"
        + (f" [{notes}]" if notes else "")
    )


async def run(args: argparse.Namespace) -> Figures:
    figures = Figures()
    light = args.nodes - args.providers - 1
    start = trio.current_time()
    shared = await trio.to_thread.run_sync(SharedChain.start)
    figures.chain_s = trio.current_time() - start
    progress(f"chain up in {figures.chain_s:.1f}s; building {light} swarm nodes")
    mark = trio.current_time()
    async with open_swarm(light, bootstrap_count=BOOTSTRAP_COUNT, cache_ttl_s=0.0) as swarm:
        figures.swarm_s = trio.current_time() - mark
        bootstrap = [addr for node in swarm[:BOOTSTRAP_COUNT] for addr in node.addrs[:1]]
        progress(f"swarm up in {figures.swarm_s:.1f}s; starting {args.providers} providers + 1 consumer")
        mark = trio.current_time()
        specs: list[dict[str, Any]] = [{"offers": (WORD_OFFER,)} for _ in range(args.providers)] + [{}]
        async with market_nodes(specs, chain=shared, bootstrap=bootstrap) as (market, _):
            *provider_nodes, consumer = market
            await wait_for(lambda: all(n.publisher.record is not None for n in provider_nodes), what="records")
            figures.market_s = trio.current_time() - mark
            mark = trio.current_time()
            # Cold discovery: every find runs the DHT lookup and fetches each record live.
            consumer.discovery.cache_ttl_s = 0.0
            providers = {str(node.host.get_id()) for node in provider_nodes}
            await all_visible(consumer, providers)
            figures.visible_s = trio.current_time() - mark
            figures.build_s = trio.current_time() - start
            conns = [len(node.host.get_connected_peers()) for node in swarm]
            progress(
                f"all {args.providers} offers visible; build {figures.build_s:.1f}s; "
                f"swarm connections mean {sum(conns) / len(conns):.1f}, "
                f"consumer connections {len(consumer.host.get_connected_peers())}"
            )
            await measure(consumer, providers, args, figures)
            # Print before unwinding: closing dozens of meshed hosts takes a while.
            print(report(args, figures, light), flush=True)
            progress("measurements done; unwinding the swarm")
    return figures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=50, help="all nodes, market nodes included")
    parser.add_argument("--leases", type=int, default=100)
    parser.add_argument("--providers", type=int, default=4, help="full Nodes offering model:words")
    parser.add_argument("--time-limit", type=float, default=480.0, help="seconds for the lease loop")
    args = parser.parse_args(argv)
    if args.providers < 1 or args.nodes - args.providers - 1 < BOOTSTRAP_COUNT:
        parser.error(f"need providers >= 1 and nodes >= providers + 1 + {BOOTSTRAP_COUNT}")
    if args.leases < 1:
        parser.error("need leases >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    disable_yamux_rtt_pings()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Backstop: build (up to a few minutes) + the lease loop + unwinding.
    signal.alarm(int(args.time_limit + 300))
    wall = time.monotonic()
    trio.run(run, args)
    signal.alarm(0)
    progress(f"done in {time.monotonic() - wall:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
