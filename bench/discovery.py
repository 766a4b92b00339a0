"""Discovery benchmark: how soon an offer becomes visible, and how fast ``Discovery.find`` answers.

Usage::

    python bench/discovery.py [--nodes 100] [--providers 10] [--queries 200] [--workers 2]

Builds one loopback swarm of real clawnode nodes, each built as ``tests.support.swarm.open_swarm``
builds them (host + ``DhtService`` + ``CapabilityPublisher`` + ``Discovery``, discovery cache 0),
with ``--providers`` providers spread over the swarm, each offering one of three
capabilities at its own price. Then, one measurement at a time:

1. ``query``: up to ``--queries`` ``Discovery.find`` calls from a random node for a
   random capability, each with ``--query-timeout``. Success means the returned peer
   ids are exactly the providers of that capability (the asking node included when it
   is one). Cache 0, so each call does the provider lookup and fetches every record.
2. ``publish->visible``: a provider starts offering a capability it did not offer
   (``publisher.set_offer``), and a random other node polls ``find`` (cache 0) until
   the provider is in the results; the time from ``set_offer`` to the end of the first
   ``find`` that shows it. ``publish=`` is the time until the provider's own
   ``publish()`` finished (``put_value`` of the record and a ``provide`` of the new capability).
3. ``price change``: a provider changes the price of an offer it already has; the time
   until a random node's ``find`` shows the new price. Records are fetched from the
   provider directly, so this needs no DHT write to land.

Processes (``--workers``, default 2: one per core of the 2-core machine the figures come from).
Why more than one: each real node is its own machine, so its ``find`` waits on nobody else's
work. In one process every node shares one trio loop and one core: at N = 200 a querier's ``find``
queues behind 199 other nodes' work, during a publish the publisher's walk and its 20-60
receivers' (there the querier's first ``find`` took 0.6-1.4 s during a publish, 0.27 s otherwise). With
``--workers W`` the N nodes are split in contiguous blocks over W worker processes, the bootstrap
nodes in worker 0 and the others joining through their addresses. Each worker runs its block in
its own ``trio.run``, built like ``open_swarm`` (``tests.support.swarm.open_nodes``; the refresh and
the extra publish that end ``open_swarm`` run in every worker once all of them have joined). This
process runs no node: it draws every random choice (the same sequence as in one process) and
sends each step over a pipe to the worker that holds the node. Every timestamp is
``time.monotonic()``, and CLOCK_MONOTONIC is system-wide on Linux: a ``set_offer`` instant in one
worker and the end of a ``find`` in another compare. The querier is drawn from all other nodes,
in whichever worker it lives; ``lag`` in the progress lines is the time from the ``set_offer``
instant to the start of the querier's first ``find`` (the pipe hop, for same-worker trials too).
``--workers 1`` keeps every node in this process, with no pipes: the pessimistic layout. Even
with W workers each core runs N/W nodes, far from one machine per node.

``--first-contact`` measures something else: how soon a freshly started home node can
find and be found (issue 16). It runs in one process (``--workers`` above 1 is refused).
A swarm of ``--nodes`` public nodes (two of them providers
of ``model:swarm-offer``) is up first; then ``--home`` fresh nodes start at once, each
offering its own ``model:home-<k>``. A home node is private: what it announces (identify)
is a tarpit address (a socket that takes connections and never answers, like a LAN
address dialled from outside), so only peers it dialled itself reach it, and after
``--private-after`` seconds (the AutoNAT verdict) it turns DHT client and pushes identify,
as the daemon does. Per home node, from its start:

* ``find``: until its own ``Discovery.find`` first returns the swarm's providers
  (``find_call`` is how long that successful call itself took);
* ``found``: until a public node's provider lookup (``providers_of``) lists it;
* ``publish``: until its publisher's first ``publish()`` finished.

Meanwhile public nodes keep looking up random keys; ``lookup_max`` is the slowest such
lookup after the home nodes turned client (a lookup that waits on a silent peer shows
here). It ends with ``discovery_first_contact: ...``.

Visibility times include one ``find`` round (poll resolution); ``find=`` in the
progress lines is the mean duration of the polls.

File descriptors: a connection costs one in the process of each end, and a swarm tends
towards a full mesh, so a process running n of the N nodes needs up to n * (N - 1): 9,900 for
N = 100 in one process, 19,900 for 100 of 200 nodes in each of two workers, against a hard
RLIMIT_NOFILE of 20,000 here. Every process raises its soft limit to the hard one, a note says
when the worst case does not fit, and the line after setup gives each process's count.

Yamux RTT pings are off (as in ``bench/dht_swarm.py``): every connection would
ping every 30 s (yamux.py:151), O(N^2) in a co-located full mesh.

Bounded: ``--time-limit`` (default 440 s) caps the whole run; what is left after
setup is shared out (55 % queries, then 65 % of the rest new offers, the rest price
changes), phases stop early when their share runs out (noted on the final line),
and a SIGALRM backstop ends the process 30 s after the limit. Workers die with this
process (``PR_SET_PDEATHSIG``), ignore Ctrl-C (this process stops them), and leave with
``os._exit`` when asked to stop: unwinding a share of a meshed swarm takes tens of seconds.
The last line is ``discovery: publish_visible_p50_s=... query_p50_s=... workers=W``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import secrets
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.stream_muxer.yamux import yamux as yamux_module

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bootstrap.peer_book import PeerBook
from dht.discovery import Discovery, DiscoveryQuery
from dht.lookup import key_of
from dht.offers import Offer, provider_key
from dht.publisher import CapabilityPublisher
from dht.record_validator import RECORD_NAMESPACE, CapabilityRecordValidator, RejectionCounter
from dht.records import Hardware, bind_wallet
from dht.seq_book import SeqBook
from dht.service import PROVIDER_QUERY_FANOUT, DhtService
from node.host import build_host
from tests.support.swarm import NodeSpec, SwarmNode, open_nodes, open_swarm, publish_offers, refresh_nodes

GWEI = 10**9
CAPABILITIES = ("model:gemma3-270m-q4_k_m", "model:qwen2.5-7b-instruct-q4_k_m", "embedding:all-minilm-l6-v2")
BOOTSTRAP_COUNT = 2
POLL_GAP_S = 0.02
# Seconds kept at the end of --time-limit for unwinding the swarm.
SHUTDOWN_RESERVE_S = 20.0
# Seconds a worker gets to stop before it is terminated.
WORKER_STOP_S = 5.0
LOOPBACK_LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def progress(text: str) -> None:
    print(f"[discovery {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def quiet_logging() -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.getLogger().setLevel(logging.WARNING)


def disable_yamux_rtt_pings() -> None:
    if not isinstance(getattr(yamux_module, "RTT_MEASURE_INTERVAL", None), int | float):
        raise RuntimeError("py-libp2p's Yamux changed: revisit disable_yamux_rtt_pings in bench/discovery.py")
    setattr(yamux_module, "RTT_MEASURE_INTERVAL", 10.0**9)  # noqa: B010


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard one (in every process); returns the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return -1


def offer(capability: str, price: int) -> Offer:
    if capability.startswith("embedding:"):
        return Offer(name=capability, unit="request", price_per_unit=price, context_length=512)
    return Offer(name=capability, price_per_unit=price, context_length=8192)


def percentile(values: Sequence[float], share: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}s"


@dataclass
class Figures:
    setup_s: float = 0.0
    query_s: list[float] = field(default_factory=list)
    query_ok: int = 0
    query_done: int = 0
    visible_s: list[float] = field(default_factory=list)
    publish_s: list[float] = field(default_factory=list)
    visible_tries: int = 0
    price_s: list[float] = field(default_factory=list)
    price_tries: int = 0
    find_s: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    finished: bool = False


def provider_indices(nodes: int, providers: int) -> list[int]:
    """Providers spread evenly over the non-bootstrap nodes."""
    pool = list(range(BOOTSTRAP_COUNT, nodes))
    step = len(pool) / providers
    return [pool[int(i * step)] for i in range(providers)]


def provider_specs(args: argparse.Namespace) -> dict[int, NodeSpec]:
    return {
        index: NodeSpec(
            offers=(offer(CAPABILITIES[n % len(CAPABILITIES)], (n + 1) * GWEI),),
            hardware=Hardware(cores=4, ram_mb=16384),
        )
        for n, index in enumerate(provider_indices(args.nodes, args.providers))
    }


def worker_blocks(nodes: int, workers: int) -> list[list[int]]:
    """Contiguous blocks of node indices, as even as can be; the bootstrap nodes are in the first."""
    blocks: list[list[int]] = []
    start = 0
    for number in range(workers):
        size = nodes // workers + (1 if number < nodes % workers else 0)
        blocks.append(list(range(start, start + size)))
        start += size
    return blocks


# --- what the coordinator knows of a node, wherever it runs ------------------------------------


@dataclass
class NodeView:
    index: int
    peer_id: str
    dht_key: int  # key_of(peer id bytes): XOR distances for the placement report
    offers: list[Offer]
    held: dict[str, list[str]]  # capability -> the providers this node's provider store holds for its key
    silent: int  # peers this node stopped asking (lookup_guard)
    table: int  # routing table size
    conns: int  # connected peers


def view_of(index: int, node: SwarmNode) -> NodeView:
    store = node.dht.dht.provider_store
    return NodeView(
        index=index,
        peer_id=node.peer_id,
        dht_key=key_of(node.host.get_id().to_bytes()),
        offers=node.publisher.offers,
        held={c: [str(info.peer_id) for info in store.get_providers(provider_key(c))] for c in CAPABILITIES},
        silent=len(node.dht.silent),
        table=node.dht.routing_table_size(),
        conns=len(node.host.get_connected_peers()),
    )


def expected_providers(views: Sequence[NodeView], capability: str) -> set[str]:
    return {view.peer_id for view in views if any(o.name == capability for o in view.offers)}


def report_swarm(views: Sequence[NodeView], setup_s: float, fds: Sequence[int], fd_limit: int) -> None:
    tables = [view.table for view in views]
    conns = [view.conns for view in views]
    progress(
        f"swarm up in {setup_s:.1f}s: routing table mean {sum(tables) / len(tables):.1f} "
        f"(min {min(tables)}), connections mean {sum(conns) / len(conns):.1f} (max {max(conns)}); "
        f"descriptors per process {' + '.join(str(n) for n in fds)} (limit {fd_limit})"
    )
    lonely = [f"{view.index} ({view.table})" for view in views if view.table < 3]
    if lonely:
        progress("nodes with under 3 routing table entries: " + ", ".join(lonely))


def report_placement(views: Sequence[NodeView]) -> None:
    """Where each provider record sits once the swarm is up: how many of its capability key's true
    closest peers (by XOR over every node of the swarm) hold it, against how many a query asks
    (``PROVIDER_QUERY_FANOUT``). A provider none of those closest hold is missing from every query
    that settles on them; silent marks are peers some node stopped asking (``lookup_guard``)."""
    for capability in CAPABILITIES:
        target = key_of(provider_key(capability))
        ranked = sorted(views, key=lambda view: view.dht_key ^ target)
        held: list[str] = []
        for provider in expected_providers(views, capability):
            holders = [rank for rank, view in enumerate(ranked) if provider in view.held[capability]]
            near = sum(rank < PROVIDER_QUERY_FANOUT for rank in holders)
            held.append(f"{provider[-6:]} {near}/{PROVIDER_QUERY_FANOUT} closest, {len(holders)} in all")
        progress(f"placement {capability}: " + "; ".join(held))
    silent = [view.silent for view in views]
    progress(f"silent marks: {sum(silent)} over {sum(1 for n in silent if n)} nodes (max {max(silent)})")


def fd_worst_case(nodes: int, workers: int, limit: int) -> None:
    """A note when a process's share of a full mesh would not fit under the descriptor limit."""
    most = max(len(block) for block in worker_blocks(nodes, workers))
    need = most * (nodes - 1)
    if need > limit:
        progress(
            f"note: a full mesh needs up to {need} descriptors in a process of {most} nodes, over the limit "
            f"of {limit}; fine while the swarm stays sparser (see the descriptors after setup)"
        )


