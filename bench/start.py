"""Start benchmark (issue 16): how long ``clawnode start`` takes, on defaults, until its API answers.

Usage::

    python bench/start.py [--runs 3] [--root REPO]

Each run starts ``clawnode start`` in a fresh data dir (a new identity, the default role) with
``--listen /ip4/127.0.0.1/tcp/0 --api-port 0`` so that it shares the machine with other nodes,
then polls until the node has written its running file and ``GET /api/status`` answers 200;
``api_s`` is the wall time from the process start to that answer. ``import_s`` is the wall time
of ``python -c 'import node.daemon'`` alone (the import cost a start always pays). ``--root``
points at another checkout (same venv) to compare with an older commit. Prints per-run figures
on stderr, then one line: ``start: runs=N api_s_median=... api_s_min=... import_s_median=...``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.datadir import read_api_token, read_running

START = [sys.executable, "-m", "node.cli", "start"]
LOOPBACK_ANY_PORT = ["--listen", "/ip4/127.0.0.1/tcp/0", "--api-port", "0"]


def one_start(root: Path) -> float:
    with tempfile.TemporaryDirectory(prefix="clawnode-start-") as tmp:
        data_dir = Path(tmp) / "node"
        log = open(Path(tmp) / "node.log", "w")
        began = time.monotonic()
        process = subprocess.Popen(
            [*START, "--data-dir", str(data_dir), *LOOPBACK_ANY_PORT],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while time.monotonic() - began < 120:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"clawnode exited with {process.returncode}: {(Path(tmp) / 'node.log').read_text()}"
                    )
                running = read_running(data_dir)
                if running is not None and running.pid == process.pid:
                    try:
                        reply = httpx.get(
                            f"{running.api_url}/api/status",
                            headers={"authorization": f"Bearer {read_api_token(data_dir)}"},
                            timeout=5.0,
                        )
                        if reply.status_code == 200:
                            return time.monotonic() - began
                    except httpx.HTTPError:
                        pass
                time.sleep(0.02)
            raise TimeoutError("clawnode did not answer within 120 s")
        finally:
            process.terminate()
            process.wait(timeout=30)
            log.close()


def import_time(root: Path) -> float:
    began = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", "import node.daemon"], cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, check=True
    )
    return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    api, imports = [], []
    for run in range(args.runs):
        imports.append(import_time(args.root))
        api.append(one_start(args.root))
        print(f"[start] run {run + 1}: import_s={imports[-1]:.2f} api_s={api[-1]:.2f}", file=sys.stderr, flush=True)
    print(
        f"start: runs={args.runs} api_s_median={statistics.median(api):.2f} api_s_min={min(api):.2f} "
        f"import_s_median={statistics.median(imports):.2f} load1={os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
