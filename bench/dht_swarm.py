"""DHT swarm benchmark: find_peer latency, hops and memory in one loopback swarm of N nodes.

Usage::

    python bench/dht_swarm.py [--sizes 50,200] [--lookups 200] [--processes 2]

For each size N the nodes are split over P worker processes (one ``trio.run`` each,
started with multiprocessing's ``spawn``); the coordinator (this process, no hosts)
drives them over pipes. All nodes form one swarm: the first two nodes of worker 0
are everybody's bootstrap peers. Every node is a real clawnode host
(``node.host.build_host``, Noise + Yamux) running ``dht.service.DhtService`` on
``/clawnode/kad/1.0.0``.

Phases per size: start + join (joins throttled per process), one routing-table
refresh of every node once the whole swarm exists (as ``tests/support/swarm.py``
does), then ``--lookups`` sequential ``find_peer`` calls, each from a random node
for a target in any process, one at a time across the whole swarm, so that a
latency is never inflated by another lookup.

Cold targets: py-libp2p's ``find_peer`` answers from the routing table or the
peerstore without any network traffic when it can (peer_routing.py:92-105), and
after the joins nodes of a small swarm know most of the others. A lookup
therefore takes the first target (in random order) that the searcher has never
heard of; when it knows everybody, the target is first forgotten (removed from the
routing table, its addresses cleared from the peerstore), so every measured
lookup goes over the network. ``cold=`` says which share needed no forgetting.

Hops: py-libp2p's iterative lookup runs in rounds of up to ALPHA=10 parallel
FIND_NODE queries, each round in one nursery (peer_routing.py:288). The benchmark
counts rounds by giving the ``peer_routing`` module a stand-in for its ``trio``
name whose ``open_nursery`` counts, and wraps ``PeerRouting._query_peer_for_closest``
to note the round in which a response first named the target. ``hops`` is that
round (sequential query rounds needed to learn the target's address), ``rounds``
the total number of rounds until the lookup terminated. Both patches live in the
worker processes of this benchmark only.

Memory: RSS per worker via psutil after the swarm is built and after the
lookups; ``baseline`` is a worker's RSS with every import done and no host.

The run is bounded: each lookup has a timeout (``--lookup-timeout``), the lookup
phase of a size stops at ``--budget`` seconds after the size started (the figures
then say how many lookups ran), every coordinator wait has a deadline, and workers
are stopped (then terminated, then killed) on any error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextvars
import inspect
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr
import psutil
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.kad_dht import peer_routing
from libp2p.kad_dht.peer_routing import PeerRouting
from libp2p.peer.id import ID

from bootstrap.peer_book import PeerBook
from dht.protocol_id import use_kad_protocol_id
from dht.service import DhtService, JoinReport
from node.host import build_host

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
BOOTSTRAP_COUNT = 2
MIB = 1024 * 1024
Message = dict[str, Any]


def progress(text: str) -> None:
    print(f"[dht_swarm {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def quiet_libp2p() -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    # multiaddr/trio noise, and clawnode's own INFO lines, are not figures.
    logging.getLogger().setLevel(logging.WARNING)


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system)


# --------------------------------------------------------------------------- #
# Lookup instrumentation (installed in worker processes only)
# --------------------------------------------------------------------------- #


@dataclass
class LookupStats:
    target: ID
    key: bytes
    rounds: int = 0
    queries: int = 0
    found_round: int | None = None


CURRENT_LOOKUP: contextvars.ContextVar[LookupStats | None] = contextvars.ContextVar("current_lookup", default=None)


class RoundCountingTrio:
    """Stands in for ``trio`` inside ``libp2p.kad_dht.peer_routing``.

    ``find_closest_peers_network`` opens exactly one nursery per round of its
    iterative lookup; counting ``open_nursery`` calls made while a benchmark lookup
    is current gives the rounds. Everything else is the real ``trio``.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)

    def open_nursery(self, *args: Any, **kwargs: Any) -> Any:
        stats = CURRENT_LOOKUP.get()
        if stats is not None:
            stats.rounds += 1
        return trio.open_nursery(*args, **kwargs)


