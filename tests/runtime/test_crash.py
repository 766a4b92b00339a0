"""Crash safety: a worker settling a stream of receipts is SIGKILLed at random points, then restarted.

After every kill the ledgers are read as found on disk: both audit chains verify, metered usage is
an exact prefix of the stream (nothing lost, nothing counted twice), every receipt the consumer
countersigned is one the provider issued, and the income booked equals what the escrow paid out
for it (on anvil, the chain itself is checked). A last run, resuming the stream and ending it a few
hundred steps later, must then account for every receipt exactly once. CLAWNODE_CRASH_KILLS sets the
number of kills (default 20).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.escrow import Chain, EscrowClient
from runtime.ledger import LedgerStore
from tests.runtime import crash_worker as worker
from tests.runtime.forkserver import fork_server
from tests.runtime.support import anvil_process, anvil_skip_reason

ROOT = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("CLAWNODE_CRASH_KILLS", "20"))
COUNT = 1500  # enough work that 20 kills, 0–0.3 s into each run, all land before the worker finishes (600 took 3.5 s)
# The last run finishes the same stream this many steps past where the kills left it, not at COUNT: the
# killed runs made about a hundred steps, and the 1,400 more cost 30 s without a kill to check.
FINAL_STEPS = 200


@pytest.fixture(scope="module")
def chain_url() -> Iterator[str | None]:
    """An anvil chain when installed; otherwise the ledger-only part runs (no chain)."""
    if anvil_skip_reason() is not None:
        yield None
        return
    with anvil_process() as url:
        yield url


def _prefix_sums() -> list[int]:
    sums, total = [0], 0
    for i in range(COUNT):
        total += worker.units(i)
        sums.append(total)
    return sums


def _check(directory: Path, escrow: tuple[EscrowClient, str, bytes] | None, *, final: int | None) -> int:
    """Checks the ledgers as found; returns how many steps of the stream are metered. ``final``: the
    stream's length, when the run to completion has ended."""
    prefix = _prefix_sums()
    provider = LedgerStore.open(directory / "provider.db")
    consumer = LedgerStore.open(directory / "consumer.db")
    try:
        assert provider.verify_audit().ok and consumer.verify_audit().ok
        lease = provider.get_lease(worker.LEASE)
        # Usage is an exact prefix of the stream: no step lost, none counted twice.
        usage_rows = provider._conn.execute("SELECT units FROM usage ORDER BY usage_id").fetchall()
        k = len(usage_rows)
        assert [u for (u,) in usage_rows] == [worker.units(i) for i in range(k)]
        assert lease.metered_units == prefix[k]

        issued = sorted(provider.list_receipts(worker.LEASE, limit=10_000), key=lambda r: r.seq)
        signed = sorted(consumer.list_receipts(worker.LEASE, limit=10_000), key=lambda r: r.seq)
        assert [r.seq for r in issued] == list(range(1, len(issued) + 1))
        assert all(r.units in prefix and r.amount == r.units * worker.PRICE for r in issued)
        assert all(a.units < b.units for a, b in itertools.pairwise(issued))
        issued_hashes = {r.receipt_hash: r for r in issued}
        assert all(r.countersigned and r.receipt_hash in issued_hashes for r in signed)
        signed_hashes = {r.receipt_hash for r in signed}
        assert all(r.receipt_hash in signed_hashes for r in issued if r.countersigned)
        assert all(r.countersigned for r in issued[:-1])  # only the newest can be in flight

        income = provider.totals_by_peer()
        booked = income[0].income if income else 0
        assert booked == lease.settled_amount <= provider.countersigned_amount(worker.LEASE)
        if escrow is not None:
            client, payer, escrow_id = escrow
            released = client.get(payer, escrow_id).released
            # The chain may be ahead of the ledger (killed between landing and booking), never behind,
            # and never pays more than the consumer countersigned.
            assert booked <= released <= consumer.countersigned_amount(worker.LEASE)
        if final is not None:
            assert k == final and lease.metered_units == prefix[final]
            assert all(r.countersigned for r in issued)
            total = prefix[final] * worker.PRICE
            assert provider.countersigned_amount(worker.LEASE) == consumer.countersigned_amount(worker.LEASE) == total
            if escrow is not None:
                assert booked == total == escrow[0].get(escrow[1], escrow[2]).released
                assert provider.queue_stats().length == 0
        return k
    finally:
        provider.close()
        consumer.close()


def test_sigkill_at_random_points_loses_and_doubles_nothing(tmp_path: Path, chain_url: str | None) -> None:
    rng = random.Random(int(os.environ.get("CLAWNODE_CRASH_SEED", str(time.time_ns()))))
    escrow = None
    rpc: list[str] = []
    if chain_url is not None:
        chain = Chain.rpc(chain_url)
        payer, _, arbiter, deployer = chain.dev_accounts()[:4]
        payee = chain.dev_accounts()[1]
        deployed = EscrowClient.deploy(chain, deployer)
        escrow_id = os.urandom(32)
        deployed.for_account(payer).lock(
            escrow_id,
            payee=payee.address,
            arbiter=arbiter.address,
            amount=worker.BUDGET,
            deadline=chain.now() + 10**6,
            window=0,
        )
        escrow = (deployed, payer.address, escrow_id)
        rpc = [chain_url, deployed.address, "0x" + escrow_id.hex()]

    kills = metered = 0
    args = (str(tmp_path), str(COUNT), *rpc)
    # Each run is a process of its own, SIGKILLed for real; the fork server only pays the imports once.
    with fork_server("tests.runtime.crash_worker", ROOT, tmp_path / "worker.err") as server:
        for _ in range(KILLS):
            pid = server.start(*args)
            time.sleep(rng.uniform(0.0, 0.3))
            code, _lines = server.kill(pid)
            assert code in (0, -signal.SIGKILL), (tmp_path / "worker.err").read_text()[-2000:]
            kills += code == -signal.SIGKILL
            metered = _check(tmp_path, escrow, final=None)
        # The stream is the same whatever its length (step i meters units(i)): the last run resumes it
        # from where the last kill left it and ends it FINAL_STEPS later, its final claim included.
        final = min(COUNT, metered + FINAL_STEPS)
        pid = server.start(str(tmp_path), str(final), *rpc)
        code, lines = server.wait(pid)
        assert code == 0 and lines[-1:] == ["done"], (tmp_path / "worker.err").read_text()[-2000:]
    _check(tmp_path, escrow, final=final)
    assert kills >= KILLS * 0.9  # the kills landed while it was working, not after it finished
