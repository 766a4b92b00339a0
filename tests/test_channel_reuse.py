"""One escrow used as both a lease's own lock and a payment channel, both ways, with real nodes and the dev chain.

A per-lease escrow's id is derived from the consumer's peer id and a salt, exactly as a channel's is.
A consumer that named the escrow of a lease it held as a payment channel had it taken by the provider's
channel check: the channel lease's vouchers started again from 0 on the lock that already carried the
first lease's vouchers, and the provider, claiming the highest voucher of the escrow, was paid for one
lease of the two it served. A consumer that named its payment channel's escrow as a per-lease lock had it
taken by the per-lease check as the new lease's own: the channel's vouchers and the per-lease claim drew on
one locked amount, and the provider was paid for only one of the two.
"""

from __future__ import annotations

import os
import secrets
from types import SimpleNamespace
from typing import Any

import pytest

from protocols import lease_wire as w
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


async def test_a_provider_refuses_a_per_lease_lock_that_is_a_channel_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    async with market_nodes([{"offers": (WORD_OFFER,), "market": MARKET}, {"market": MARKET}]) as (nodes, _):
        provider, consumer = nodes
        await discovered(consumer, provider)
        peer = str(provider.host.get_id())

        # A lease on the pair's channel, still open.
        on_channel = await consumer.market.open_lease(peer, WORDS, budget=20 * WORD_PRICE, duration_s=120, channel=True)
        assert (await consumer.market.call(on_channel.lease_id, {"prompt": "one two three"})).units == 3
        (channel,) = await consumer.market.channels.list(role="consumer")
        assert channel.salt is not None

        # A per-lease open under the channel's salt: its lease id is the channel's escrow id, and the
        # "lock" it shows is the channel's (nothing new is locked).
        salts = [bytes.fromhex(channel.salt)]
        stub = SimpleNamespace(token_bytes=lambda n: salts.pop() if salts else secrets.token_bytes(n))
        monkeypatch.setattr(consumer_module, "secrets", stub)

        async def the_channel_lock(_quote: Any, escrow_id: bytes, _amount: int) -> w.EscrowLock:
            assert "0x" + escrow_id.hex() == channel.channel_id
            return w.EscrowLock(payer=channel.payer, escrow_id=channel.channel_id)

        monkeypatch.setattr(consumer.market, "_lock", the_channel_lock)
        with pytest.raises(ClawnodeError) as refused:
            await consumer.market.open_lease(peer, WORDS, budget=5 * WORD_PRICE, duration_s=60)
        monkeypatch.setattr(consumer_module, "secrets", secrets)
        derived = lease_id_for(consumer.host.get_id().to_bytes(), bytes.fromhex(channel.salt))
        assert channel.channel_id[2:] == derived.hex()
        assert (refused.value.code, refused.value.reason) == (ErrorCode.CONFLICT, "lease_is_a_channel")
        assert [view.lease_id for view in provider.market.leases()] == [on_channel.lease_id]