def install_lookup_instrumentation() -> None:
    source = inspect.getsource(PeerRouting.find_closest_peers_network)
    if source.count("trio.open_nursery(") != 1 or not hasattr(PeerRouting, "_query_peer_for_closest"):
        raise RuntimeError("py-libp2p's PeerRouting changed: revisit the hop counting in bench/dht_swarm.py")
    setattr(peer_routing, "trio", RoundCountingTrio())  # noqa: B010 - module attribute on purpose

    original = PeerRouting._query_peer_for_closest

    async def counted_query(self: PeerRouting, peer: ID, target_key: bytes) -> list[ID]:
        stats = CURRENT_LOOKUP.get()
        result = await original(self, peer, target_key)
        if stats is not None and stats.key == target_key:
            stats.queries += 1
            if stats.found_round is None and stats.target in result:
                stats.found_round = stats.rounds
        return result

    setattr(PeerRouting, "_query_peer_for_closest", counted_query)  # noqa: B010


# --------------------------------------------------------------------------- #
# Worker process: N/P hosts in one trio.run, driven over a pipe
# --------------------------------------------------------------------------- #


class BenchDht(DhtService):
    """DhtService whose joins are throttled per process and observable."""

    def __init__(self, *args: Any, join_limiter: trio.CapacityLimiter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.join_limiter = join_limiter
        self.joined = trio.Event()

    async def join(self) -> JoinReport:
        async with self.join_limiter:
            report = await super().join()
        self.joined.set()
        return report


@dataclass
class WorkerNode:
    host: IHost
    dht: BenchDht

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id())

    def listen_addrs(self) -> list[str]:
        return [str(addr).split("/p2p/")[0] for addr in self.host.get_addrs()]


@dataclass
class WorkerState:
    index: int
    scratch: Path
    stack: AsyncExitStack
    join_limiter: trio.CapacityLimiter
    nodes: list[WorkerNode] = field(default_factory=list)


def _has_addrs(host: IHost, peer_id: ID) -> bool:
    try:
        return bool(host.get_peerstore().addrs(peer_id))
    except Exception:  # noqa: BLE001 - PeerStoreError: unknown or expired
        return False


async def _start_nodes(state: WorkerState, count: int, bootstrap: list[str], join_timeout: float) -> Message:
    started = time.perf_counter()
    new_nodes: list[WorkerNode] = []
    for _ in range(count):
        host = build_host(generate_new_ed25519_identity())
        await state.stack.enter_async_context(host.run(LOOPBACK))
        nursery = await state.stack.enter_async_context(trio.open_nursery())
        state.stack.callback(nursery.cancel_scope.cancel)
        dht = BenchDht(
            host,
            bootstrap_addrs=bootstrap,
            peer_book=PeerBook(state.scratch / f"peers-{state.index}-{len(state.nodes)}.json"),
            refresh_interval_s=3600.0,
            join_limiter=state.join_limiter,
        )
        await nursery.start(dht.run)
        node = WorkerNode(host, dht)
        state.nodes.append(node)
        new_nodes.append(node)
    joined = 0
    with trio.move_on_after(join_timeout):
        for node in new_nodes:
            await node.dht.joined.wait()
            joined += 1
    return {
        "nodes": [{"peer_id": n.peer_id, "addrs": n.listen_addrs()} for n in new_nodes],
        "joined": joined,
        "seconds": time.perf_counter() - started,
        "rss": rss_bytes(),
        "cpu": cpu_seconds(),
    }


def _table_stats(state: WorkerState) -> Message:
    tables = [node.dht.routing_table_size() for node in state.nodes]
    known = [len(node.host.get_peerstore().peers_with_addrs()) for node in state.nodes]
    conns = [len(node.host.get_connected_peers()) for node in state.nodes]
    return {
        "tables": tables,
        "known": known,
        "conns": conns,
        "rss": rss_bytes(),
        "fds": psutil.Process().num_fds(),
        "cpu": cpu_seconds(),
    }