# --- the swarm, as the measurements see it ------------------------------------------------------

# What crosses a pipe is built-in types and ``Offer`` only (a class of this file would not unpickle
# under multiprocessing's ``spawn``, where this module is ``__mp_main__`` in the worker).
Found = tuple[float | None, list[tuple[str, int]]]  # seconds (None: timed out), (peer id, price) per result
Seen = tuple[float | None, list[float], float]  # seconds to visible (None: not in time), poll durations, lag


class Swarm(Protocol):
    async def views(self) -> list[NodeView]: ...

    async def find(self, index: int, capability: str, timeout: float) -> Found: ...

    async def set_offer(self, index: int, new: Offer, watch_publish: bool) -> tuple[float, list[Offer]]: ...

    async def wait_visible(
        self, index: int, provider: str, capability: str, price: int, started: float, args: dict[str, float]
    ) -> Seen: ...

    async def published(self, index: int, started: float, visible_timeout: float) -> float | None: ...


class LocalSwarm:
    """Nodes of this process, driven directly: the whole swarm (``--workers 1``) or a worker's block."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nodes: dict[int, SwarmNode] = {}
        self._nursery = nursery
        self._publishes: dict[int, tuple[trio.CancelScope, list[float]]] = {}

    def add(self, indices: Sequence[int], nodes: Sequence[SwarmNode]) -> None:
        self.nodes.update(zip(indices, nodes, strict=True))

    async def views(self) -> list[NodeView]:
        return [view_of(index, node) for index, node in sorted(self.nodes.items())]

    async def find(self, index: int, capability: str, timeout: float) -> Found:
        started = time.monotonic()
        with trio.move_on_after(timeout):
            results = await self.nodes[index].discovery.find(DiscoveryQuery(capability=capability, limit=50))
            return time.monotonic() - started, [(result.peer_id, result.price_per_unit) for result in results]
        return None, []

    async def set_offer(self, index: int, new: Offer, watch_publish: bool) -> tuple[float, list[Offer]]:
        """``set_offer`` on the node; returns its instant. With ``watch_publish``, the time until the
        provider's ``publish()`` finishes is taken in the background (``published``)."""
        publisher = self.nodes[index].publisher
        before = publisher.published_at
        started = time.monotonic()
        publisher.set_offer(new)
        if watch_publish:
            scope, out = trio.CancelScope(), list[float]()
            self._publishes[index] = (scope, out)
            self._nursery.start_soon(self._watch_publish, publisher, before, started, scope, out)
        return started, publisher.offers

    @staticmethod
    async def _watch_publish(
        publisher: CapabilityPublisher, before: float | None, started: float, scope: trio.CancelScope, out: list[float]
    ) -> None:
        with scope:
            while publisher.published_at == before:
                await trio.sleep(0.005)
            out.append(time.monotonic() - started)

    async def wait_visible(
        self, index: int, provider: str, capability: str, price: int, started: float, args: dict[str, float]
    ) -> Seen:
        """Seconds from ``started`` until node ``index`` sees ``provider`` offer ``capability`` at ``price``."""
        polls: list[float] = []
        lag = time.monotonic() - started
        with trio.move_on_after(started + args["visible_timeout"] - time.monotonic()):
            while True:
                elapsed, results = await self.find(index, capability, args["query_timeout"])
                if elapsed is not None:
                    polls.append(elapsed)
                if (provider, price) in results:
                    return time.monotonic() - started, polls, lag
                await trio.sleep(POLL_GAP_S)
        return None, polls, lag

    async def published(self, index: int, started: float, visible_timeout: float) -> float | None:
        """Seconds from ``started`` until the publish after ``set_offer`` finished, waited for until
        ``visible_timeout`` after ``started``."""
        scope, out = self._publishes.pop(index)
        with trio.move_on_after(max(0.0, visible_timeout - (time.monotonic() - started))):
            while not out:
                await trio.sleep(0.01)
        scope.cancel()
        return out[0] if out else None


