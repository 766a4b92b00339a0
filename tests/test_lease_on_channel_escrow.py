"""A consumer that names its payment channel's escrow as a per-lease lock, with real nodes and the dev chain.

A channel's escrow id is derived from the consumer's peer id and a salt, exactly as a per-lease escrow's
is, so the provider's per-lease check took the channel's lock as the new lease's own: the consumer's
vouchers on the channel and the per-lease claim then drew on one locked amount, and the provider was paid
for only one of the two.
"""

from __future__ import annotations

import secrets
from types import SimpleNamespace
from typing import Any

import pytest

from protocols import lease_wire as w
from protocols.lease import consumer as consumer_module
from protocols.machines.lease import lease_id_for
from protocols.settings import MarketSection
from runtime.errors import ClawnodeError, ErrorCode
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, discovered, market_nodes

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

MARKET = MarketSection(  # type: ignore[call-arg]
    receipt_every_units=10, receipt_every_s=2, channel_duration_s=600, channel_idle_close_s=3600, channel_margin_s=0
)


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