async def _refresh_all(state: WorkerState, concurrency: int, timeout: float) -> Message:
    started = time.perf_counter()
    limiter = trio.CapacityLimiter(concurrency)
    done = 0

    async def refresh(node: WorkerNode) -> None:
        nonlocal done
        async with limiter:
            await node.dht.refresh()
        done += 1

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for node in state.nodes:
                nursery.start_soon(refresh, node)
    return {"refreshed": done, "seconds": time.perf_counter() - started, **_table_stats(state)}


async def _lookup(state: WorkerState, searcher: int, candidates: list[str], timeout: float) -> Message:
    node = state.nodes[searcher]
    kad = node.dht.dht
    targets = [ID.from_base58(text) for text in candidates]
    target = next(
        (p for p in targets if not kad.routing_table.peer_in_table(p) and not _has_addrs(node.host, p)),
        None,
    )
    cold = target is not None
    if target is None:
        target = targets[0]
        kad.routing_table.remove_peer(target)
        node.host.get_peerstore().clear_addrs(target)
        if kad.routing_table.peer_in_table(target) or _has_addrs(node.host, target):
            raise RuntimeError("could not make the searcher forget its target")
    stats = LookupStats(target=target, key=target.to_bytes())
    token = CURRENT_LOOKUP.set(stats)
    addrs: list[str] = []
    error: str | None = None
    started = time.perf_counter()
    try:
        with trio.move_on_after(timeout) as scope:
            try:
                info = await kad.find_peer(target)
            except Exception as failure:  # noqa: BLE001 - reported, not fatal
                error = f"{type(failure).__name__}: {failure}"
                info = None
            if info is not None:
                addrs = [str(addr).split("/p2p/")[0] for addr in info.addrs]
    finally:
        CURRENT_LOOKUP.reset(token)
    return {
        "target": str(target),
        "cold": cold,
        "seconds": time.perf_counter() - started,
        "timed_out": scope.cancelled_caught,
        "rounds": stats.rounds,
        "queries": stats.queries,
        "found_round": stats.found_round,
        "addrs": addrs,
        "error": error,
    }


async def _serve(conn: multiprocessing.connection.Connection, index: int, join_concurrency: int) -> None:
    use_kad_protocol_id()
    install_lookup_instrumentation()
    conn.send({"op": "ready", "rss": rss_bytes()})
    stopping = 0.0
    # On "stop" this scope gets a deadline: closing the hosts (LIFO: each DHT's
    # nursery, then its host) must not hang the run.
    with trio.CancelScope() as session, tempfile.TemporaryDirectory(prefix=f"clawnode-bench-{index}-") as scratch:
        async with AsyncExitStack() as stack:
            state = WorkerState(index, Path(scratch), stack, trio.CapacityLimiter(join_concurrency))
            while True:
                try:
                    # Small pickled dicts: once readable, the whole message is there.
                    await trio.lowlevel.wait_readable(conn.fileno())
                    message: Message = conn.recv()
                except EOFError:  # the coordinator is gone
                    message = {"op": "stop"}
                op = message["op"]
                if op == "stop":
                    stopping = time.perf_counter()
                    session.deadline = trio.current_time() + 30.0
                    break
                if op == "start":
                    reply = await _start_nodes(state, message["count"], message["bootstrap"], message["join_timeout"])
                elif op == "refresh":
                    reply = await _refresh_all(state, message["concurrency"], message["timeout"])
                elif op == "lookup":
                    reply = await _lookup(state, message["searcher"], message["candidates"], message["timeout"])
                elif op == "stats":
                    reply = _table_stats(state)
                else:
                    raise ValueError(f"unknown op {op!r}")
                conn.send({"op": op, **reply})
    try:
        conn.send({"op": "stopped", "seconds": time.perf_counter() - stopping, "forced": session.cancelled_caught})
    except (OSError, ValueError):  # the coordinator is gone
        pass


def worker_main(conn: multiprocessing.connection.Connection, index: int, join_concurrency: int) -> None:
    # The coordinator owns shutdown: Ctrl-C reaches the whole process group, and a
    # worker interrupted in the middle of a phase would only leave the others waiting.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_libp2p()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        trio.run(_serve, conn, index, join_concurrency)
    except BaseException:  # noqa: BLE001 - reported to the coordinator
        try:
            conn.send({"op": "error", "error": traceback.format_exc()})
        except Exception:  # noqa: BLE001 - the coordinator is gone
            pass
    finally:
        conn.close()