# --- the measurements (the same for one process and for workers) -------------------------------


async def measure_queries(
    swarm: Swarm,
    views: list[NodeView],
    rng: random.Random,
    args: argparse.Namespace,
    deadline: float,
    figures: Figures,
) -> None:
    for index in range(args.queries):
        if time.monotonic() >= deadline:
            figures.notes.append(f"queries stopped at {index} by the time limit")
            break
        node = rng.choice(views)
        capability = rng.choice(CAPABILITIES)
        expected = expected_providers(views, capability)
        elapsed, results = await swarm.find(node.index, capability, args.query_timeout)
        figures.query_done += 1
        if elapsed is not None:
            figures.find_s.append(elapsed)
            figures.query_s.append(elapsed)
            returned = {peer for peer, _ in results}
            if returned == expected:
                figures.query_ok += 1
            else:
                progress(
                    f"query {index + 1}: node {node.index} {capability}: {len(returned & expected)} of "
                    f"{len(expected)} providers, {len(returned - expected)} others, {elapsed:.3f}s; missing "
                    + ", ".join(sorted(peer[-6:] for peer in expected - returned))
                )
        else:
            progress(f"query {index + 1}: node {node.index} {capability}: timed out")
        if (index + 1) % 25 == 0:
            progress(
                f"queries {index + 1}: p50 {fmt(percentile(figures.query_s, 0.5))} "
                f"p95 {fmt(percentile(figures.query_s, 0.95))}, {figures.query_ok}/{figures.query_done} exact"
            )


