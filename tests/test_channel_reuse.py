"""One escrow used as both a lease's own lock and a payment channel, both ways, with real nodes and the dev chain.

A per-lease escrow's id is derived from the consumer's peer id and a salt, exactly as a channel's is.
A consumer that named the escrow of a lease it held as a payment channel had it taken by the provider's
channel check: the channel lease's vouchers started again from 0 on the lock that already carried the
first lease's vouchers, and the provider, claiming the highest voucher of the escrow, was paid for one
lease of the two it served. A consumer that named its payment channel's escrow as a per-lease lock had it
taken by the per-lease check as the new lease's own: the channel's vouchers and the per-lease claim drew on
one locked amount, and the provider was paid for only one of the two.

Both refusals read the ledger after the chain, and the per-lease check wrote its lease row only after its
own chain reads: a per-lease open and a channel open naming one escrow at the same moment both passed
(``test_a_lease_and_a_channel_opened_at_once_on_one_escrow_get_one_grant``). The provider now claims the
escrow in memory before any read (``escrow_claim_verdict``), and the second open is refused at once.
"""

from __future__ import annotations

import os
import secrets
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from protocols import lease_wire as w
from protocols.lease import consumer as consumer_module
from protocols.lease.channels import ChannelDraw
from protocols.machines.lease import lease_id_for
from protocols.settings import MarketSection
from runtime.errors import ClawnodeError, ErrorCode
from runtime.ledger import LeaseOpen
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


async def test_a_lease_and_a_channel_opened_at_once_on_one_escrow_get_one_grant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A per-lease open and a channel open naming one escrow, in flight together: one grant, one refusal.

    The window is real but narrow: the channel open must reach the provider after the per-lease open's
    chain reads and before its lease row is written. The provider's ledger write of that row is held (a
    wrapper) until the channel open has its answer, so the channel open lands in the window every run.
    Before the in-memory claim both were granted: one escrow backed two leases' vouchers.
    """
    async with market_nodes([{"offers": (WORD_OFFER,), "market": MARKET}, {"market": MARKET}]) as (nodes, _):
        provider, consumer = nodes
        await discovered(consumer, provider)
        peer = str(provider.host.get_id())
        salt = os.urandom(32)
        escrow_id = "0x" + lease_id_for(consumer.host.get_id().to_bytes(), salt).hex()
        salts = [salt]
        stub = SimpleNamespace(token_bytes=lambda n: salts.pop() if salts else secrets.token_bytes(n))
        monkeypatch.setattr(consumer_module, "secrets", stub)

        writing, channel_answered = trio.Event(), trio.Event()
        open_lease = provider.market.ledger.open_lease

        async def held_lease_row(lease: LeaseOpen, *, idempotency_key: str) -> Any:
            if lease.lease_id == escrow_id[2:]:
                writing.set()
                with trio.move_on_after(5):
                    await channel_answered.wait()
            return await open_lease(lease, idempotency_key=idempotency_key)

        monkeypatch.setattr(provider.market.ledger, "open_lease", held_lease_row)

        async def on_the_lease_escrow(*_: Any) -> ChannelDraw:
            return ChannelDraw(escrow_id, salt.hex(), 0, 50 * WORD_PRICE)

        monkeypatch.setattr(consumer.market, "draw_channel", on_the_lease_escrow)
        outcomes: dict[str, w.LeaseView | ClawnodeError] = {}

        async def per_lease() -> None:
            try:
                budget = 50 * WORD_PRICE
                outcomes["lease"] = await consumer.market.open_lease(peer, WORDS, budget=budget, duration_s=120)
            except ClawnodeError as error:
                outcomes["lease"] = error

        async def on_channel() -> None:
            with trio.move_on_after(10):
                await writing.wait()  # the per-lease open is at the provider, its lease row not yet written
            try:
                outcomes["channel"] = await consumer.market.open_lease(
                    peer, WORDS, budget=20 * WORD_PRICE, duration_s=60, channel=True
                )
            except ClawnodeError as error:
                outcomes["channel"] = error
            finally:
                channel_answered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(per_lease)
            nursery.start_soon(on_channel)

        granted = [kind for kind, outcome in outcomes.items() if isinstance(outcome, w.LeaseView)]
        refused = {kind: (o.code, o.reason) for kind, o in outcomes.items() if isinstance(o, ClawnodeError)}
        assert granted == ["lease"], outcomes
        assert refused == {"channel": (ErrorCode.CONFLICT, "escrow_in_use")}
        lease = outcomes["lease"]
        assert isinstance(lease, w.LeaseView) and lease.lease_id == escrow_id[2:]
        assert [view.lease_id for view in provider.market.leases()] == [lease.lease_id]
        assert await provider.market.channels.list(role="provider") == []
