"""Discovery benchmark: how soon an offer becomes visible, and how fast ``Discovery.find`` answers.

Usage::

    python bench/discovery.py [--nodes 100] [--providers 10] [--queries 200]

Builds one loopback swarm of real clawnode nodes with ``tests.support.swarm.open_swarm``
(host + ``DhtService`` + ``CapabilityPublisher`` + ``Discovery``, discovery cache 0),
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

``--first-contact`` measures something else: how soon a freshly started home node can
find and be found (issue 16). A swarm of ``--nodes`` public nodes (two of them providers
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

One process: the swarm fixture runs every node in one ``trio.run``, and timing a
``set_offer`` on one node against a ``find`` on another needs both objects and one
clock. 100 fully meshed nodes need ~9,900 file descriptors, under the 20,000 limit
(raised to the hard limit here). The cost is that all nodes share one core, so
latencies include scheduling behind the other 99 nodes' work; on 2 cores shared
with other jobs, a second process would buy little and make the timing cross-process.

Yamux RTT pings are off (as in ``bench/dht_swarm.py``): every connection would
ping every 30 s (yamux.py:151), O(N^2) in a co-located full mesh.

Bounded: ``--time-limit`` (default 440 s) caps the whole run; what is left after
setup is shared out (55 % queries, then 65 % of the rest new offers, the rest price
changes), phases stop early when their share runs out (noted on the final line),
and a SIGALRM backstop ends the process 30 s after the limit.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import resource
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import multiaddr
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.stream_muxer.yamux import yamux as yamux_module

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bootstrap.peer_book import PeerBook
from dht.discovery import Discovery, DiscoveryQuery, ProviderResult
from dht.lookup import key_of
from dht.offers import Offer, provider_key
from dht.publisher import CapabilityPublisher
from dht.record_validator import RECORD_NAMESPACE, CapabilityRecordValidator, RejectionCounter
from dht.records import Hardware, bind_wallet
from dht.seq_book import SeqBook
from dht.service import PROVIDER_QUERY_FANOUT, DhtService
from node.host import build_host
from tests.support.swarm import NodeSpec, SwarmNode, open_swarm

GWEI = 10**9
CAPABILITIES = ("model:gemma3-270m-q4_k_m", "model:qwen2.5-7b-instruct-q4_k_m", "embedding:all-minilm-l6-v2")
BOOTSTRAP_COUNT = 2
POLL_GAP_S = 0.02
# Seconds kept at the end of --time-limit for unwinding the swarm.
SHUTDOWN_RESERVE_S = 20.0
LOOPBACK_LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def progress(text: str) -> None:
    print(f"[discovery {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def quiet_logging() -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.getLogger().setLevel(logging.WARNING)


def disable_yamux_rtt_pings() -> None:
    if not isinstance(getattr(yamux_module, "RTT_MEASURE_INTERVAL", None), int | float):
        raise RuntimeError("py-libp2p's Yamux changed: revisit disable_yamux_rtt_pings in bench/discovery.py")
    setattr(yamux_module, "RTT_MEASURE_INTERVAL", 10.0**9)  # noqa: B010


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


def expected_providers(nodes: list[SwarmNode], capability: str) -> set[str]:
    return {node.peer_id for node in nodes if any(o.name == capability for o in node.publisher.offers)}


def report_placement(nodes: list[SwarmNode]) -> None:
    """Where each provider record sits once the swarm is up: how many of its capability key's true
    closest peers (by XOR over every node of the swarm) hold it, against how many a query asks
    (``PROVIDER_QUERY_FANOUT``). A provider none of those closest hold is missing from every query
    that settles on them; silent marks are peers some node stopped asking (``lookup_guard``)."""
    for capability in CAPABILITIES:
        key = provider_key(capability)
        target = key_of(key)
        ranked = sorted(nodes, key=lambda node: key_of(node.host.get_id().to_bytes()) ^ target)
        held: list[str] = []
        for provider in expected_providers(nodes, capability):
            holders = [
                rank
                for rank, node in enumerate(ranked)
                if any(str(info.peer_id) == provider for info in node.dht.dht.provider_store.get_providers(key))
            ]
            near = sum(rank < PROVIDER_QUERY_FANOUT for rank in holders)
            held.append(f"{provider[-6:]} {near}/{PROVIDER_QUERY_FANOUT} closest, {len(holders)} in all")
        progress(f"placement {capability}: " + "; ".join(held))
    silent = [len(node.dht.silent) for node in nodes]
    progress(f"silent marks: {sum(silent)} over {sum(1 for n in silent if n)} nodes (max {max(silent)})")


async def timed_find(node: SwarmNode, capability: str, timeout: float, figures: Figures) -> list[ProviderResult] | None:
    started = trio.current_time()
    with trio.move_on_after(timeout):
        results = await node.discovery.find(DiscoveryQuery(capability=capability, limit=50))
        figures.find_s.append(trio.current_time() - started)
        return results
    return None


async def measure_queries(
    nodes: list[SwarmNode], rng: random.Random, args: argparse.Namespace, deadline: float, figures: Figures
) -> None:
    for index in range(args.queries):
        if trio.current_time() >= deadline:
            figures.notes.append(f"queries stopped at {index} by the time limit")
            break
        node = rng.choice(nodes)
        capability = rng.choice(CAPABILITIES)
        expected = expected_providers(nodes, capability)
        started = trio.current_time()
        results = await timed_find(node, capability, args.query_timeout, figures)
        elapsed = trio.current_time() - started
        figures.query_done += 1
        if results is not None:
            figures.query_s.append(elapsed)
            returned = {result.peer_id for result in results}
            if returned == expected:
                figures.query_ok += 1
            else:
                progress(
                    f"query {index + 1}: node {nodes.index(node)} {capability}: {len(returned & expected)} of "
                    f"{len(expected)} providers, {len(returned - expected)} others, {elapsed:.3f}s; missing "
                    + ", ".join(sorted(peer[-6:] for peer in expected - returned))
                )
        else:
            progress(f"query {index + 1}: node {nodes.index(node)} {capability}: timed out")
        if (index + 1) % 25 == 0:
            progress(
                f"queries {index + 1}: p50 {fmt(percentile(figures.query_s, 0.5))} "
                f"p95 {fmt(percentile(figures.query_s, 0.95))}, {figures.query_ok}/{figures.query_done} exact"
            )


async def watch_publish(node: SwarmNode, before: float | None, started: float, out: list[float]) -> None:
    while node.publisher.published_at == before:
        await trio.sleep(0.005)
    out.append(trio.current_time() - started)


async def wait_visible(
    querier: SwarmNode,
    provider: SwarmNode,
    capability: str,
    price: int,
    args: argparse.Namespace,
    started: float,
    figures: Figures,
) -> float | None:
    """Seconds from ``started`` until ``querier`` sees ``provider`` offer ``capability`` at ``price``."""
    with trio.move_on_after(args.visible_timeout):
        while True:
            results = await timed_find(querier, capability, args.query_timeout, figures)
            for result in results or []:
                if result.peer_id == provider.peer_id and result.price_per_unit == price:
                    return trio.current_time() - started
            await trio.sleep(POLL_GAP_S)
    return None


async def measure_new_offers(
    nodes: list[SwarmNode],
    providers: list[int],
    rng: random.Random,
    args: argparse.Namespace,
    deadline: float,
    figures: Figures,
) -> None:
    """A provider starts offering a capability it did not offer; a random node waits to see it."""
    candidates = [
        (index, capability)
        for index in providers
        for capability in CAPABILITIES
        if all(o.name != capability for o in nodes[index].publisher.offers)
    ]
    rng.shuffle(candidates)
    for trial, (index, capability) in enumerate(candidates[: args.pairs]):
        if trio.current_time() >= deadline:
            figures.notes.append(f"publish trials stopped at {trial} by the time limit")
            break
        provider = nodes[index]
        querier = rng.choice([node for i, node in enumerate(nodes) if i != index])
        price = rng.randint(1, 9) * GWEI
        # Before the change, the querier must not see it (it cannot: the offer is new).
        published: list[float] = []
        before = provider.publisher.published_at
        finds_before = len(figures.find_s)
        started = trio.current_time()
        provider.publisher.set_offer(offer(capability, price))
        figures.visible_tries += 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_publish, provider, before, started, published)
            seen = await wait_visible(querier, provider, capability, price, args, started, figures)
            with trio.move_on_after(max(0.0, args.visible_timeout - (trio.current_time() - started))):
                while not published:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        polls = figures.find_s[finds_before:]
        if seen is not None:
            figures.visible_s.append(seen)
        figures.publish_s.extend(published)
        progress(
            f"new offer {trial + 1}: node {index} +{capability} -> node {nodes.index(querier)}: "
            f"visible {fmt(seen) if seen is not None else 'NOT within ' + str(args.visible_timeout) + 's'}, "
            f"publish {fmt(published[0]) if published else 'n/a'}, {len(polls)} polls "
            f"(find {fmt(sum(polls) / len(polls)) if polls else 'n/a'})"
        )


async def measure_price_changes(
    nodes: list[SwarmNode],
    providers: list[int],
    rng: random.Random,
    args: argparse.Namespace,
    deadline: float,
    figures: Figures,
) -> None:
    for trial in range(args.price_changes):
        if trio.current_time() >= deadline:
            figures.notes.append(f"price changes stopped at {trial} by the time limit")
            break
        index = rng.choice(providers)
        provider = nodes[index]
        current = rng.choice(provider.publisher.offers)
        querier = rng.choice([node for i, node in enumerate(nodes) if i != index])
        price = current.price_per_unit + rng.randint(1, 9) * GWEI
        finds_before = len(figures.find_s)
        started = trio.current_time()
        provider.publisher.set_offer(current.model_copy(update={"price_per_unit": price}))
        figures.price_tries += 1
        seen = await wait_visible(querier, provider, current.name, price, args, started, figures)
        if seen is not None:
            figures.price_s.append(seen)
        polls = figures.find_s[finds_before:]
        progress(
            f"price change {trial + 1}: node {index} {current.name} -> node {nodes.index(querier)}: "
            f"visible {fmt(seen) if seen is not None else 'NOT within ' + str(args.visible_timeout) + 's'}, "
            f"{len(polls)} polls (find {fmt(sum(polls) / len(polls)) if polls else 'n/a'})"
        )


async def run(args: argparse.Namespace) -> Figures:
    figures = Figures()
    rng = random.Random(args.seed)
    start = trio.current_time()
    deadline = start + args.time_limit - SHUTDOWN_RESERVE_S
    providers = provider_indices(args.nodes, args.providers)
    specs = {
        index: NodeSpec(
            offers=(offer(CAPABILITIES[n % len(CAPABILITIES)], (n + 1) * GWEI),),
            hardware=Hardware(cores=4, ram_mb=16384),
        )
        for n, index in enumerate(providers)
    }
    progress(f"building {args.nodes} nodes, providers at {providers}")
    with trio.move_on_after(args.time_limit - SHUTDOWN_RESERVE_S) as everything:
        async with open_swarm(args.nodes, bootstrap_count=BOOTSTRAP_COUNT, specs=specs, cache_ttl_s=0.0) as nodes:
            figures.setup_s = trio.current_time() - start
            tables = [node.dht.routing_table_size() for node in nodes]
            conns = [len(node.host.get_connected_peers()) for node in nodes]
            progress(
                f"swarm up in {figures.setup_s:.1f}s: routing table mean {sum(tables) / len(tables):.1f} "
                f"(min {min(tables)}), connections mean {sum(conns) / len(conns):.1f}"
            )
            report_placement(nodes)
            # What is left: 55 % to queries, then 65 % of the rest to new offers, the rest to
            # price changes. A phase starts no new measurement after its share, and one still
            # running at the overall deadline is cut off (and not counted).
            left = deadline - trio.current_time()
            await measure_queries(nodes, rng, args, trio.current_time() + left * 0.55, figures)
            left = deadline - trio.current_time()
            await measure_new_offers(nodes, providers, rng, args, trio.current_time() + left * 0.65, figures)
            await measure_price_changes(nodes, providers, rng, args, deadline, figures)
            progress("measurements done; unwinding the swarm")
            figures.finished = True
    if everything.cancelled_caught and not figures.finished:
        figures.notes.append("the time limit cut the run short")
    return figures


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
    parser.add_argument("--first-contact", action="store_true", help="time a fresh home node's first find and find-by")
    parser.add_argument("--home", type=int, default=4, help="--first-contact: fresh home nodes started at once")
    parser.add_argument("--private-after", type=float, default=2.0, help="--first-contact: seconds to the NAT verdict")
    args = parser.parse_args(argv)
    if args.first_contact:
        if args.nodes < max(FIRST_CONTACT_PROVIDERS) + 1 or args.home < 1:
            parser.error("--first-contact needs --nodes >= 5 and --home >= 1")
        return args
    if args.nodes < BOOTSTRAP_COUNT + args.providers or args.providers < 1:
        parser.error("need 1 <= providers <= nodes - 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logging()
    disable_yamux_rtt_pings()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Backstop: whatever hangs, the process ends half a minute after the limit.
    signal.alarm(int(args.time_limit + 30))
    wall = time.monotonic()
    if args.first_contact:
        first = trio.run(run_first_contact, args)
        signal.alarm(0)
        progress(f"done in {time.monotonic() - wall:.1f}s")
        report_first_contact(args, first)
        return 0
    figures = trio.run(run, args)
    signal.alarm(0)
    progress(f"done in {time.monotonic() - wall:.1f}s")
    success = 100.0 * figures.query_ok / figures.query_done if figures.query_done else math.nan
    notes = f" [{'; '.join(figures.notes)}]" if figures.notes else ""
    print(
        f"discovery N={args.nodes} providers={args.providers}: "
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
        f"query_p50_s={percentile(figures.query_s, 0.5):.3f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
