"""A lease that is only paused survives the router (issue 17): no second lock on chain, and the lease
serves again once the countersignature lands.

Before, "paused" and "ended" were both a bare ``E_CONFLICT``: the router retired a lease whose receipt
merely waited for our countersignature and locked a fresh budget on chain for the next request, and the
provider never asked for the countersignature again, so the paused lease could only be abandoned.

Real nodes, leases and escrow on one embedded chain; the consumer's router buys words from the provider.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from dht.discovery import DiscoveryQuery
from protocols import lease_wire as w
from protocols.settings import MarketSection
from runtime.errors import ClawnodeError, ErrorCode
from tests.support.market import WORD_OFFER, WORDS, market_nodes, wait_for

FAST = MarketSection(  # type: ignore[call-arg]
    receipt_every_units=5, receipt_every_s=1, countersign_timeout_s=2, abandon_after_s=60
)
BODY = {"messages": [{"role": "user", "content": "one two three four five six seven"}], "max_tokens": 7}


async def _chat(router: Any) -> list[str]:
    pieces: list[str] = []

    async def on_text(text: str) -> None:
        pieces.append(text)

    await router.chat("words", BODY, on_text)
    return pieces


async def test_a_paused_lease_survives_the_router_and_resumes_after_the_countersignature() -> None:
    async with market_nodes([{"offers": (WORD_OFFER,), "market": FAST}, {}]) as (nodes, _):
        provider, consumer = nodes
        with trio.fail_after(60):
            while not await consumer.discover(DiscoveryQuery(capability=WORDS)):
                await trio.sleep(0.2)
        router, market = consumer.router, consumer.market
        client = consumer.escrow_client
        wallet = client.account.address

        async def transactions() -> int:  # every lock is one transaction from the consumer's wallet
            return int(await client.chain.run(lambda: client.chain.w3.eth.get_transaction_count(wallet)))

        async def not_now(message: w.ReceiptPush, remote: str) -> w.Countersigned:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "busy: try again later")

        market._countersign = not_now  # type: ignore[method-assign]  # our countersignatures stall
        assert len(await _chat(router)) == 7
        assert router.leases_opened == 1
        [(_, lease_id)] = list(router._leases.items())
        locks = await transactions()
        served = provider.market.served[lease_id]
        await wait_for(lambda: served.session.state == "lease_paused", 10, what="paused")

        with pytest.raises(ClawnodeError) as caught:  # the only provider refuses while paused
            await _chat(router)
        assert caught.value.code == ErrorCode.UNAVAILABLE
        refusals = {key: n for key, n in market.failures.items() if key[0] == "call"}
        assert refusals == {("call", "E_CONFLICT"): 1}, refusals
        assert list(router._leases.values()) == [lease_id]  # kept, not retired
        assert market.held[lease_id].ended_reason is None

        del market._countersign  # the countersignature goes through: the provider asks again, resumes
        await wait_for(lambda: served.session.state == "lease_active", 10, what="resumed")
        assert len(await _chat(router)) == 7
        assert router.leases_opened == 1 and list(router._leases.values()) == [lease_id]
        assert await transactions() == locks  # no second lock on chain
        consumer_leases = [lease for lease in await consumer.ledger.list_leases() if lease.role == "consumer"]
        assert [lease.lease_id for lease in consumer_leases] == [lease_id]
        assert market.held[lease_id].seen_units == served.session.units_metered


pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")
