"""DHT swarm benchmark: find_peer latency, hops and memory in one loopback swarm of N nodes.

Usage::

    python bench/dht_swarm.py [--sizes 50,200] [--lookups 200] [--processes P]

One swarm is grown through the sizes in increasing order (50 nodes, measured,
then 150 more, measured again): a fresh 200-node swarm would repeat the same 50
sequential joins first. Nodes live in worker processes, one ``trio.run`` each,
started with multiprocessing's ``spawn`` and driven over pipes by this process,
which runs no host. The first two nodes of worker 0 are every node's bootstrap
peers. Every node is a real clawnode host (``node.host.build_host``, Noise +
Yamux) running ``dht.service.DhtService`` on ``/clawnode/kad/1.0.0``; joins run
one at a time per process (``--join-concurrency``: more at once was slower on 2
cores).

Processes: one per core, and more where file descriptors demand it. The DHT keeps
a connection to every peer it ever queried (``max_connections`` 300), so the
swarm tends to a full mesh, a descriptor at each end of each connection: a
process with n of N nodes needs up to n * (N - 1). With a hard RLIMIT_NOFILE of
20000, N=200 needs 3 processes (67+67+66); N=50 gets 2 (25+25).

Per size: grow and join, report routing tables, connections and idle CPU, then up
to ``--lookups`` ``find_peer`` calls, one at a time across the whole swarm so that
no lookup inflates another's latency, each from a random node, with
``--lookup-timeout``, until ``--budget`` seconds of lookups have passed.

Cold targets: py-libp2p's ``find_peer`` answers from the routing table or the
peerstore without any network traffic when it can (peer_routing.py:92-105). A
lookup therefore takes the first target (in random order) that the searcher has
never heard of; when it knows everybody, the target is first forgotten (removed
from the routing table, its addresses cleared from the peerstore), so every
measured lookup goes over the network. ``cold=`` is the share that needed no
forgetting. ``success`` means the returned addresses include one the target
really listens on.

Hops: the node's own lookup (``dht/lookup.py``: alpha = 3 queries in flight, a slow one
stops holding its slot 0.5 s after it connects, ends once the 3 closest peers known have answered, or as soon as
an answer names the target) fills a ``dht.lookup.LookupStats`` set for the lookup: a peer named by a
peer at hop h is at hop h + 1 (the searcher's own table is hop 0). ``hops`` is the hop at which an
answer first named the target, ``rounds`` the deepest hop the lookup reached, ``queries`` the
FIND_NODE queries it sent. With the connection budget no node is connected to most others, so these
are the hops of the routing itself.

Yamux RTT pings are off by default (``--yamux-rtt`` keeps them): every Yamux
connection pings every 30 s (yamux.py:151, :703-726), ~0.07 ms of CPU per
connection per second here. A real node pays that for its own connections only;
200 co-located nodes of a full mesh would pay ~1.4 cores for 19,900 connections
and measure their own contention instead of the DHT.

The one patch (the RTT interval) is made in the worker processes of this benchmark only, never
in the package.

Memory: RSS of each worker via psutil; ``baseline`` is a worker's RSS with every
import done and no host; ``rss/node`` is the workers' total RSS over N, the
``+x/node`` after it the same without the baselines.

Bounded: ``--time-limit`` (default 540 s) caps the whole run (joins still running
at their deadline go on in the background, noted as ``joined=``; lookups stop
early, noted in brackets), every wait on a worker has a deadline, and the workers
are stopped -- then terminated, then killed -- on any end: success, error,
Ctrl-C (workers ignore SIGINT and leave shutdown to this process) or SIGTERM.
Asked to stop, a worker answers and leaves with ``os._exit(0)`` (see
``_exit_now``): closing or even unwinding a few dozen fully meshed py-libp2p hosts
takes tens of seconds.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import multiaddr
import psutil
import trio
from libp2p import generate_new_ed25519_identity
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux import yamux as yamux_module

from bootstrap.peer_book import PeerBook
from dht.lookup import CURRENT_STATS, LookupStats, key_of
from dht.protocol_id import use_kad_protocol_id
from dht.service import DhtService, JoinReport
from node.conn_budget import budget_of, keep_in_routing_table
from node.host import build_host

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
BOOTSTRAP_COUNT = 2
# Share of the hard RLIMIT_NOFILE a worker may expect to fill with connections.
FD_SHARE = 0.8
# Seconds kept at the end of --time-limit for stopping the workers.
SHUTDOWN_RESERVE_S = 45.0
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


def disable_yamux_rtt_pings() -> None:
    """Stop py-libp2p's Yamux from pinging every connection every 30 s.

    Each Yamux connection runs an RTT loop (yamux.py:703-726, started at :756) that
    pings every RTT_MEASURE_INTERVAL = 30 s (yamux.py:151); the DHT keeps a
    connection to every peer it ever queried, so a swarm ends up fully meshed and
    the pings cost O(N^2): ~0.07 ms of CPU per connection per second here, ~6 % of
    a core at N=40 and ~1.4 cores at N=200 -- on a real network each node would pay
    only for its own ~N connections. With the interval raised, each connection
    still pings once, 0.5 s after it opens.
    """
    if not isinstance(getattr(yamux_module, "RTT_MEASURE_INTERVAL", None), int | float):
        raise RuntimeError("py-libp2p's Yamux changed: revisit disable_yamux_rtt_pings in bench/dht_swarm.py")
    setattr(yamux_module, "RTT_MEASURE_INTERVAL", 10.0**9)  # noqa: B010


# --------------------------------------------------------------------------- #
# Worker process: N/P hosts in one trio.run, driven over a pipe
# --------------------------------------------------------------------------- #


class BenchDht(DhtService):
    """DhtService whose joins are throttled per process and observable."""

    def __init__(self, *args: Any, join_limiter: trio.CapacityLimiter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.join_limiter = join_limiter
        self.bench_joined = trio.Event()

    async def join(self) -> JoinReport:
        async with self.join_limiter:
            report = await super().join()
        self.bench_joined.set()
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
    conn_budget: int | None
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
        host = build_host(generate_new_ed25519_identity(), connection_budget=state.conn_budget)
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
        keep_in_routing_table(host, dht)  # as the daemon does: a no-op without a budget
        await nursery.start(dht.run)
        node = WorkerNode(host, dht)
        state.nodes.append(node)
        new_nodes.append(node)
    joined = 0
    with trio.move_on_after(join_timeout):
        for node in new_nodes:
            await node.dht.bench_joined.wait()
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
        "joined_peers": [node.peer_id for node in state.nodes if node.dht.bench_joined.is_set()],
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


def _inspect(state: WorkerState, peers: list[str], target: str) -> Message:
    """What the local nodes among ``peers`` know of ``target`` (``--trace``)."""
    target_id = ID.from_base58(target)
    found: dict[str, str] = {}
    # Every local node that holds the target in its routing table: is the target missing from the
    # tables of the peers closest to it, or did the walk not reach them?
    holders = [node.peer_id for node in state.nodes if node.dht.dht.routing_table.peer_in_table(target_id)]
    for node in state.nodes:
        if node.peer_id not in peers and node.peer_id != target:
            continue
        kad = node.dht.dht
        try:
            ttl = node.host.get_peerstore().peer_data_map[target_id]  # type: ignore[attr-defined]
            left = f"{ttl.last_identified + ttl.ttl - time.time():.0f}s" if ttl.ttl else "forever"
        except KeyError:
            left = "-"
        budget = budget_of(node.host)
        network: Any = node.host.get_network()
        streams = sum(len(conn.get_streams()) for conn in network.get_connections())
        slots = getattr(network, "_stream_semaphore", None)
        found[node.peer_id] = (
            f"table={kad.routing_table.size()} conns={len(node.host.get_connected_peers())} "
            f"has-target-in-table={kad.routing_table.peer_in_table(target_id)} "
            f"target-addrs={_has_addrs(node.host, target_id)} ttl-left={left} "
            f"connected-to-target={target_id in node.host.get_connected_peers()} "
            f"budget-closed={budget.closed if budget else '-'} streams={streams} "
            f"stream-slots-free={slots.value if slots is not None else '-'} "
            f"kad-inbound-busy={kad._inbound_limiter.borrowed_tokens}"
        )
    return {"found": found, "holders": holders}


async def _lookup(
    state: WorkerState, searcher: int, candidates: list[str], timeout: float, trace: bool = False
) -> Message:
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
    stats = LookupStats()
    if trace:
        stats.trace = []  # set only when asked: a LookupStats from before --trace has no such field
    budget = budget_of(node.host)
    closed_before = budget.closed if budget else 0
    token = CURRENT_STATS.set(stats)
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
        CURRENT_STATS.reset(token)
    return {
        "target": str(target),
        "cold": cold,
        "seconds": time.perf_counter() - started,
        "timed_out": scope.cancelled_caught,
        "rounds": stats.max_hop,
        "queries": stats.queries,
        "found_round": stats.target_hop,
        "addrs": addrs,
        "error": error,
        "trace": getattr(stats, "trace", None),
        "budget_closed": (budget.closed if budget else 0) - closed_before,
        "conns": len(node.host.get_connected_peers()),
    }


@dataclass(frozen=True)
class WorkerConfig:
    join_concurrency: int
    yamux_rtt: bool
    conn_budget: int


async def _serve(conn: multiprocessing.connection.Connection, index: int, config: WorkerConfig) -> None:
    use_kad_protocol_id()
    if not config.yamux_rtt:
        disable_yamux_rtt_pings()
    conn.send({"op": "ready", "rss": rss_bytes()})
    with tempfile.TemporaryDirectory(prefix=f"clawnode-bench-{index}-") as scratch:
        async with AsyncExitStack() as stack:
            state = WorkerState(
                index,
                Path(scratch),
                stack,
                trio.CapacityLimiter(config.join_concurrency),
                config.conn_budget or None,
            )
            while True:
                try:
                    # Small pickled dicts: once readable, the whole message is there.
                    await trio.lowlevel.wait_readable(conn.fileno())
                    message: Message = conn.recv()
                except EOFError:  # the coordinator is gone
                    message = {"op": "stop"}
                op = message["op"]
                if op == "stop":
                    _exit_now(conn, scratch)
                if op == "start":
                    reply = await _start_nodes(state, message["count"], message["bootstrap"], message["join_timeout"])
                elif op == "refresh":
                    reply = await _refresh_all(state, message["concurrency"], message["timeout"])
                elif op == "lookup":
                    reply = await _lookup(
                        state,
                        message["searcher"],
                        message["candidates"],
                        message["timeout"],
                        message.get("trace", False),
                    )
                elif op == "inspect":
                    reply = _inspect(state, message["peers"], message["target"])
                elif op == "stats":
                    reply = _table_stats(state)
                else:
                    raise ValueError(f"unknown op {op!r}")
                conn.send({"op": op, **reply})


def _exit_now(conn: multiprocessing.connection.Connection, scratch: str) -> NoReturn:
    """End the worker without unwinding its hosts; the kernel closes their sockets.

    Nothing a benchmark node holds needs saving, and neither way of closing
    py-libp2p hosts is quick at this scale: Swarm.close() closes a host's
    connections one after another with two 0.1 s sleeps each (network/swarm.py:2303,
    yamux.py:823, swarm_connection.py:218) -- 40 s for a node of a full 200-node
    mesh -- and unwinding them under cancellation took 20-30 s of CPU per worker at
    N=200, ~1 ms per cancelled socket read in trio's error translation
    (trio/_highlevel_socket.py:43).
    """
    try:
        conn.send({"op": "stopped"})
        conn.close()
    except (OSError, ValueError):  # the coordinator is gone
        pass
    shutil.rmtree(scratch, ignore_errors=True)
    os._exit(0)


def _innermost(error: BaseException) -> str:
    """The traceback of the first leaf of ``error``: a host's nested nurseries wrap one failure
    in a dozen exception groups, past what a formatted traceback shows."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return "".join(traceback.format_exception(error))


