"""The consumer's lease machine in the adapter: a held lease goes opening -> locked -> active on a real
escrowed open, pauses when the provider refuses a call as ``paused``, serves again after our
countersignature, and ends through ending -> ended when we revoke it; the API's view shows each state.

Real nodes, a lease and escrow on one embedded chain.
"""

from __future__ import annotations

import pytest

from protocols import lease_wire as w
from protocols.machines.lease_consumer import ConsumerEvent, ConsumerState
from protocols.settings import MarketSection
from runtime.errors import ClawnodeError, ErrorCode, Reason
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes, wait_for

FAST = MarketSection(  # type: ignore[call-arg]
    receipt_every_units=5, receipt_every_s=1, countersign_timeout_s=1, abandon_after_s=60
)
BODY = {"prompt": "one two three four five six seven", "max_tokens": 7}


async def test_a_held_lease_moves_through_the_consumer_machine() -> None:
    async with market_nodes([{"offers": (WORD_OFFER,), "market": FAST}, {}]) as (nodes, _):
        provider, consumer = nodes
        market = consumer.market
        view = await market.open_lease(str(provider.host.get_id()), WORDS, budget=WORD_PRICE * 200, duration_s=60)
        held = market.held[view.lease_id]
        assert view.state == ConsumerState.ACTIVE
        assert [event for _, event, _ in held.machine.history] == [ConsumerEvent.LOCK, ConsumerEvent.GRANT]

        async def not_now(message: w.ReceiptPush, remote: str) -> w.Countersigned:
            raise ClawnodeError(ErrorCode.UNAVAILABLE, "busy: try again later")

        market._countersign = not_now  # type: ignore[method-assign]  # our countersignatures stall
        await market.call(view.lease_id, BODY)
        served = provider.market.served[view.lease_id]
        await wait_for(lambda: served.session.state == "lease_paused", 10, what="paused")
        with pytest.raises(ClawnodeError) as caught:
            await market.call(view.lease_id, BODY)
        assert (caught.value.code, caught.value.reason) == (ErrorCode.CONFLICT, Reason.PAUSED)
        assert held.machine.state == ConsumerState.PAUSED
        assert [v.state for v in market.leases() if v.role == "consumer"] == [ConsumerState.PAUSED]

        del market._countersign  # the provider asks again; our countersignature resumes both sides
        await wait_for(lambda: held.machine.state == ConsumerState.ACTIVE, 10, what="resumed (consumer)")
        await wait_for(lambda: served.session.state == "lease_active", 10, what="resumed (provider)")
        result = await market.call(view.lease_id, BODY)
        assert result.units > 0

        ended = await market.revoke(view.lease_id)
        assert ended.state == ConsumerState.ENDED and held.ended_reason == "revoked by the consumer"
        path = [(before, event) for before, event, _ in held.machine.history]
        closing = path.index((ConsumerState.ACTIVE, ConsumerEvent.CLOSE))
        # The provider's final receipt is countersigned while we end it; then the revocation is done.
        assert path[closing + 1 :] == [(ConsumerState.ENDING, ConsumerEvent.COUNTERSIGN)] * (
            len(path) - closing - 2
        ) + [(ConsumerState.ENDING, ConsumerEvent.END)]
        with pytest.raises(ClawnodeError) as caught:
            await market.call(view.lease_id, BODY)
        assert (caught.value.code, caught.value.reason) == (ErrorCode.CONFLICT, Reason.ENDED)