def wait_args(args: argparse.Namespace) -> dict[str, float]:
    return {"visible_timeout": args.visible_timeout, "query_timeout": args.query_timeout}


async def measure_new_offers(
    swarm: Swarm,
    views: list[NodeView],
    providers: list[int],
    rng: random.Random,
    args: argparse.Namespace,
    deadline: float,
    figures: Figures,
) -> None:
    """A provider starts offering a capability it did not offer; a random other node waits to see it."""
    candidates = [
        (index, capability)
        for index in providers
        for capability in CAPABILITIES
        if all(o.name != capability for o in views[index].offers)
    ]
    rng.shuffle(candidates)
    for trial, (index, capability) in enumerate(candidates[: args.pairs]):
        if time.monotonic() >= deadline:
            figures.notes.append(f"publish trials stopped at {trial} by the time limit")
            break
        provider = views[index]
        querier = rng.choice([view for i, view in enumerate(views) if i != index])
        price = rng.randint(1, 9) * GWEI
        # Before the change, the querier must not see it (it cannot: the offer is new).
        started, provider.offers = await swarm.set_offer(index, offer(capability, price), True)
        figures.visible_tries += 1
        seen, polls, lag = await swarm.wait_visible(
            querier.index, provider.peer_id, capability, price, started, wait_args(args)
        )
        published = await swarm.published(index, started, args.visible_timeout)
        figures.find_s.extend(polls)
        if seen is not None:
            figures.visible_s.append(seen)
        if published is not None:
            figures.publish_s.append(published)
        progress(
            f"new offer {trial + 1}: node {index} +{capability} -> node {querier.index}: "
            f"visible {fmt(seen) if seen is not None else 'NOT within ' + str(args.visible_timeout) + 's'}, "
            f"publish {fmt(published) if published is not None else 'n/a'}, {len(polls)} polls "
            f"(find {fmt(sum(polls) / len(polls)) if polls else 'n/a'}, lag {lag * 1000:.1f}ms)"
        )


async def measure_price_changes(
    swarm: Swarm,
    views: list[NodeView],
    providers: list[int],
    rng: random.Random,
    args: argparse.Namespace,
    deadline: float,
    figures: Figures,
) -> None:
    for trial in range(args.price_changes):
        if time.monotonic() >= deadline:
            figures.notes.append(f"price changes stopped at {trial} by the time limit")
            break
        index = rng.choice(providers)
        provider = views[index]
        current = rng.choice(provider.offers)
        querier = rng.choice([view for i, view in enumerate(views) if i != index])
        price = current.price_per_unit + rng.randint(1, 9) * GWEI
        started, provider.offers = await swarm.set_offer(
            index, current.model_copy(update={"price_per_unit": price}), False
        )
        figures.price_tries += 1
        seen, polls, lag = await swarm.wait_visible(
            querier.index, provider.peer_id, current.name, price, started, wait_args(args)
        )
        figures.find_s.extend(polls)
        if seen is not None:
            figures.price_s.append(seen)
        progress(
            f"price change {trial + 1}: node {index} {current.name} -> node {querier.index}: "
            f"visible {fmt(seen) if seen is not None else 'NOT within ' + str(args.visible_timeout) + 's'}, "
            f"{len(polls)} polls (find {fmt(sum(polls) / len(polls)) if polls else 'n/a'}, lag {lag * 1000:.1f}ms)"
        )


async def measure(
    swarm: Swarm, args: argparse.Namespace, deadline: float, figures: Figures, fds: Sequence[int], fd_limit: int
) -> None:
    rng = random.Random(args.seed)
    providers = provider_indices(args.nodes, args.providers)
    views = await swarm.views()
    report_swarm(views, figures.setup_s, fds, fd_limit)
    report_placement(views)
    # What is left: 55 % to queries, then 65 % of the rest to new offers, the rest to
    # price changes. A phase starts no new measurement after its share, and one still
    # running at the overall deadline is cut off (and not counted).
    left = deadline - time.monotonic()
    await measure_queries(swarm, views, rng, args, time.monotonic() + left * 0.55, figures)
    left = deadline - time.monotonic()
    await measure_new_offers(swarm, views, providers, rng, args, time.monotonic() + left * 0.65, figures)
    await measure_price_changes(swarm, views, providers, rng, args, deadline, figures)
    progress("measurements done; unwinding the swarm")
    figures.finished = True