# --------------------------------------------------------------------------- #
# Coordinator
# --------------------------------------------------------------------------- #


class WorkerError(RuntimeError):
    pass


class Worker:
    def __init__(self, context: Any, index: int, join_concurrency: int) -> None:
        self.index = index
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=worker_main, args=(child, index, join_concurrency), name=f"dht-swarm-{index}", daemon=True
        )
        self.process.start()
        child.close()

    def send(self, message: Message) -> None:
        self.conn.send(message)

    def recv(self, deadline: float) -> Message:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerError(f"worker {self.index} did not answer in time")
            if self.conn.poll(min(remaining, 0.5)):
                try:
                    message: Message = self.conn.recv()
                except EOFError as error:
                    raise WorkerError(f"worker {self.index} exited (code {self.process.exitcode})") from error
                if message.get("op") == "error":
                    raise WorkerError(f"worker {self.index} failed:\n{message['error']}")
                return message
            if not self.process.is_alive():
                raise WorkerError(f"worker {self.index} exited (code {self.process.exitcode})")

    def ask(self, message: Message, timeout: float) -> Message:
        self.send(message)
        return self.recv(time.monotonic() + timeout)


def ask_all(workers: Sequence[Worker], messages: Sequence[Message], timeout: float) -> list[Message]:
    for worker, message in zip(workers, messages, strict=True):
        worker.send(message)
    deadline = time.monotonic() + timeout
    return [worker.recv(deadline) for worker in workers]


