"""Local API fuzz: hostile HTTP requests against every route of a real node, and what they did.

Usage::

    python bench/fuzz_api.py [--inputs 10000] [--seed N]

One full ``Node`` (libp2p host, DHT, ledger, the escrow contract on an embedded chain, a served
capability) runs in this process; its API app, built by the daemon's own ``create_app``, takes
``--inputs`` requests drawn by hypothesis (``tests/support/api_fuzz.py``): paths from its route
table or made up, any method, query strings with huge and malformed numbers, right and wrong tokens
and Host headers, odd content types and lengths, bodies from mutated route samples to 100,000
nested brackets, big strings and raw bytes. Each is handed to the app through ASGI, as hypercorn
would, and judged.

Figures: ``crashes`` (an exception escaped the app, or no complete reply within 20 s),
``internal_errors`` (a 500 or ``E_INTERNAL``), ``max_rss_mb`` (this process's peak resident memory,
node included), plus the other findings (an error without a stable code, a reply or log line with a
traceback, a local path or the token) on stderr. ``bench/fuzz.py`` calls :func:`run_api_fuzz`.
The last stdout line::

    fuzz_api: inputs=10000 crashes=0 internal_errors=0 max_rss_mb=...
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.api import create_app
from node.datadir import read_api_token
from tests.support.api_fuzz import fuzz_app, known_values, watching_logs
from tests.support.market import WORD_OFFER, market_nodes


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def _fuzz(inputs: int, seed: int | None) -> dict[str, Any]:
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}]) as (nodes, _):
        provider, node = nodes
        assert node.escrow_client is not None
        known = known_values(str(provider.host.get_id()), node.escrow_client.account.address)
        token = await trio.to_thread.run_sync(read_api_token, node.data_dir)
        app = create_app(node, token)
        started = time.monotonic()
        with watching_logs(token) as logs:
            report = await fuzz_app(app, token, inputs, seed=seed, known=known)
        seconds = time.monotonic() - started
    return {
        "inputs": report.inputs,
        "crashes": report.crashes,
        "internal_errors": report.internal_errors,
        "max_rss_mb": round(_max_rss_mb(), 1),
        "other_findings": len(report.problems) - min(len(report.problems), report.crashes + report.internal_errors),
        "log_findings": len(logs.findings),
        "statuses": dict(sorted(report.statuses.items())),
        "seconds": round(seconds, 1),
        "problems": report.problems + logs.findings,
    }


def run_api_fuzz(inputs: int, seed: int | None = None) -> dict[str, Any]:
    """Fuzz a fresh node's API with ``inputs`` requests; blocking (runs its own ``trio.run``).

    Returns ``inputs``, ``crashes``, ``internal_errors``, ``max_rss_mb`` and details (``statuses``,
    ``problems``, ``seconds``). The same ``inputs`` and ``seed`` give the same requests each time.
    """
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    logging.basicConfig(level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)  # the fuzz watches INFO records itself; stderr shows warnings only
    return trio.run(_fuzz, inputs, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--inputs", type=int, default=10_000, help="requests to send (default 10000)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed of the first batch (default 0)")
    args = parser.parse_args()
    result = run_api_fuzz(args.inputs, args.seed)
    for problem in result["problems"][:20]:
        print(f"  finding: {problem}", file=sys.stderr)
    print(f"statuses: {result['statuses']} in {result['seconds']} s", file=sys.stderr)
    print(
        f"fuzz_api: inputs={result['inputs']} crashes={result['crashes']} "
        f"internal_errors={result['internal_errors']} max_rss_mb={result['max_rss_mb']}"
    )
    sys.exit(1 if result["crashes"] or result["internal_errors"] or result["problems"] else 0)


if __name__ == "__main__":
    main()
