"""The task and lease commands against real ``clawnode start`` daemons sharing one anvil chain.

A creator, a bidder and an arbiter, each its own process with its own wallet (a funded anvil
account written as its ``wallet.key``): publish → bid → award (escrow lock) → submit → accept →
release, all through the CLI, then both ledgers through ``clawnode ledger``.

Needs anvil from npm (``npm install --prefix tests/runtime/anvil``); skipped with that hint without.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.escrow import Chain, EscrowClient
from tests.runtime.support import anvil_daemon_env, anvil_process, anvil_skip_reason
from tests.support.processes import LOOPBACK_ANY_PORT, DaemonProcess, prepare_data_dir, run_cli

_skip = anvil_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

CAPABILITY = "model:summaries"


@pytest.fixture(scope="module")
def chain_env() -> Iterator[tuple[dict[str, str], Chain]]:
    with anvil_process() as url:
        chain = Chain.rpc(url)
        escrow = EscrowClient.deploy(chain, chain.dev_accounts()[0])
        env = anvil_daemon_env(url, escrow.address, dispute_window_s=30)
        yield env, chain


def _daemon(tmp: Path, name: str, env: dict[str, str], wallet_key: str, bootstrap: list[str]) -> DaemonProcess:
    data_dir = prepare_data_dir(tmp / name, wallet_key=wallet_key)
    args = [*LOOPBACK_ANY_PORT, *(arg for addr in bootstrap for arg in ("--bootstrap", addr))]
    return DaemonProcess(data_dir, args, env=env)


def cli(daemon: DaemonProcess, *args: str) -> Any:
    result = run_cli(*args, "--json", "--data-dir", str(daemon.data_dir), timeout=120)
    assert result.returncode == 0, f"{args}: {result.stderr}\n{daemon.log()[-2000:]}"
    return json.loads(result.stdout)


def wait_until(check: Any, what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def test_a_task_from_publish_to_payment_through_the_cli(
    chain_env: tuple[dict[str, str], Chain], tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    env, chain = chain_env
    accounts = chain.dev_accounts()
    creator = _daemon(tmp_path, "creator", env, accounts[1].key.hex(), []).start()
    daemons.append(creator)
    bootstrap = creator.identity()["listen_addrs"][:1]
    arbiter = _daemon(tmp_path, "arbiter", env, accounts[3].key.hex(), bootstrap).start()
    daemons.append(arbiter)
    # A seller takes awards only under the arbiter its node trusts, by peer id and wallet: on an rpc chain,
    # escrow.arbiter_peer with escrow.arbiter.
    trusting = {
        **env,
        "CLAWNODE_ESCROW_ARBITER": accounts[3].address,
        "CLAWNODE_ESCROW_ARBITER_PEER": arbiter.identity()["peer_id"],
    }
    bidder = _daemon(tmp_path, "bidder", trusting, accounts[2].key.hex(), bootstrap).start()
    daemons.append(bidder)
    for node in (bidder, arbiter):
        node.wait_for_peers({creator.identity()["peer_id"]})
    wait_until(lambda: creator.api("/api/ledger/summary")["escrow"]["state"] == "connected", "escrow connection")

    cli(bidder, "task", "list", "--watch", CAPABILITY)
    cli(creator, "task", "list", "--watch", CAPABILITY)  # the creator relays its own topic too
    time.sleep(2)  # a gossip heartbeat or two: the mesh forms
    published = cli(
        creator,
        "task",
        "publish",
        CAPABILITY,
        "--budget",
        "5000000",
        "--deadline",
        "600",
        "--summary",
        "summarise a page",
        "--arbiter-peer",
        arbiter.identity()["peer_id"],
        "--arbiter-wallet",
        accounts[3].address,
    )
    task_id = published["task_id"]
    assert published["role"] == "creator" and published["state"] == "task_open"

    seen = wait_until(
        lambda: [t for t in cli(bidder, "task", "list")["tasks"] if t["task_id"] == task_id], "the announcement"
    )
    assert seen[0]["budget"] == 5_000_000
    bid = cli(bidder, "task", "bid", task_id, "4000000")
    wait_until(lambda: cli(creator, "task", "list")["tasks"][0]["bids"], "the bid reaching the creator")

    awarded = cli(creator, "task", "award", task_id, bid["bid_id"])
    assert awarded["state"] == "task_awarded" and awarded["price"] == 4_000_000

    artifact = tmp_path / "summary.txt"
    artifact.write_text("A short summary of the page.")
    wait_until(lambda: cli(bidder, "task", "list")["tasks"][0]["role"] == "awarded_bidder", "the award notice")
    cli(bidder, "task", "submit", task_id, str(artifact))
    wait_until(lambda: cli(creator, "task", "list")["tasks"][0]["result_state"], "the result")

    reviewed = cli(creator, "task", "review", task_id, "--accept")
    assert reviewed["result_state"] == "result_accepted"
    closed = wait_until(
        lambda: [t for t in cli(creator, "task", "list")["tasks"] if t["state"] == "task_closed"], "settlement"
    )
    assert closed[0]["receipt_state"] == "receipt_settled"
    wait_until(lambda: cli(bidder, "ledger")["total"]["income"] == 4_000_000, "the bidder's income")
    assert cli(creator, "ledger")["total"]["spend"] == 4_000_000
    # Evidence joins open disputes only; a file over the limit is refused before anything is sent.
    late = run_cli("task", "evidence", task_id, "--note", "too late", "--data-dir", str(creator.data_dir))
    assert late.returncode == 1 and "E_CONFLICT" in late.stderr, late.stderr
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (64 * 1024 + 1))
    refused = run_cli("task", "evidence", task_id, "--attach", str(big), "--data-dir", str(creator.data_dir))
    assert refused.returncode == 1 and "E_INVALID_ARGUMENT" in refused.stderr, refused.stderr
    for node in (creator, bidder):
        assert cli(node, "ledger", "verify")["ok"] is True
        assert str(tmp_path) not in node.log()


def test_lease_commands_answer_with_stable_codes(
    chain_env: tuple[dict[str, str], Chain], tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    env, chain = chain_env
    node = _daemon(tmp_path, "lonely", env, chain.dev_accounts()[4].key.hex(), []).start()
    other = _daemon(tmp_path, "other", env, chain.dev_accounts()[5].key.hex(), node.identity()["listen_addrs"][:1])
    daemons.extend([node, other.start()])
    assert cli(node, "lease", "list") == {"leases": []}
    other_id = other.identity()["peer_id"]
    node.wait_for_peers({other_id})
    refused = run_cli("lease", "open", other_id, "model:nothing", "--data-dir", str(node.data_dir))
    assert refused.returncode == 1 and "E_NOT_FOUND" in refused.stderr
    unknown = run_cli("lease", "revoke", "ab" * 32, "--data-dir", str(node.data_dir))
    assert unknown.returncode == 1 and "E_NOT_FOUND" in unknown.stderr
    bad = run_cli("lease", "call", "ab" * 32, "not json", "--data-dir", str(node.data_dir))
    assert bad.returncode == 1 and "E_INVALID_ARGUMENT" in bad.stderr