def worker_main(conn: multiprocessing.connection.Connection, index: int, config: WorkerConfig) -> None:
    # The coordinator owns shutdown: Ctrl-C reaches the whole process group, and a
    # worker interrupted in the middle of a phase would only leave the others waiting.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_libp2p()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        trio.run(_serve, conn, index, config)
    except BaseException as error:  # noqa: BLE001 - reported to the coordinator
        try:
            conn.send({"op": "error", "error": _innermost(error)})
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
    def __init__(self, context: Any, index: int, config: WorkerConfig) -> None:
        self.index = index
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=worker_main, args=(child, index, config), name=f"dht-swarm-{index}", daemon=True
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
                    self.process.join(1.0)
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
    report: list[str] = []
    for worker in workers:
        answer = "?"
        try:
            # A worker that already left may still have its answer in the pipe.
            while time.monotonic() < deadline:
                if not worker.conn.poll(0.2):
                    if worker.process.is_alive():
                        continue
                    break
                message = worker.conn.recv()
                if message.get("op") == "stopped":
                    answer = "ok"
                    break
                if message.get("op") == "error":
                    answer = "with an error: " + message["error"].strip().splitlines()[-1]
                    break
        except (EOFError, OSError):
            pass
        worker.process.join(max(0.0, min(10.0, deadline - time.monotonic())))
        report.append(f"{worker.index}: stop {answer}, exited at {time.monotonic() - started:.1f}s")
    for worker in workers:
        if worker.process.is_alive():
            progress(f"worker {worker.index} did not stop: terminating it")
            worker.process.terminate()
            worker.process.join(5.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(5.0)
        worker.conn.close()
    progress("workers " + "; ".join(report))
    return time.monotonic() - started


def processes_for(size: int, cores: int, fd_limit: int, conn_budget: int = 0) -> int:
    """Worker processes for a swarm of ``size``: one per core, more where file descriptors demand it.

    Without a connection budget a swarm of py-libp2p DHT nodes ends up fully meshed
    (every queried peer keeps its connection, up to ``max_connections`` = 300), and
    every connection costs a file descriptor at each end: a process with n nodes
    needs about n * (size - 1). With one, a node holds about the budget (twice it
    counted, for connections that open together before the trim).
    """
    per_node = size - 1 if conn_budget <= 0 else min(size - 1, 2 * conn_budget)
    need = math.ceil(size * per_node / (FD_SHARE * fd_limit))
    return max(1, cores, need)


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
    return f"{min(values)}/{mean(values):.0f}/{max(values)}" if values else "-"


@dataclass
class SizeResult:
    size: int
    counts: list[int]
    joined: int
    build_seconds: float
    lookups: int
    p50: float
    p95: float
    hops: float
    hops_p50: float
    hops_p90: float
    rounds: float
    queries: float
    success: float
    timeouts: int
    cold: float
    rss_per_node: float
    baseline: float
    marginal: float
    table_mean: float
    conns_mean: float
    conns_after: float
    conns_after_max: int
    conn_budget: int
    note: str

    def figures(self) -> str:
        split_text = "+".join(str(count) for count in self.counts)
        text = (
            f"N={self.size}: p50={self.p50:.3f}s p95={self.p95:.3f}s hops={self.hops:.2f} rounds={self.rounds:.2f} "
            f"(log2N={math.log2(self.size):.2f}) success={self.success:.1f}% rss/node={self.rss_per_node:.1f}MiB "
            f"(baseline={self.baseline:.0f}MiB/process, +{self.marginal:.2f}MiB/node) "
            f"lookups={self.lookups} cold={self.cold:.0f}% queries/lookup={self.queries:.1f} "
            f"hops p50/p90={self.hops_p50:g}/{self.hops_p90:g} "
            f"routing-table={self.table_mean:.0f} conns={self.conns_mean:.0f} "
            f"conns-after-lookups={self.conns_after:.1f} (max {self.conns_after_max}, "
            f"budget {self.conn_budget or 'none'}) "
            f"processes={len(self.counts)} ({split_text}) build={self.build_seconds:.0f}s"
        )
        if self.joined < self.size:
            text += f" joined={self.joined}/{self.size}"
        if self.timeouts:
            text += f" timeouts={self.timeouts}"
        if self.note:
            text += f" [{self.note}]"
        return text


@dataclass
class Options:
    lookups: int
    processes: int | None
    cores: int
    fd_limit: int
    lookup_timeout: float
    budget: float
    join_concurrency: int
    refresh: bool
    refresh_concurrency: int
    yamux_rtt: bool
    time_limit: float
    seed: int
    conn_budget: int
    trace: bool = False


@dataclass
class Entry:
    worker: int
    local: int
    peer_id: str
    addrs: set[str]


class SwarmRun:
    """One swarm, grown from size to size; nodes are never removed between sizes."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[Worker] = []
        self.counts: list[int] = []
        self.joined: list[int] = []
        self.baselines: list[float] = []
        self.directory: list[Entry] = []
        self.by_peer: dict[str, Entry] = {}
        self.bootstrap: list[str] = []
        self.joined_peers: set[str] = set()
        self.rng = random.Random(options.seed)
        self.deadline = time.monotonic() + options.time_limit - SHUTDOWN_RESERVE_S

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def _add_workers(self, total: int) -> None:
        config = WorkerConfig(self.options.join_concurrency, self.options.yamux_rtt, self.options.conn_budget)
        new = [Worker(self.context, index, config) for index in range(len(self.workers), total)]
        ready = [worker.recv(time.monotonic() + 120.0) for worker in new]
        self.workers.extend(new)
        self.counts.extend(0 for _ in new)
        self.joined.extend(0 for _ in new)
        self.baselines.extend(reply["rss"] / MIB for reply in ready)

    def _record(self, worker: int, reply: Message) -> None:
        for node in reply["nodes"]:
            entry = Entry(worker, self.counts[worker], node["peer_id"], set(node["addrs"]))
            self.directory.append(entry)
            self.by_peer[entry.peer_id] = entry
            self.counts[worker] += 1
        self.joined[worker] += reply["joined"]

    def grow(self, size: int) -> float:
        """Start nodes until the swarm has ``size``; returns the seconds it took."""
        started = time.monotonic()
        processes = self.options.processes or processes_for(
            size, self.options.cores, self.options.fd_limit, self.options.conn_budget
        )
        processes = max(processes, len(self.workers))
        if len(self.workers) < processes:
            progress(f"N={size}: starting worker processes {len(self.workers)}..{processes - 1}")
            self._add_workers(processes)
        if not self.bootstrap:
            first = self.workers[0].ask(
                {"op": "start", "count": BOOTSTRAP_COUNT, "bootstrap": [], "join_timeout": 30.0}, 60.0
            )
            self._record(0, first)
            self.bootstrap = [f"{node['addrs'][0]}/p2p/{node['peer_id']}" for node in first["nodes"]]
        # Fill the emptiest process first: the split ends up as even as it can be.
        adds = [0] * len(self.workers)
        for _ in range(size - len(self.directory)):
            index = min(range(len(self.workers)), key=lambda i: (self.counts[i] + adds[i], i))
            adds[index] += 1
        progress(
            f"N={size}: adding {'+'.join(map(str, adds))} nodes to "
            f"{'+'.join(map(str, self.counts))} (joins: {self.options.join_concurrency} at a time per process)"
        )
        # Nodes still joining at the deadline go on joining in the background.
        join_timeout = max(10.0, min(60.0 + 3.0 * max(adds), self.remaining() - 60.0))
        replies = ask_all(
            self.workers,
            [
                {"op": "start", "count": count, "bootstrap": self.bootstrap, "join_timeout": join_timeout}
                for count in adds
            ],
            join_timeout + 120.0,
        )
        for index, reply in enumerate(replies):
            self._record(index, reply)
        seconds = time.monotonic() - started
        progress(
            f"N={size}: {len(self.directory)} nodes, {sum(self.joined)} joined, in {seconds:.1f}s "
            f"(CPU s per process {cpu_list(replies)})"
        )
        return seconds

    def stats(self) -> list[Message]:
        replies = ask_all(self.workers, [{"op": "stats"}] * len(self.workers), 60.0)
        self.joined_peers = {peer for reply in replies for peer in reply["joined_peers"]}
        return replies

    def lookup(self) -> Message:
        """One find_peer between two nodes whose join ended: a node still joining is in nobody's
        table yet (and knows nobody), so a lookup from or for it measures the join, not the lookup."""
        options = self.options
        joined = [entry for entry in self.directory if entry.peer_id in self.joined_peers] or self.directory
        searcher = joined[self.rng.randrange(len(joined))]
        candidates = [entry.peer_id for entry in joined if entry is not searcher]
        self.rng.shuffle(candidates)
        reply = self.workers[searcher.worker].ask(
            {
                "op": "lookup",
                "searcher": searcher.local,
                "candidates": candidates,
                "timeout": options.lookup_timeout,
                "trace": options.trace,
            },
            options.lookup_timeout + 30.0,
        )
        target = self.by_peer[reply["target"]]
        reply["success"] = bool(set(reply["addrs"]) & target.addrs)
        if options.trace and not reply["success"]:
            self._print_trace(searcher, target, reply)
        reply["cross_process"] = target.worker != searcher.worker
        return reply

    def _print_trace(self, searcher: Entry, target: Entry, reply: Message) -> None:
        """A failed lookup, event by event, and what the peers it asked know of its target (``--trace``)."""
        asked = {line.split()[2] for line in reply["trace"] if line.split()[1] == "ask"}
        peers = [entry.peer_id for entry in self.directory if entry.peer_id[-6:] in asked]
        peers.append(searcher.peer_id)
        known: dict[str, str] = {}
        holders: set[str] = set()
        for reply_inspect in ask_all(
            self.workers, [{"op": "inspect", "peers": peers, "target": target.peer_id}] * len(self.workers), 30.0
        ):
            known.update(reply_inspect["found"])
            holders.update(reply_inspect.get("holders", ()))
        # The swarm's own nodes by distance to the target (dht.lookup's metric), the target first.
        point = key_of(ID.from_base58(target.peer_id).to_bytes())
        by_distance = sorted(
            (entry.peer_id for entry in self.directory if entry.peer_id != target.peer_id),
            key=lambda peer: key_of(ID.from_base58(peer).to_bytes()) ^ point,
        )
        rank = {peer[-6:]: index for index, peer in enumerate(by_distance)}
        marks = [f"{'*' if peer in holders else ''}{'+' if peer[-6:] in asked else ''}" for peer in by_distance]
        closest = " ".join(f"{peer[-6:]}{mark}" for peer, mark in zip(by_distance[:10], marks, strict=False))
        lines = [
            f"FAILED lookup {searcher.peer_id[-6:]} -> {target.peer_id[-6:]} in {reply['seconds']:.2f}s "
            f"(searcher conns {reply['conns']}, budget closed {reply['budget_closed']} during it, "
            f"addrs returned {reply['addrs']}, error {reply['error']})",
            *("  " + line for line in reply["trace"]),
            f"  held by {len(holders)} of {len(self.directory) - 1} tables; the target's 10 closest in the swarm "
            f"(* holds it, + asked): {closest}; ranks asked: {sorted(rank[peer] for peer in asked if peer in rank)}",
        ]
        for peer, facts in sorted(known.items()):
            role = "TARGET" if peer == target.peer_id else "SEARCHER" if peer == searcher.peer_id else "asked"
            lines.append(f"  {role} {peer[-6:]}: {facts}")
        progress("\n".join(lines))

    def measure(self, size: int) -> SizeResult:
        options = self.options
        build_seconds = self.grow(size)
        if options.refresh:
            refresh_timeout = 60.0 + size * 3.0
            settled = ask_all(
                self.workers,
                [{"op": "refresh", "concurrency": options.refresh_concurrency, "timeout": refresh_timeout}]
                * len(self.workers),
                refresh_timeout + 60.0,
            )
            progress(
                f"N={size}: refreshed {sum(r['refreshed'] for r in settled)} nodes in "
                f"{max(r['seconds'] for r in settled):.1f}s"
            )
        else:
            settled = self.stats()
        progress(
            f"N={size}: routing table min/mean/max {summarize_tables(settled, 'tables')}, "
            f"peers with addrs {summarize_tables(settled, 'known')}, connections {summarize_tables(settled, 'conns')}, "
            f"fds {[r['fds'] for r in settled]}, RSS {[round(r['rss'] / MIB) for r in settled]} MiB"
        )
        idle_seconds = 3.0
        time.sleep(idle_seconds)
        idle = self.stats()
        idle_load = [
            f"{100 * (after['cpu'] - before['cpu']) / idle_seconds:.0f}%"
            for before, after in zip(settled, idle, strict=True)
        ]
        progress(f"N={size}: CPU per process while idle (yamux RTT pings, maintenance): {idle_load}")

        results: list[Message] = []
        note = ""
        started = time.monotonic()
        budget = min(options.budget, self.remaining())
        for number in range(options.lookups):
            if time.monotonic() - started + options.lookup_timeout > budget or (number > 0 and self.remaining() < 0):
                note = f"lookup budget {budget:.0f}s reached after {number} of {options.lookups} lookups"
                progress(f"N={size}: {note}")
                break
            if number % 10 == 0:
                self.stats()  # nodes whose join ended since join in the draw
            results.append(self.lookup())
            if (number + 1) % 25 == 0:
                recent = results[-25:]
                progress(
                    f"N={size}: {number + 1} lookups, last 25: "
                    f"p50={percentile([r['seconds'] for r in recent], 0.5):.3f}s "
                    f"success={100 * mean([r['success'] for r in recent]):.0f}% "
                    f"rounds={mean([r['rounds'] for r in recent]):.1f}"
                )
        lookup_seconds = time.monotonic() - started
        final = self.stats()
        if not results:
            raise WorkerError(f"N={size}: no lookup ran")
        total_rss = sum(reply["rss"] for reply in final) / MIB
        latencies = [r["seconds"] for r in results]
        found = [r["found_round"] for r in results if r["found_round"] is not None]
        errors = [r["error"] for r in results if r["error"]]
        progress(
            f"N={size}: {len(results)} lookups in {lookup_seconds:.1f}s; target named in a FIND_NODE response in "
            f"{len(found)}/{len(results)}; cross-process targets {sum(r['cross_process'] for r in results)}; "
            f"errors {len(errors)}{': ' + errors[0] if errors else ''}; "
            f"RSS per process {[round(r['rss'] / MIB) for r in final]} MiB"
        )
        return SizeResult(
            size=size,
            counts=list(self.counts),
            joined=sum(self.joined),
            build_seconds=build_seconds,
            lookups=len(results),
            p50=percentile(latencies, 0.5),
            p95=percentile(latencies, 0.95),
            hops=mean(found),
            hops_p50=percentile(found, 0.5),
            hops_p90=percentile(found, 0.9),
            rounds=mean([r["rounds"] for r in results]),
            queries=mean([r["queries"] for r in results]),
            success=100.0 * mean([r["success"] for r in results]),
            timeouts=sum(r["timed_out"] for r in results),
            cold=100.0 * mean([r["cold"] for r in results]),
            rss_per_node=total_rss / size,
            baseline=mean(self.baselines),
            marginal=(total_rss - sum(self.baselines)) / size,
            table_mean=mean([value for reply in settled for value in reply["tables"]]),
            conns_mean=mean([value for reply in settled for value in reply["conns"]]),
            conns_after=mean([value for reply in final for value in reply["conns"]]),
            conns_after_max=max(value for reply in final for value in reply["conns"]),
            conn_budget=options.conn_budget,
            note=note,
        )

    def close(self) -> None:
        if self.workers:
            seconds = stop_workers(self.workers)
            progress(f"workers stopped in {seconds:.1f}s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes", default="50,200", help="comma-separated swarm sizes, grown in order (default 50,200)"
    )
    parser.add_argument("--lookups", type=int, default=200, help="find_peer lookups per size (default 200)")
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="worker processes for every size (default: one per core, more when a process would run out of fds)",
    )
    parser.add_argument("--lookup-timeout", type=float, default=10.0, help="seconds per lookup (default 10)")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of lookups per size at most (default 120)")
    parser.add_argument("--join-concurrency", type=int, default=1, help="concurrent joins per process (default 1)")
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="after the joins, refresh every node's routing table once more (as tests/support/swarm.py does)",
    )
    parser.add_argument(
        "--refresh-concurrency", type=int, default=1, help="concurrent refreshes per process (default 1)"
    )
    parser.add_argument(
        "--yamux-rtt",
        action="store_true",
        help="keep py-libp2p's Yamux RTT ping on every connection every 30 s (default: off, see the docstring)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=540.0,
        help="seconds for the whole run: joins and lookups stop early to end within it (default 540)",
    )
    parser.add_argument(
        "--conn-budget",
        type=int,
        default=64,
        help="connections each node keeps (build_host's connection_budget, node.connection_budget; "
        "0: none, every connection kept up to max_connections 300) (default 64)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--trace",
        action="store_true",
        help="print each failed lookup event by event (dht.lookup.LookupStats.trace) and what the peers it "
        "asked know of the target",
    )
    return parser.parse_args(argv)


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libp2p()
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    sizes = sorted({int(text) for text in args.sizes.split(",") if text.strip()})
    if not sizes or sizes[0] <= BOOTSTRAP_COUNT:
        raise SystemExit(f"sizes must be larger than {BOOTSTRAP_COUNT}")
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    options = Options(
        lookups=args.lookups,
        processes=args.processes,
        cores=len(os.sched_getaffinity(0)),
        fd_limit=fd_limit if fd_limit != resource.RLIM_INFINITY else 1 << 20,
        lookup_timeout=args.lookup_timeout,
        budget=args.budget,
        join_concurrency=args.join_concurrency,
        refresh=args.refresh,
        refresh_concurrency=args.refresh_concurrency,
        yamux_rtt=args.yamux_rtt,
        time_limit=args.time_limit,
        seed=args.seed,
        conn_budget=args.conn_budget,
        trace=args.trace,
    )
    started = time.monotonic()
    figures: list[str] = []
    results: list[SizeResult] = []
    swarm = SwarmRun(options)
    try:
        for size in sizes:
            results.append(swarm.measure(size))
            figures.append(results[-1].figures())
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    except WorkerError as error:
        progress(f"failed: {error}")
        return 1
    finally:
        swarm.close()
    total = time.monotonic() - started
    progress(f"total {total:.0f}s")
    settings = (
        f"run {total:.0f}s on {options.cores} cores, joins {options.join_concurrency} at a time per process, "
        f"yamux RTT pings {'on' if options.yamux_rtt else 'off'}, lookup timeout {options.lookup_timeout:g}s, "
        f"lookup budget {options.budget:g}s/size"
    )
    print("dht_swarm " + " | ".join([*figures, settings]), flush=True)
    last = results[-1]
    print(
        f"dht_swarm: n={last.size} p50_s={last.p50:.3f} p95_s={last.p95:.3f} success={last.success / 100:.3f} "
        f"hops_p50={last.hops_p50:g} conns_per_node={last.conns_after:.1f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