async def run(args: argparse.Namespace, fd_limit: int) -> Figures:
    """``--workers 1``: every node in this process and this ``trio.run``."""
    figures = Figures()
    start = time.monotonic()
    deadline = start + args.time_limit - SHUTDOWN_RESERVE_S
    progress(f"building {args.nodes} nodes in one process, providers at {provider_indices(args.nodes, args.providers)}")
    with trio.move_on_after(args.time_limit - SHUTDOWN_RESERVE_S) as everything:
        specs = provider_specs(args)
        async with (
            open_swarm(args.nodes, bootstrap_count=BOOTSTRAP_COUNT, specs=specs, cache_ttl_s=0.0) as nodes,
            trio.open_nursery() as nursery,
        ):
            figures.setup_s = time.monotonic() - start
            swarm = LocalSwarm(nursery)
            swarm.add(range(args.nodes), nodes)
            await measure(swarm, args, deadline, figures, [open_fds()], fd_limit)
            nursery.cancel_scope.cancel()
    if everything.cancelled_caught and not figures.finished:
        figures.notes.append("the time limit cut the run short")
    return figures


# --- workers: a block of nodes per process, driven over a pipe ----------------------------------

Message = dict[str, Any]


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when the coordinator dies (its SIGALRM backstop included)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the coordinator's stop_workers only
        return
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


class WorkerBlock:
    """One worker's share of the swarm: its nodes, started on the coordinator's word."""

    def __init__(
        self, stack: AsyncExitStack, swarm: LocalSwarm, indices: list[int], args: argparse.Namespace, scratch: Path
    ) -> None:
        self.stack = stack
        self.swarm = swarm
        self.indices = indices
        self.args = args
        self.specs = provider_specs(args)
        self.scratch = scratch

    async def _open(self, indices: list[int], bootstrap: Sequence[str], bootstrap_count: int) -> float:
        started = time.monotonic()
        nodes = await self.stack.enter_async_context(
            open_nodes(
                indices,
                self.scratch,
                bootstrap=bootstrap,
                bootstrap_count=bootstrap_count,
                specs=self.specs,
                cache_ttl_s=0.0,
                # A worker's block joins while the other blocks do: at N = 200 that can take longer than
                # the fixture's deadline; --time-limit bounds it instead.
                join_deadline_s=self.args.time_limit,
            )
        )
        self.swarm.add(indices, nodes)
        return time.monotonic() - started

    async def bootstrap(self) -> list[str]:
        """Start this block's first ``BOOTSTRAP_COUNT`` nodes (worker 0: the swarm's bootstrap
        peers); their addresses."""
        first = self.indices[:BOOTSTRAP_COUNT]
        await self._open(first, (), BOOTSTRAP_COUNT)
        return [self.swarm.nodes[index].addrs[0] for index in first]

    async def start(self, bootstrap: list[str]) -> float:
        """Start every node of the block not started yet, and wait until each has joined."""
        return await self._open([i for i in self.indices if i not in self.swarm.nodes], bootstrap, 0)

    async def refresh(self) -> float:
        started = time.monotonic()
        await refresh_nodes(list(self.swarm.nodes.values()))
        return time.monotonic() - started

    async def publish(self) -> float:
        started = time.monotonic()
        await publish_offers(list(self.swarm.nodes.values()))
        return time.monotonic() - started

    async def fds(self) -> int:
        return open_fds()


async def _serve(
    conn: multiprocessing.connection.Connection, indices: list[int], args: argparse.Namespace, scratch: Path
) -> None:
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        swarm = LocalSwarm(nursery)
        block = WorkerBlock(stack, swarm, indices, args, scratch)
        handlers: dict[str, Callable[..., Awaitable[Any]]] = {
            "bootstrap": block.bootstrap,
            "start": block.start,
            "refresh": block.refresh,
            "publish": block.publish,
            "fds": block.fds,
            "views": swarm.views,
            "find": swarm.find,
            "set_offer": swarm.set_offer,
            "wait_visible": swarm.wait_visible,
            "published": swarm.published,
        }
        while True:
            try:
                # Small pickled messages: once readable, the whole message is there.
                await trio.lowlevel.wait_readable(conn.fileno())
                message: Message = conn.recv()
            except EOFError:  # the coordinator is gone
                message = {"op": "stop", "args": []}
            if message["op"] == "stop":
                _exit_now(conn)
            try:
                value = await handlers[message["op"]](*message["args"])
            except Exception as error:  # noqa: BLE001 - reported to the coordinator, which stops
                conn.send({"error": _innermost(error)})
                continue
            if message["op"] == "views":
                value = [dataclasses.asdict(view) for view in value]
            conn.send({"value": value})


def _exit_now(conn: multiprocessing.connection.Connection) -> NoReturn:
    """Leave without unwinding the nodes (tens of seconds for a share of a meshed swarm, see
    ``bench/dht_swarm.py``); the kernel closes their sockets, the coordinator removes the peer books."""
    try:
        conn.send({"value": "stopped"})
    except (OSError, ValueError):  # the coordinator is gone
        pass
    os._exit(0)


