"""Fuzz bench: hypothesis-generated inputs on every protocol a node serves, counted.

Usage::

    python bench/fuzz.py [--inputs 10000] [--on-stream 200] [--seed 1] [--no-more]
    python bench/fuzz.py --inputs 500              # smoke run

Starts a provider and a consumer ``node.daemon.Node`` on one shared embedded chain
(``tests.support.market.market_nodes``) and a stranger's bare libp2p host, then sends
``--inputs`` generated inputs to each of ``/clawnode/lease/1.0.0``, ``/clawnode/infer/1.0.0``,
``/clawnode/lease-dispute/1.0.0``, ``/clawnode/task/1.0.0``, ``/clawnode/capability/1.0.0`` and
the node's gossip topic, then (unless ``--no-more``) to each of ``/clawnode/network/1.0.0``,
``/clawnode/verify-reports/1.0.0``, ``/clawnode/layers/1.0.0``, ``/clawnode/autonat/1.0.0``,
``/libp2p/autonat/2/dial-request``, ``/libp2p/autonat/2/dial-back``, the DHT's
``/clawnode/kad/1.0.0`` and ``/ipfs/id/push/1.0.0`` (protobuf ones: real messages with nasty
fields, then framed, cut and mutated like the rest). What the market's provider does not serve
itself (layers, the AutoNAT servers) is served on its host by stand-ins built as a node builds them
(``tests.support.fuzz.stand_in_servers``). ``tests.support.fuzz`` describes the inputs:

- ``--on-stream`` of them per protocol over real libp2p streams from the stranger's host
  (gossip: published on the topic from its own pubsub), each reply read for up to 0.5 s;
- the rest through the protocol's registered stream handler on an in-memory stream (gossip: the
  node's topic validator), which is the node's own code minus Noise and Yamux, fast enough for
  10^4 inputs per protocol on two cores.

Drawing from the hypothesis strategies is the slow part (20-200 inputs/s: envelopes are really
signed with a party's key so their payloads get past the signature check), so ``--generated``
inputs per protocol (default 2000) are drawn and the rest are seeded byte-level mutants of them
(bit flips, cuts, splices, insertions, repeats; half keep an honest length prefix).

Then an honest peer opens a lease and calls it, fetches the capability record, sends a task
request and publishes a genuine announcement; then asks for the network profile and for reports,
opens a layers tunnel (refused with a stable code), asks both AutoNAT servers for a dial-back, sends
a DHT FIND_NODE and pushes its identify; anything it no longer gets counts as a crash.
A crash is a handler raising, hanging or the node no longer answering; an internal error is an
``E_INTERNAL`` reply.

If ``bench/fuzz_api.py`` (``run_api_fuzz(inputs)``: the local HTTP API) and
``bench/fuzz_records.py`` (``run_record_fuzz(inputs)``: capability records) are present they
run too, with the same ``--inputs``, and their counts are added; a missing one is reported as
skipped.

Progress goes to stderr; per-protocol lines, then exactly one final line, to stdout::

    fuzz: inputs=… crashes=… internal_errors=… max_rss_mb=…
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.fuzz import FuzzRun, fuzz_market

HERE = Path(__file__).resolve().parent


def _progress(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _load(filename: str, function: str) -> Any | None:
    """``function`` from ``bench/<filename>``, imported by path; None when the file is absent."""
    path = HERE / filename
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function, None)


def _field(result: Any, name: str) -> int:
    value = result.get(name, 0) if isinstance(result, dict) else getattr(result, name, 0)
    return int(value or 0)


def _external(label: str, filename: str, function: str, inputs: int) -> tuple[int, int, int]:
    """(inputs, crashes, internal_errors) of another fuzzer, or zeros when it is absent."""
    try:
        run = _load(filename, function)
    except Exception as error:  # noqa: BLE001 - a broken neighbour is reported, not fatal
        print(f"{label:<10} failed to load bench/{filename}: {type(error).__name__}: {error}")
        return 0, 1, 0
    if run is None:
        print(f"{label:<10} skipped: bench/{filename} with {function}() is not there")
        return 0, 0, 0
    started = time.perf_counter()
    try:
        result = run(inputs)
        if inspect.isawaitable(result):

            async def wait() -> Any:
                return await result

            result = trio.run(wait)
    except Exception as error:  # noqa: BLE001
        print(f"{label:<10} {function} raised {type(error).__name__}: {error}")
        return 0, 1, 0
    counts = (_field(result, "inputs") or inputs, _field(result, "crashes"), _field(result, "internal_errors"))
    took = time.perf_counter() - started
    print(
        f"{label:<10} via {function}() inputs={counts[0]} crashes={counts[1]} "
        f"internal_errors={counts[2]} {counts[0] / took if took else 0:.0f}/s"
    )
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=10_000, help="generated inputs per protocol (default 10000)")
    parser.add_argument("--on-stream", type=int, default=200, help="of those, sent over real streams (default 200)")
    parser.add_argument(
        "--generated",
        type=int,
        default=2000,
        help="of those, drawn from the hypothesis strategies; the rest are byte-level mutants (default 2000)",
    )
    parser.add_argument("--seed", type=int, default=1, help="hypothesis seed; the same seed, the same inputs")
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=45.0,
        help="seconds a stream of each protocol, opened and never written to, may stay open (0: not checked)",
    )
    parser.add_argument(
        "--no-more",
        dest="more",
        action="store_false",
        help="only the market's protocols and gossip (not network, reports, layers, AutoNAT, DHT, identify push)",
    )
    args = parser.parse_args(argv)
    if args.inputs < 1 or not 0 <= args.on_stream <= args.inputs:
        parser.error("--inputs must be at least 1 and --on-stream at most --inputs")
    logging.basicConfig(level=logging.CRITICAL)  # the node's own warnings about garbage are expected

    started = time.perf_counter()
    run: FuzzRun = trio.run(
        lambda: fuzz_market(
            args.inputs,
            args.on_stream,
            args.seed,
            generated=args.generated,
            more=args.more,
            idle_wait_s=args.idle_wait if args.more else 0.0,
            progress=_progress,
        )
    )
    inputs = crashes = internal = idle_hangs = 0
    protocols = {outcome.protocol for outcome in run.outcomes} - {"idle"}
    for outcome in run.outcomes:
        print(outcome.summary())
        for failure in outcome.failures:
            print(f"    {failure}")
        if outcome.protocol == "idle":  # not an input: counted apart, and as crashes
            idle_hangs += outcome.crashes
            crashes += outcome.crashes
            continue
        inputs += outcome.inputs
        crashes += outcome.crashes
        internal += outcome.internal_errors
    for problem in run.problems:
        print(f"honest     {problem}")
    crashes += len(run.problems)
    drawn = min(args.generated, args.inputs)
    print(
        f"nodes      {time.perf_counter() - started:.0f} s; per protocol {drawn} inputs from hypothesis "
        f"(seed {args.seed}) and {args.inputs - drawn} byte-level mutants of them; {args.on_stream} over real "
        "streams, the rest through the registered handler (gossip: the topic validator)"
    )

    for label, filename, function in (
        ("api", "fuzz_api.py", "run_api_fuzz"),
        ("records", "fuzz_records.py", "run_record_fuzz"),
    ):
        _progress(f"{label}: bench/{filename}")
        more = _external(label, filename, function, args.inputs)
        inputs += more[0]
        crashes += more[1]
        internal += more[2]

    max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"fuzz: inputs={inputs} crashes={crashes} internal_errors={internal} max_rss_mb={max_rss_mb:.0f} "
        f"protocols={len(protocols)} idle_hangs={idle_hangs}"
    )
    return 1 if crashes or internal else 0


if __name__ == "__main__":
    sys.exit(main())