def stop_workers(workers: Sequence[Worker], timeout: float = 40.0) -> float:
    """Ask every worker to stop, then terminate, then kill what is left. Returns seconds taken."""
    started = time.monotonic()
    for worker in workers:
        if worker.process.is_alive():
            try:
                worker.send({"op": "stop"})
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            while worker.process.is_alive() and time.monotonic() < deadline:
                if worker.conn.poll(0.2):
                    if worker.conn.recv().get("op") in {"stopped", "error"}:
                        break
        except (EOFError, OSError):
            pass
        worker.process.join(max(0.0, min(5.0, deadline - time.monotonic())))
    for worker in workers:
        if worker.process.is_alive():
            progress(f"worker {worker.index} did not stop: terminating it")
            worker.process.terminate()
            worker.process.join(5.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(5.0)
        worker.conn.close()
    return time.monotonic() - started


def split(size: int, processes: int) -> list[int]:
    base, extra = divmod(size, processes)
    counts = [base + (1 if index < extra else 0) for index in range(processes)]
    if counts[0] < BOOTSTRAP_COUNT:
        raise SystemExit(f"N={size} over {processes} processes leaves worker 0 fewer than {BOOTSTRAP_COUNT} nodes")
    return counts


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def cpu_list(replies: Sequence[Message]) -> list[float]:
    return [round(reply["cpu"], 1) for reply in replies]


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize_tables(replies: Sequence[Message], key: str) -> str:
    values = [value for reply in replies for value in reply[key]]
    return f"{min(values)}/{mean(values):.0f}/{max(values)}"


@dataclass
class SizeResult:
    size: int
    counts: list[int]
    lookups: int
    p50: float
    p95: float
    hops: float
    rounds: float
    queries: float
    success: float
    timeouts: int
    cold: float
    rss_per_node: float
    baseline: float
    marginal: float
    note: str

    def figures(self) -> str:
        split_text = "+".join(str(count) for count in self.counts)
        text = (
            f"N={self.size}: p50={self.p50:.3f}s p95={self.p95:.3f}s hops={self.hops:.2f} rounds={self.rounds:.2f} "
            f"(log2N={math.log2(self.size):.2f}) success={self.success:.1f}% rss/node={self.rss_per_node:.1f}MiB "
            f"(baseline={self.baseline:.0f}MiB/process, +{self.marginal:.2f}MiB/node) "
            f"lookups={self.lookups} cold={self.cold:.0f}% queries/lookup={self.queries:.1f} split={split_text}"
        )
        if self.timeouts:
            text += f" timeouts={self.timeouts}"
        if self.note:
            text += f" [{self.note}]"
        return text


@dataclass
class Options:
    lookups: int
    processes: int
    lookup_timeout: float
    budget: float
    join_concurrency: int
    refresh_concurrency: int
    seed: int


def run_size(size: int, options: Options) -> SizeResult:
    size_started = time.monotonic()
    counts = split(size, options.processes)
    rng = random.Random(options.seed + size)
    context = multiprocessing.get_context("spawn")
    progress(f"N={size}: starting {len(counts)} worker processes ({'+'.join(map(str, counts))} nodes)")
    workers: list[Worker] = []
    try:
        workers = [Worker(context, index, options.join_concurrency) for index in range(len(counts))]
        ready = [worker.recv(time.monotonic() + 120.0) for worker in workers]
        baseline = mean([reply["rss"] for reply in ready]) / MIB

        first = workers[0].ask({"op": "start", "count": BOOTSTRAP_COUNT, "bootstrap": [], "join_timeout": 30.0}, 60.0)
        bootstrap = [f"{node['addrs'][0]}/p2p/{node['peer_id']}" for node in first["nodes"]]
        # Each node joins through both bootstrap nodes, each waits for the join of at
        # most join_concurrency nodes of its process at a time.
        join_timeout = 60.0 + size * 1.5
        started = ask_all(
            workers,
            [
                {
                    "op": "start",
                    "count": count - (BOOTSTRAP_COUNT if index == 0 else 0),
                    "bootstrap": bootstrap,
                    "join_timeout": join_timeout,
                }
                for index, count in enumerate(counts)
            ],
            join_timeout + 60.0,
        )
        directory: list[tuple[int, int, str, set[str]]] = []  # (worker, local index, peer id, listen addrs)
        for index, reply in enumerate(started):
            nodes = (first["nodes"] if index == 0 else []) + reply["nodes"]
            directory.extend((index, local, node["peer_id"], set(node["addrs"])) for local, node in enumerate(nodes))
        joined = sum(reply["joined"] for reply in started) + first["joined"]
        progress(
            f"N={size}: {len(directory)} nodes started, {joined} joined in "
            f"{max(reply['seconds'] for reply in started):.1f}s (CPU s per process {cpu_list(started)})"
        )

        refresh_timeout = 60.0 + size * 1.0
        refreshed = ask_all(
            workers,
            [{"op": "refresh", "concurrency": options.refresh_concurrency, "timeout": refresh_timeout}] * len(workers),
            refresh_timeout + 60.0,
        )
        progress(
            f"N={size}: refreshed {sum(r['refreshed'] for r in refreshed)} nodes in "
            f"{max(r['seconds'] for r in refreshed):.1f}s; routing table min/mean/max "
            f"{summarize_tables(refreshed, 'tables')}, peers with addrs {summarize_tables(refreshed, 'known')}, "
            f"connections {summarize_tables(refreshed, 'conns')}, fds {[r['fds'] for r in refreshed]}, "
            f"CPU s per process {cpu_list(refreshed)}"
        )
        idle_seconds = 5.0
        time.sleep(idle_seconds)
        idle = ask_all(workers, [{"op": "stats"}] * len(workers), 60.0)
        idle_load = [
            f"{100 * (after['cpu'] - before['cpu']) / idle_seconds:.0f}%"
            for before, after in zip(refreshed, idle, strict=True)
        ]
        progress(f"N={size}: idle CPU per process over {idle_seconds:.0f}s: {idle_load}")
        built_rss = [reply["rss"] for reply in refreshed]

        results: list[Message] = []
        note = ""
        lookup_deadline = size_started + options.budget
        lookups_started = time.monotonic()
        for number in range(options.lookups):
            if time.monotonic() + options.lookup_timeout + 5.0 > lookup_deadline:
                note = f"budget {options.budget:.0f}s reached after {number} of {options.lookups} lookups"
                progress(f"N={size}: {note}")
                break
            searcher = rng.randrange(len(directory))
            worker_index, local, searcher_id, _ = directory[searcher]
            candidates = [entry[2] for entry in directory if entry[2] != searcher_id]
            rng.shuffle(candidates)
            reply = workers[worker_index].ask(
                {"op": "lookup", "searcher": local, "candidates": candidates, "timeout": options.lookup_timeout},
                options.lookup_timeout + 30.0,
            )
            target_entry = next(entry for entry in directory if entry[2] == reply["target"])
            reply["success"] = bool(set(reply["addrs"]) & target_entry[3])
            reply["cross_process"] = target_entry[0] != worker_index
            results.append(reply)
            if (number + 1) % 25 == 0:
                recent = results[-25:]
                recent_p50 = percentile([r["seconds"] for r in recent], 0.5)
                progress(
                    f"N={size}: {number + 1} lookups, last 25: p50={recent_p50:.3f}s "
                    f"success={100 * mean([r['success'] for r in recent]):.0f}% "
                    f"rounds={mean([r['rounds'] for r in recent]):.1f}"
                )
        lookup_seconds = time.monotonic() - lookups_started
        final = ask_all(workers, [{"op": "stats"}] * len(workers), 60.0)
        final_rss = [reply["rss"] for reply in final]
        total_rss = max(sum(built_rss), sum(final_rss))
    finally:
        if workers:
            stopped_in = stop_workers(workers)
            progress(f"N={size}: workers stopped in {stopped_in:.1f}s")

    if not results:
        raise SystemExit(f"N={size}: no lookup ran")
    latencies = [r["seconds"] for r in results]
    found = [r["found_round"] for r in results if r["found_round"] is not None]
    errors = [r["error"] for r in results if r["error"]]
    progress(
        f"N={size}: {len(results)} lookups in {lookup_seconds:.1f}s; target named in a response in "
        f"{len(found)}/{len(results)}; cross-process targets {sum(r['cross_process'] for r in results)}; "
        f"errors {len(errors)}{': ' + errors[0] if errors else ''}; RSS per process after build "
        f"{[round(v / MIB) for v in built_rss]} MiB, after lookups {[round(v / MIB) for v in final_rss]} MiB; "
        f"size took {time.monotonic() - size_started:.0f}s"
    )
    return SizeResult(
        size=size,
        counts=counts,
        lookups=len(results),
        p50=percentile(latencies, 0.5),
        p95=percentile(latencies, 0.95),
        hops=mean(found),
        rounds=mean([r["rounds"] for r in results]),
        queries=mean([r["queries"] for r in results]),
        success=100.0 * mean([r["success"] for r in results]),
        timeouts=sum(r["timed_out"] for r in results),
        cold=100.0 * mean([r["cold"] for r in results]),
        rss_per_node=total_rss / size / MIB,
        baseline=baseline,
        marginal=(total_rss / MIB - baseline * len(counts)) / size,
        note=note,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="50,200", help="comma-separated swarm sizes (default 50,200)")
    parser.add_argument("--lookups", type=int, default=200, help="find_peer lookups per size (default 200)")
    parser.add_argument(
        "--processes", type=int, default=None, help="worker processes per size (default: CPU cores, at least 1)"
    )
    parser.add_argument("--lookup-timeout", type=float, default=10.0, help="seconds per lookup (default 10)")
    parser.add_argument(
        "--budget", type=float, default=200.0, help="seconds per size after which no new lookup starts (default 200)"
    )
    parser.add_argument("--join-concurrency", type=int, default=4, help="concurrent joins per process (default 4)")
    parser.add_argument(
        "--refresh-concurrency", type=int, default=4, help="concurrent refreshes per process (default 4)"
    )
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libp2p()
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    sizes = [int(text) for text in args.sizes.split(",") if text.strip()]
    options = Options(
        lookups=args.lookups,
        processes=args.processes or max(1, len(os.sched_getaffinity(0))),
        lookup_timeout=args.lookup_timeout,
        budget=args.budget,
        join_concurrency=args.join_concurrency,
        refresh_concurrency=args.refresh_concurrency,
        seed=args.seed,
    )
    started = time.monotonic()
    figures: list[str] = []
    try:
        for size in sizes:
            figures.append(run_size(size, options).figures())
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    except WorkerError as error:
        progress(f"failed: {error}")
        return 1
    progress(f"total {time.monotonic() - started:.0f}s")
    print("dht_swarm " + " | ".join(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
