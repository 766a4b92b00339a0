"""The full NAT matrix: how often a home node reaches another directly, and whether the relay always works.

Usage (Linux, root, ``ip``, ``nft``, Debian's ``miniupnpd``)::

    python bench/nat_matrix.py                       # every ordered NAT pair + UPnP + port forward, once
    python bench/nat_matrix.py --repetitions 3 --json nat-matrix.json
    python bench/nat_matrix.py --loss 5              # every router drops 5 % of what it forwards
    python bench/nat_matrix.py --case full-cone:port-restricted --case port-restricted:symmetric+upnp

Real ``clawnode start`` daemons in network namespaces (``node.natmatrix``, the same code as
``clawnode nat-test --full``), every home node on the shipped defaults (``0.0.0.0``, default
AutoNAT, relay, UPnP and hole-punch settings): per pair, A asks B for its signed record; recorded
are both AutoNAT verdicts, B's relay reservations, whether data came back, and how A ended up
connected (direct by UPnP/port forward, hole punch, over the LAN, relay only). Besides the 16 NAT
pairs, UPnP behind each type and a port forward: double NAT (a carrier-grade NAT in front of the
home router, with and without UPnP there), two nodes behind one router, and relay loss (B's two
relays killed one after the other, the last one restarted). Printed: the table, then the figures:

- ``direct rate``: pairs where a direct path exists (no symmetric NAT facing a port-restricted or
  symmetric one; double NAT included, as the NATs add up; the same-LAN pair) that ended direct
  (goal >= 90 %);
- ``relay fallback``: every run without a direct connection that still exchanged data over the
  relay (goal 100 %);
- ``mapped direct``: UPnP / port-forward runs reached directly;
- ``first data p50``: from the later of A's and B's start to A's first record answered live by B
  (goal < 10 s); hole punch time p50 (DCUtR start to a verified direct connection);
- ``relay recovery``: from the restarted relay's start to B's reservation on it again (goal < 10 s);
- the timeline: per side (``a.`` asks, ``b.`` answers), the p50 seconds from the process's start to
  its first log line (Python start and imports), ``running``, the DHT joined, its first relay
  reservation, its first record published, its AutoNAT verdict, a hole punch done.

The last line is ``nat_matrix: direct_rate=… relay_fallback=… first_data_p50_s=… relay_recovery_s=…``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node import natmatrix


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--loss", type=int, default=0, help="percent of forwarded packets each router drops")
    parser.add_argument("--no-upnp", action="store_true", help="leave out the UPnP cases")
    parser.add_argument("--quic", action="store_true", help="also the 16 pairs and the UPnP cases with QUIC listeners")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy every daemon's log here")
    parser.add_argument(
        "--case",
        dest="cases",
        action="append",
        default=[],
        metavar="CASE",
        help="run only this case (as `clawnode nat-test --case`: NAT_A:NAT_B[+upnp], same-lan, relay-loss; repeatable)",
    )
    args = parser.parse_args()
    if args.cases:
        cases = [natmatrix.parse_case(text) for text in args.cases]
    else:
        cases = natmatrix.full_cases(upnp=not args.no_upnp, quic=args.quic)
    problem = natmatrix.requirements_problem(cases)
    if problem is not None:
        print(f"E_UNAVAILABLE: {problem}", file=sys.stderr)
        return 4
    from rich.console import Console

    console = Console()
    started = time.monotonic()
    results = natmatrix.run_matrix_with_progress(
        console,
        cases,
        args.repetitions,
        parallel=args.parallel,
        loss_percent=args.loss,
        keep_logs=args.keep_logs,
    )
    console.print(natmatrix.render_table(results))
    summary = natmatrix.summarize(results)
    print(
        f"direct rate {summary['direct']} = {summary['direct_rate']} (goal >= 0.9) | "
        f"relay fallback {summary['relay_fallback']} = {summary['relay_fallback_rate']} (goal 1.0) | "
        f"mapped direct {summary['mapped_direct']} | QUIC direct {summary['quic_direct']} | "
        f"hole punch p50 {summary['hole_punch_seconds_p50']} s | "
        f"first data p50 {summary['first_data_p50_s']} s (max {summary['first_data_max_s']} s) | "
        f"double NAT told {summary['double_nat_told']} | relay loss ok {summary['relay_loss_ok']} | "
        f"loss {args.loss} % | {time.monotonic() - started:.0f} s"
    )
    stages = summary["timeline_p50_s"]
    print(
        "timeline p50 (s from each process's start): "
        + ", ".join(f"{stage} {seconds}" for stage, seconds in stages.items())
    )
    if args.json is not None:
        payload = {
            "summary": summary,
            "loss_percent": args.loss,
            "results": [r.model_dump(mode="json") for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(natmatrix.summary_line(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