def _innermost(error: BaseException) -> str:
    """The traceback of the first leaf of ``error`` (nested nurseries wrap one failure many times)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return "".join(traceback.format_exception(error))


def worker_main(
    conn: multiprocessing.connection.Connection,
    indices: list[int],
    args: argparse.Namespace,
    parent: int,
    inherited: list[multiprocessing.connection.Connection],
    scratch: Path,
) -> None:
    die_with_parent(parent)
    for other in inherited:  # the coordinator's ends, copied by fork: an EOF must mean it is gone
        other.close()
    # Ctrl-C reaches the whole process group: the coordinator stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_logging()
    disable_yamux_rtt_pings()
    raise_fd_limit()
    try:
        trio.run(_serve, conn, indices, args, scratch)
    except BaseException as error:  # noqa: BLE001 - reported to the coordinator
        try:
            conn.send({"error": _innermost(error)})
        except Exception:  # noqa: BLE001 - the coordinator is gone
            pass


class WorkerError(RuntimeError):
    pass


class Worker:
    """The coordinator's end of one worker process."""

    def __init__(
        self,
        context: Any,
        number: int,
        indices: list[int],
        args: argparse.Namespace,
        siblings: Sequence[Worker],
        scratch: Path,
    ) -> None:
        self.number = number
        self.indices = indices
        self.conn, child = context.Pipe()
        inherited = [self.conn, *(worker.conn for worker in siblings)]
        self.process = context.Process(
            target=worker_main,
            args=(child, indices, args, os.getpid(), inherited, scratch),
            name=f"discovery-{number}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.busy = False

    def _recv(self) -> Message:
        try:
            message: Message = self.conn.recv()
        except EOFError as error:
            self.process.join(1.0)
            raise WorkerError(f"worker {self.number} exited (code {self.process.exitcode})") from error
        return message

    async def ask(self, op: str, *args: Any) -> Any:
        if self.busy:  # a wait cancelled earlier left a thread reading this pipe
            raise WorkerError(f"worker {self.number} still owes an answer")
        self.busy = True
        self.conn.send({"op": op, "args": args})
        # A blocking read in a thread: this loop stays free for the other workers' answers.
        message = await trio.to_thread.run_sync(self._recv, abandon_on_cancel=True)  # type: ignore[call-arg]  # stale trio-stubs
        self.busy = False
        if "error" in message:
            raise WorkerError(f"worker {self.number} failed in {op}:\n{message['error']}")
        return message["value"]


class RemoteSwarm:
    """The swarm split over worker processes; each call goes to the worker holding the node."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.worker_of = {index: worker for worker in workers for index in worker.indices}

    async def each(self, op: str, *args: Any) -> list[Any]:
        """``op`` in every worker at once; the answers in worker order."""
        answers: list[Any] = [None] * len(self.workers)

        async def one(worker: Worker) -> None:
            answers[worker.number] = await worker.ask(op, *args)

        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                nursery.start_soon(one, worker)
        return answers

    async def build(self) -> None:
        started = time.monotonic()
        bootstrap = await self.workers[0].ask("bootstrap")
        progress(f"bootstrap nodes up in {time.monotonic() - started:.1f}s (worker 0)")
        joins = await self.each("start", bootstrap)
        progress("joined: " + ", ".join(f"worker {n} in {s:.1f}s" for n, s in enumerate(joins)))
        refreshes = await self.each("refresh")
        progress("refreshed: " + ", ".join(f"worker {n} in {s:.1f}s" for n, s in enumerate(refreshes)))
        publishes = await self.each("publish")
        progress("published: " + ", ".join(f"worker {n} in {s:.1f}s" for n, s in enumerate(publishes)))

    async def views(self) -> list[NodeView]:
        views = [NodeView(**view) for block in await self.each("views") for view in block]
        return sorted(views, key=lambda view: view.index)

    async def find(self, index: int, capability: str, timeout: float) -> Found:
        found: Found = await self.worker_of[index].ask("find", index, capability, timeout)
        return found

    async def set_offer(self, index: int, new: Offer, watch_publish: bool) -> tuple[float, list[Offer]]:
        done: tuple[float, list[Offer]] = await self.worker_of[index].ask("set_offer", index, new, watch_publish)
        return done

    async def wait_visible(
        self, index: int, provider: str, capability: str, price: int, started: float, args: dict[str, float]
    ) -> Seen:
        seen: Seen = await self.worker_of[index].ask("wait_visible", index, provider, capability, price, started, args)
        return seen

    async def published(self, index: int, started: float, visible_timeout: float) -> float | None:
        value: float | None = await self.worker_of[index].ask("published", index, started, visible_timeout)
        return value


async def coordinate(args: argparse.Namespace, workers: list[Worker], start: float, fd_limit: int) -> Figures:
    figures = Figures()
    deadline = start + args.time_limit - SHUTDOWN_RESERVE_S
    with trio.move_on_after(deadline - time.monotonic()) as everything:
        swarm = RemoteSwarm(workers)
        await swarm.build()
        figures.setup_s = time.monotonic() - start
        await measure(swarm, args, deadline, figures, await swarm.each("fds"), fd_limit)
    if everything.cancelled_caught and not figures.finished:
        figures.notes.append("the time limit cut the run short")
    return figures


def stop_workers(workers: Sequence[Worker]) -> None:
    """Ask every worker to stop (it leaves at once), then terminate, then kill what is left."""
    for worker in workers:
        try:
            worker.conn.send({"op": "stop", "args": []})
        except (OSError, ValueError):  # gone already
            pass
    deadline = time.monotonic() + WORKER_STOP_S
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.process.is_alive():
            progress(f"worker {worker.number} did not stop (busy with a step): terminating it")
            worker.process.terminate()
            worker.process.join(5.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(5.0)


def run_in_workers(args: argparse.Namespace, fd_limit: int) -> Figures:
    """``--workers W`` (W > 1): W worker processes, each with a block of nodes; this one coordinates."""
    start = time.monotonic()
    blocks = worker_blocks(args.nodes, args.workers)
    progress(
        f"building {args.nodes} nodes in {args.workers} worker processes "
        f"({', '.join(f'{b[0]}-{b[-1]}' for b in blocks)}), providers at {provider_indices(args.nodes, args.providers)}"
    )
    fd_worst_case(args.nodes, args.workers, fd_limit)
    # fork, before this process runs trio or any thread: a worker starts at once (no second import
    # of everything, seconds on busy cores) and is tied to this process before it does anything.
    context = multiprocessing.get_context("fork")
    workers: list[Worker] = []
    with tempfile.TemporaryDirectory(prefix="clawnode-discovery-") as scratch:
        try:
            for number, block in enumerate(blocks):
                folder = Path(scratch) / f"worker-{number}"
                folder.mkdir()
                workers.append(Worker(context, number, block, args, workers, folder))
            return trio.run(coordinate, args, workers, start, fd_limit)
        finally:
            stop_workers(workers)


# --- first contact (issue 16) ------------------------------------------------------------------

SWARM_OFFER = "model:swarm-offer"
FIRST_CONTACT_PROVIDERS = (3, 4)  # swarm indices offering SWARM_OFFER (0 and 1 are the bootstrap peers)


@dataclass
class FirstContact:
    setup_s: float = 0.0
    find_s: list[float] = field(default_factory=list)
    find_call_s: list[float] = field(default_factory=list)
    found_s: list[float] = field(default_factory=list)
    publish_s: list[float] = field(default_factory=list)
    lookups_s: list[float] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)


async def _home_node(
    k: int,
    swarm: list[SwarmNode],
    tarpit_port: int,
    scratch: Path,
    args: argparse.Namespace,
    figures: FirstContact,
    turned: trio.Event,
) -> None:
    started = trio.current_time()
    key_pair = generate_new_ed25519_identity()
    host = build_host(key_pair)
    capability = f"model:home-{k}"
    # Only peers it dials itself reach it: what it announces goes nowhere.
    hidden = [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{tarpit_port}")]
    async with host.run(LOOPBACK_LISTEN), trio.open_nursery() as nursery:
        host.get_addrs = lambda: list(hidden)  # type: ignore[method-assign]
        rejections, seq_book = RejectionCounter(), SeqBook()
        dht = DhtService(
            host,
            bootstrap_addrs=[node.addrs[0] for node in swarm[:BOOTSTRAP_COUNT]],
            peer_book=PeerBook(scratch / f"home-{k}.json"),
            refresh_interval_s=3600.0,
        )
        dht.add_validator(
            RECORD_NAMESPACE, CapabilityRecordValidator(rejections, held_value=dht.held_value, seq_book=seq_book)
        )
        await nursery.start(dht.run)
        publisher = CapabilityPublisher(
            host,
            dht,
            key_pair.private_key,
            wallet=bind_wallet(secrets.token_bytes(32), str(host.get_id())),
            hardware=Hardware(cores=4, ram_mb=8192),
            offers=[offer(capability, GWEI)],
            reachability=lambda: "private",
        )
        await nursery.start(publisher.run)
        discovery = Discovery(host, dht, rejections, lambda: publisher.record, cache_ttl_s=0.0, seq_book=seq_book)
        me = host.get_id()

        async def turn_client() -> None:
            await trio.sleep(args.private_after)
            dht.serve(False)
            # As the daemon does after serve(): peers learn the protocol list without the DHT.
            with trio.move_on_after(10):
                await push_identify_to_peers(host)
            turned.set()

        async def first_find() -> None:
            expected = {swarm[i].peer_id for i in FIRST_CONTACT_PROVIDERS}
            while True:
                call = trio.current_time()
                with trio.move_on_after(args.query_timeout):
                    results = await discovery.find(DiscoveryQuery(capability=SWARM_OFFER))
                    if {r.peer_id for r in results} >= expected:
                        figures.find_s.append(trio.current_time() - started)
                        figures.find_call_s.append(trio.current_time() - call)
                        return
                await trio.sleep(0.1)

        async def be_found() -> None:
            querier = swarm[BOOTSTRAP_COUNT + k % (len(swarm) - BOOTSTRAP_COUNT)]
            while True:
                with trio.move_on_after(args.query_timeout):
                    if me in await querier.discovery.providers_of(capability):
                        figures.found_s.append(trio.current_time() - started)
                        return
                await trio.sleep(0.1)

        async def published() -> None:
            while publisher.published_at is None:
                await trio.sleep(0.01)
            figures.publish_s.append(trio.current_time() - started)

        nursery.start_soon(turn_client)
        with trio.move_on_after(args.visible_timeout) as scope:
            async with trio.open_nursery() as measures:
                measures.start_soon(first_find)
                measures.start_soon(be_found)
                measures.start_soon(published)
        if scope.cancelled_caught:
            figures.missed.append(f"home {k} not done within {args.visible_timeout}s")
        await trio.sleep(args.private_after + 12)  # stay up while the public nodes' lookups run
        nursery.cancel_scope.cancel()


async def _public_lookups(swarm: list[SwarmNode], turned: trio.Event, rng: random.Random, out: list[float]) -> None:
    """Public nodes look up random keys; after the home nodes turned client, each lookup's time."""
    await turned.wait()
    for _ in range(12):
        node = rng.choice(swarm)
        key = secrets.token_bytes(32)
        started = trio.current_time()
        with trio.move_on_after(30):
            await node.dht.dht.peer_routing.find_closest_peers_network(key)
        out.append(trio.current_time() - started)
        await trio.sleep(0.5)


async def run_first_contact(args: argparse.Namespace) -> FirstContact:
    figures = FirstContact()
    rng = random.Random(args.seed)
    start = trio.current_time()
    specs = {
        index: NodeSpec(offers=(offer(SWARM_OFFER, GWEI * (n + 1)),), hardware=Hardware(cores=4, ram_mb=16384))
        for n, index in enumerate(FIRST_CONTACT_PROVIDERS)
    }
    with (
        trio.move_on_after(args.time_limit - SHUTDOWN_RESERVE_S),
        tempfile.TemporaryDirectory(prefix="clawnode-first-contact-") as scratch,
    ):
        async with open_swarm(args.nodes, bootstrap_count=BOOTSTRAP_COUNT, specs=specs, cache_ttl_s=0.0) as swarm:
            figures.setup_s = trio.current_time() - start
            progress(f"swarm of {args.nodes} up in {figures.setup_s:.1f}s; starting {args.home} home nodes")
            # A port that completes the TCP handshake in the kernel and never answers: a dial hangs.
            with trio.socket.socket() as tarpit:
                await tarpit.bind(("127.0.0.1", 0))
                tarpit.listen(1024)
                port = tarpit.getsockname()[1]
                turned = trio.Event()
                async with trio.open_nursery() as homes:
                    homes.start_soon(_public_lookups, swarm, turned, rng, figures.lookups_s)
                    for k in range(args.home):
                        homes.start_soon(_home_node, k, swarm, port, Path(scratch), args, figures, turned)
    return figures


def report_first_contact(args: argparse.Namespace, figures: FirstContact) -> None:
    notes = f" [{'; '.join(figures.missed)}]" if figures.missed else ""
    progress(
        f"find {sorted(round(v, 2) for v in figures.find_s)} found {sorted(round(v, 2) for v in figures.found_s)} "
        f"publish {sorted(round(v, 2) for v in figures.publish_s)} lookups {[round(v, 2) for v in figures.lookups_s]}"
    )
    print(
        f"discovery_first_contact: nodes={args.nodes} home={args.home} private_after_s={args.private_after} "
        f"find_p50_s={fmt(percentile(figures.find_s, 0.5))} find_max_s={fmt(max(figures.find_s, default=math.nan))} "
        f"find_call_p50_s={fmt(percentile(figures.find_call_s, 0.5))} "
        f"found_p50_s={fmt(percentile(figures.found_s, 0.5))} "
        f"found_max_s={fmt(max(figures.found_s, default=math.nan))} "
        f"publish_p50_s={fmt(percentile(figures.publish_s, 0.5))} "
        f"lookup_max_s={fmt(max(figures.lookups_s, default=math.nan))} "
        f"done={len(figures.find_s)}/{args.home}{notes}",
        flush=True,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--providers", type=int, default=10)
    parser.add_argument("--queries", type=int, default=200, help="find() calls for the latency figures")
    parser.add_argument(
        "--pairs",
        type=int,
        default=20,
        help="(provider, querier) pairs for publish->visible (at most what the providers do not offer yet)",
    )
    parser.add_argument("--price-changes", type=int, default=5)
    parser.add_argument("--query-timeout", type=float, default=20.0, help="seconds per find()")
    parser.add_argument("--visible-timeout", type=float, default=30.0, help="seconds to wait for one change")
    parser.add_argument("--time-limit", type=float, default=440.0, help="seconds for the whole run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes the nodes are split over (default 2, one per core here; 1: every node in one process)",
    )
    parser.add_argument("--first-contact", action="store_true", help="time a fresh home node's first find and find-by")
    parser.add_argument("--home", type=int, default=4, help="--first-contact: fresh home nodes started at once")
    parser.add_argument("--private-after", type=float, default=2.0, help="--first-contact: seconds to the NAT verdict")
    args = parser.parse_args(argv)
    if args.first_contact:
        if args.workers not in (None, 1):
            parser.error("--first-contact runs in one process: leave out --workers (or give 1)")
        args.workers = 1
        if args.nodes < max(FIRST_CONTACT_PROVIDERS) + 1 or args.home < 1:
            parser.error("--first-contact needs --nodes >= 5 and --home >= 1")
        return args
    if args.workers is None:
        args.workers = 2
    if args.nodes < BOOTSTRAP_COUNT + args.providers or args.providers < 1:
        parser.error("need 1 <= providers <= nodes - 2")
    if args.workers < 1 or args.nodes // args.workers < BOOTSTRAP_COUNT:
        parser.error(f"need 1 <= workers <= nodes / {BOOTSTRAP_COUNT}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    disable_yamux_rtt_pings()
    fd_limit = raise_fd_limit()
    # Backstop: whatever hangs, the process ends half a minute after the limit (its workers with it).
    signal.alarm(int(args.time_limit + 30))
    wall = time.monotonic()
    if args.first_contact:
        first = trio.run(run_first_contact, args)
        signal.alarm(0)
        progress(f"done in {time.monotonic() - wall:.1f}s")
        report_first_contact(args, first)
        return 0
    figures = trio.run(run, args, fd_limit) if args.workers == 1 else run_in_workers(args, fd_limit)
    signal.alarm(0)
    progress(f"done in {time.monotonic() - wall:.1f}s")
    success = 100.0 * figures.query_ok / figures.query_done if figures.query_done else math.nan
    notes = f" [{'; '.join(figures.notes)}]" if figures.notes else ""
    print(
        f"discovery N={args.nodes} providers={args.providers} workers={args.workers}: "
        f"publish->visible p50={fmt(percentile(figures.visible_s, 0.5))} "
        f"p95={fmt(percentile(figures.visible_s, 0.95))} "
        f"({len(figures.visible_s)}/{figures.visible_tries} seen; "
        f"publish() p50={fmt(percentile(figures.publish_s, 0.5))}) "
        f"| price change p50={fmt(percentile(figures.price_s, 0.5))} "
        f"({len(figures.price_s)}/{figures.price_tries} seen) "
        f"| query p50={fmt(percentile(figures.query_s, 0.5))} p95={fmt(percentile(figures.query_s, 0.95))} "
        f"success={success:.1f}% ({figures.query_done} queries) "
        f"(setup {figures.setup_s:.1f}s){notes}",
        flush=True,
    )
    print(
        f"discovery: publish_visible_p50_s={percentile(figures.visible_s, 0.5):.3f} "
        f"query_p50_s={percentile(figures.query_s, 0.5):.3f} workers={args.workers}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
