"""The same paid-lease story on a real anvil process, and a chain outage the queue rides out.

Needs anvil from npm (pinned in tests/runtime/anvil/package-lock.json):
``npm install --prefix tests/runtime/anvil --no-audit --no-fund``; skipped with that hint when node/npm
or the install is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from runtime.escrow import Chain
from runtime.settlement import Backoff
from tests.runtime.scenario import LEASE, meter_and_countersign, open_market, run_lease_end_to_end
from tests.runtime.support import Relay, anvil_process, anvil_skip_reason

_skip = anvil_skip_reason()
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")


@pytest.fixture(scope="module")
def anvil_url() -> Iterator[str]:
    with anvil_process() as url:
        yield url


async def test_lease_end_to_end_on_anvil(anvil_url: str, tmp_path: Path) -> None:
    chain = Chain.rpc(anvil_url)
    assert chain.chain_id == 31337  # read from the chain, not assumed
    await run_lease_end_to_end(chain, tmp_path)


async def test_a_read_whose_connection_drops_is_tried_again(anvil_url: str) -> None:
    """A connection the chain's side closes (a keep-alive connection it dropped, a proxy restarting) fails
    one try of a read, not the read: it is retried on a new connection."""
    relay = Relay(urlparse(anvil_url).port or 0)
    try:
        chain = Chain.rpc(relay.url, timeout_s=5.0)
        relay.cut_next(1)
        assert await chain.run(lambda: int(chain.w3.eth.block_number)) >= 0
    finally:
        relay.close()


async def test_settlement_waits_out_a_chain_outage_and_lands_once(anvil_url: str, tmp_path: Path) -> None:
    relay = Relay(urlparse(anvil_url).port or 0)
    try:
        chain = Chain.rpc(relay.url, timeout_s=2.0)
        m = await open_market(chain, tmp_path, backoff=Backoff(base_s=10.0, max_s=60.0, jitter=0.0))
        owed = await meter_and_countersign(m, 25, "u1")
        relay.down()
        settlement = await m.provider.ledger.enqueue_claim(LEASE)

        report = await m.provider.queue.flush()
        assert (report.landed, report.retried) == (0, 1)
        pending = await m.provider.ledger.get_settlement(settlement.settlement_id)
        assert (pending.state, pending.attempts, pending.last_error) == ("pending", 1, "chain_unavailable")
        assert pending.next_attempt_at >= m.clock() + 10  # backing off, not hammering
        m.clock.advance(5)
        assert (await m.provider.queue.flush()).retried == 0  # not due yet
        stats = await m.provider.ledger.queue_stats()
        assert (stats.length, stats.oldest_age_s) == (1, 5)

        m.clock.advance(10)
        assert (await m.provider.queue.flush()).retried == 1  # still down: second attempt, longer wait
        second = await m.provider.ledger.get_settlement(settlement.settlement_id)
        assert second.attempts == 2 and second.next_attempt_at >= m.clock() + 20

        relay.up()
        m.clock.advance(30)
        assert (await m.provider.queue.flush()).landed == 1
        m.clock.advance(600)
        assert (await m.provider.queue.flush()).landed == 0
        escrow = await chain.run(m.provider.escrow.get, m.payer.address, m.escrow_id)
        assert escrow.released == owed
        [income] = await m.provider.ledger.totals_by_peer()
        assert income.income == owed
        assert (await m.provider.ledger.queue_stats()).length == 0
    finally:
        relay.close()
