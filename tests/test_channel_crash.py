"""SIGKILL a payment channel at random points (issue 20): nothing lost, nothing paid twice.

A worker (tests/runtime/channel_crash_worker.py) runs both ledgers of one channel on anvil: the lock,
60 leases drawing on it one after another with countersigned vouchers, the provider's close and the
consumer's refund. It is SIGKILLed at random moments and restarted on the same files (a fork server
pays the imports once: each run is still a process of its own, killed for real). After every kill,
read from the files as found: both audit chains verify; one lock at most was journaled and the chain
holds one escrow of the channel's amount; the leases follow one another on the channel's voucher
line without overlap (no voucher of one lease pays another's units); every receipt the provider holds
countersigned is one the consumer signed; the chain never released more than the consumer committed
and neither ledger booked more than the chain released. The last run to completion must account for
every wei: released = committed = income = spend, the rest refunded, both channels closed.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from pathlib import Path

import pytest

from runtime.escrow import Chain, EscrowClient
from runtime.ledger import LedgerStore
from tests.runtime import channel_crash_worker as worker
from tests.runtime.forkserver import fork_server
from tests.runtime.support import anvil_process, anvil_skip_reason

_skip = anvil_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")

ROOT = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get("CLAWNODE_CRASH_KILLS", "10"))
LEASES = 60  # long enough that ten kills at most 0.2 s after "ready" land before the job is done


def _lines(store: LedgerStore, channel_id: str) -> list[tuple[int, int]]:
    """(base, final) of each lease drawn on the channel, by base."""
    rows = store._conn.execute(
        "SELECT c.lease_id, c.base FROM channel_leases c JOIN leases l ON l.lease_id = c.lease_id"
        " WHERE c.channel_id = ? ORDER BY CAST(c.base AS INTEGER), c.lease_id",
        (channel_id,),
    ).fetchall()
    return [(int(base), store.countersigned_amount(lease_id)) for lease_id, base in rows]


def _money(store: LedgerStore, direction: str) -> int:
    rows = store._conn.execute("SELECT amount FROM money WHERE direction = ?", (direction,)).fetchall()
    return sum(int(amount) for (amount,) in rows)


def _check(directory: Path, client: EscrowClient, payer: str, channel_id: str, *, final: bool) -> None:
    provider = LedgerStore.open(directory / "provider.db")
    consumer = LedgerStore.open(directory / "consumer.db")
    try:
        assert provider.verify_audit().ok and consumer.verify_audit().ok
        locks = consumer._conn.execute("SELECT escrow_id FROM escrow_locks").fetchall()
        assert locks in ([], [(channel_id,)]), "a second lock was journaled"
        state = client.get(payer, bytes.fromhex(channel_id[2:]))
        assert state.phase == "none" or state.amount == worker.CHANNEL_AMOUNT, "locked twice or the wrong amount"
        lines = _lines(consumer, channel_id)
        for (base, final_amount), (next_base, _) in itertools.pairwise(lines):
            assert next_base >= base + final_amount, "two leases' vouchers overlap: a unit would be paid twice"
        # The provider draws each lease at the consumer's base; it may lag in what it recorded countersigned.
        held = _lines(provider, channel_id)
        assert [base for base, _ in held] == [base for base, _ in lines[: len(held)]]
        assert all(mine <= theirs for (_, mine), (_, theirs) in zip(held, lines, strict=False))
        signed = {r.receipt_hash for r in consumer.list_receipts(limit=100_000)}
        assert all(r.receipt_hash in signed for r in provider.list_receipts(limit=100_000) if r.countersigned)
        committed = max((base + amount for base, amount in lines), default=0)
        assert state.released <= committed, "the chain paid more than the consumer committed"
        income, spend = _money(provider, "income"), _money(consumer, "spend")
        assert income <= state.released and spend <= state.released, "a ledger booked more than the chain paid"
        if final:
            assert len(lines) == LEASES and all(amount > 0 for _, amount in lines)
            assert state.phase == "closed"
            assert state.released == committed == income == spend == sum(amount for _, amount in lines)
            closed = consumer.get_channel(channel_id)
            assert closed.state == provider.get_channel(channel_id).state == "channel_closed"
            assert closed.refunded == worker.CHANNEL_AMOUNT - state.released
            assert client.credit_of(payer) == worker.CHANNEL_AMOUNT - state.released
            assert provider.queue_stats().length == consumer.queue_stats().length == 0
    finally:
        provider.close()
        consumer.close()


def test_sigkill_a_channel_at_random_points_loses_and_doubles_nothing(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("CLAWNODE_CRASH_SEED", str(time.time_ns()))))
    with anvil_process() as url:
        chain = Chain.rpc(url)
        payer = chain.dev_accounts()[0]
        deployed = EscrowClient.deploy(chain, chain.dev_accounts()[3])
        channel_id = "0x" + os.urandom(32).hex()
        args = (str(tmp_path), str(LEASES), url, deployed.address, channel_id)
        kills = 0
        with fork_server("tests.runtime.channel_crash_worker", ROOT, tmp_path / "worker.err") as server:
            for _ in range(KILLS):
                pid = server.start(*args)
                time.sleep(rng.uniform(0.0, 0.2))
                code, lines = server.kill(pid)
                kills += code == -signal.SIGKILL
                assert code in (0, -signal.SIGKILL), (tmp_path / "worker.err").read_text()[-2000:]
                _check(tmp_path, deployed, payer.address, channel_id, final=False)
            pid = server.start(*args)
            code, lines = server.wait(pid)
            assert code == 0 and lines[-1:] == ["done"], (tmp_path / "worker.err").read_text()[-2000:]
        _check(tmp_path, deployed, payer.address, channel_id, final=True)
        print(f"{kills} of {KILLS} kills landed while the worker ran")
        assert kills >= KILLS * 0.75  # the kills landed while it was working, not after it finished
