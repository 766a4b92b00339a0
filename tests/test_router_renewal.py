"""The router opens the next lease before the current one runs out: no agent request fails for it.

Real nodes, leases and escrow (one shared embedded chain); the provider echoes words. The router's
leases are small, so a few dozen requests use up several of them; every request must succeed, and
every lease the router let go must have ended (refunded, out of the live set).
"""

from __future__ import annotations

import pytest
import trio

from dht.discovery import DiscoveryQuery
from node.router import call_units_needed, lease_fits
from tests.support.market import WORD_OFFER, WORDS, market_nodes

WORDS_PER_REQUEST = 60
PROMPT = " ".join(f"w{i}" for i in range(WORDS_PER_REQUEST))


def test_lease_fits_by_budget_and_time() -> None:
    base = {"budget": 1000, "price_per_unit": 2, "used_units": 300, "reserved_units": 0, "now": 0.0}
    assert lease_fits(**base, need_units=200, expires_at=100.0, renew_before_s=30).ok  # type: ignore[arg-type]
    spent = lease_fits(**base, need_units=201, expires_at=100.0, renew_before_s=30)  # type: ignore[arg-type]
    assert (spent.ok, spent.reason) == (False, "budget")
    held = {**base, "reserved_units": 150}
    assert lease_fits(**held, need_units=100, expires_at=100.0, renew_before_s=30).reason == "budget"  # type: ignore[arg-type]
    late = lease_fits(**base, need_units=1, expires_at=29.0, renew_before_s=30)  # type: ignore[arg-type]
    assert (late.ok, late.reason) == (False, "time")
    free = {**base, "price_per_unit": 0}
    assert lease_fits(**free, need_units=10**9, expires_at=100.0, renew_before_s=30).ok  # type: ignore[arg-type]
    body = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 7}
    assert call_units_needed(body) > 7 and call_units_needed({"prompt": "x"}) > 256


async def test_many_requests_across_lease_exhaustions_none_fail() -> None:
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}]) as (nodes, _):
        provider, consumer = nodes
        with trio.fail_after(60):
            while not await consumer.discover(DiscoveryQuery(capability=WORDS)):
                await trio.sleep(0.2)
        router = consumer.router
        # The smallest lease the router opens: twice what one request may reserve.
        router.settings = router.settings.model_copy(update={"lease_units": 1})
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": WORDS_PER_REQUEST}
        failures: list[BaseException] = []
        served = 0

        async def one() -> None:
            nonlocal served
            pieces: list[str] = []

            async def on_text(text: str) -> None:
                pieces.append(text)

            try:
                result = await router.chat("words", body, on_text)
            except Exception as error:  # noqa: BLE001 - counted: the test wants none
                failures.append(error)
                return
            assert len(pieces) == WORDS_PER_REQUEST
            assert result.failovers == 0 and result.served_by == [str(provider.host.get_id())]
            served += 1

        for _ in range(30):
            await one()
        async with trio.open_nursery() as nursery:  # calls in flight while a lease is replaced
            for _ in range(8):
                nursery.start_soon(one)

        assert failures == [], failures
        assert served == 38
        assert router.leases_renewed >= 3, f"only {router.leases_renewed} renewals: the test is too small"
        held = [view for view in consumer.market.leases() if view.role == "consumer"]
        active = [view for view in held if view.state == "lease_active"]
        assert len(held) == router.leases_opened and len(active) == 1, [(v.lease_id[:8], v.state) for v in held]
        # The provider refused nothing: every call found room on its lease.
        refused = {key: count for key, count in consumer.market.failures.items() if count}
        assert refused == {}, refused
        print(f"38 requests, {router.leases_opened} leases, {router.leases_renewed} renewed before running out")


pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")
