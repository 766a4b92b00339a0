"""A consumer that names the escrow of a lease it holds as a payment channel, with real nodes and the dev chain.

A per-lease escrow's id is derived from the consumer's peer id and a salt, exactly as a channel's is, so
the provider's channel check took it: the channel lease's vouchers then started again from 0 on the lock
that already carried the first lease's vouchers, and the provider, claiming the highest voucher of the
escrow, was paid for one lease of the two it served.
"""

from __future__ import annotations

import os
import secrets
from types import SimpleNamespace
from typing import Any

import pytest

from protocols.lease import consumer as consumer_module
from protocols.lease.channels import ChannelDraw
from protocols.machines.lease import lease_id_for
from protocols.settings import MarketSection
from runtime.errors import ClawnodeError, ErrorCode
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, discovered, market_nodes

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

MARKET = MarketSection(  # type: ignore[call-arg]
    receipt_every_units=10, receipt_every_s=2, channel_duration_s=600, channel_idle_close_s=3600, channel_margin_s=0
)


async def test_a_provider_refuses_a_channel_on_the_escrow_of_a_lease_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    async with market_nodes([{"offers": (WORD_OFFER,), "market": MARKET}, {"market": MARKET}]) as (nodes, _):
        provider, consumer = nodes
        await discovered(consumer, provider)
        peer = str(provider.host.get_id())

        # The first lease locks its own escrow under a salt the consumer keeps.
        salt = os.urandom(32)
        salts = [salt]
        stub = SimpleNamespace(token_bytes=lambda n: salts.pop() if salts else secrets.token_bytes(n))
        monkeypatch.setattr(consumer_module, "secrets", stub)
        first = await consumer.market.open_lease(peer, WORDS, budget=50 * WORD_PRICE, duration_s=120)
        monkeypatch.setattr(consumer_module, "secrets", secrets)
        assert first.lease_id == lease_id_for(consumer.host.get_id().to_bytes(), salt).hex()
        assert (await consumer.market.call(first.lease_id, {"prompt": "one two three"})).units == 3

        # The second names that escrow, with that salt, as a channel to draw on from 0.
        async def on_the_first_escrow(*_: Any) -> ChannelDraw:
            return ChannelDraw("0x" + first.lease_id, salt.hex(), 0, 50 * WORD_PRICE)

        monkeypatch.setattr(consumer.market, "draw_channel", on_the_first_escrow)
        with pytest.raises(ClawnodeError) as refused:
            await consumer.market.open_lease(peer, WORDS, budget=20 * WORD_PRICE, duration_s=60, channel=True)
        assert (refused.value.code, refused.value.reason) == (ErrorCode.CONFLICT, "channel_is_a_lease")
        assert [view.lease_id for view in provider.market.leases()] == [first.lease_id]
