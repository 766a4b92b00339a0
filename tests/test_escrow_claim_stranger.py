"""A stranger naming a buyer's escrow cannot hold the provider's claim on it: real nodes, lease streams, the dev chain.

The provider claims the escrow an open names in memory before its chain reads (``escrow_claim_verdict``), so
that two opens naming one escrow cannot both pass. The claim used to be taken before the check that the
escrow is the sender's at all (its id is ``lease_id_for(sender, salt)``), which ran only after the reads.
A stranger who saw a buyer's lock on chain could send opens naming it back to back and hold the claim while
its reads ran: the buyer's own open was refused ``E_CONFLICT escrow_in_use`` (on a channel: ``channel_busy``),
the buyer gave the open up as final, and its money stayed locked until deadline + window; and a stranger's
refused open on an idle channel started the channel's idle clock again (the provider claims and closes a
channel only once it has been idle a while), so opens sent back to back kept it from closing. The binding is
now asked first (``escrow_bound_verdict``, a pure check), so the stranger is refused before any claim or
read, and the buyer's open at the same moment is granted.

The window is the stranger's chain reads: each test holds the provider's read for an open sent while the
buyer's open has not left yet (until the buyer's open has its answer, 5 s at most), and sends the buyer's
open only once the stranger's is held there or answered, so the two meet every run. Both tests failed
before the fix: the buyer's open was refused and the stranger's held the claim.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from dht.records import bind_wallet
from node.daemon import Node
from protocols import lease_wire as w
from protocols.confirmed import confirmed_lock
from protocols.escrow_claims import EscrowClaims
from protocols.lease import channels as channels_module
from protocols.lease import provider as provider_module
from protocols.lease.base import GRANT_REPLY, LEASE_PROTOCOL, QUOTE_REPLY
from protocols.settings import MarketSection
from runtime.errors import ClawnodeError, ErrorCode
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, discovered, market_nodes, wait_for
from wire.rpc import request
from wire.signed import open_base64, seal, to_base64

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")

MARKET = MarketSection(channel_duration_s=600, channel_idle_close_s=3600, channel_margin_s=0)  # type: ignore[call-arg]
SPECS: list[dict[str, Any]] = [{"offers": (WORD_OFFER,), "market": MARKET}, {"market": MARKET}, {"market": MARKET}]


async def _stranger_open(stranger: Node, provider: Node, lock: w.EscrowLock, lease_id: str, base: int | None) -> None:
    """The stranger's own quote, its own wallet bound to its peer id, a fresh salt, and the buyer's lock."""
    peer = provider.host.get_id()
    asked = w.QuoteRequest(capability=WORDS, expected_units=10, duration_s=60)
    quote = await request(stranger.host, peer, LEASE_PROTOCOL, asked, QUOTE_REPLY)
    assert stranger.escrow_client is not None
    opening = w.LeaseOpen(
        quote=quote.envelope,
        lease_id=lease_id,
        budget=5 * WORD_PRICE,
        mode="escrow",
        lock=lock,
        wallet=bind_wallet(bytes(stranger.escrow_client.account.key), str(stranger.host.get_id())),
        salt=os.urandom(32).hex(),
        channel_base=base,
    )
    envelope = seal(opening, stranger.market.key, domain=w.OPEN_DOMAIN, payload_type=w.OPEN_TYPE)
    await request(stranger.host, peer, LEASE_PROTOCOL, w.OpenRequest(envelope=to_base64(envelope)), GRANT_REPLY)


class _Race:
    """Holds the provider's chain read of an open that arrives before the buyer's open leaves, and sends the
    buyer's open once the stranger's is held there (or already answered)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, buyer: Node) -> None:
        self.armed = False
        self.stranger_there = trio.Event()
        self.buyer_answered = trio.Event()
        self.stranger: ClawnodeError | str | None = None
        self.claims: list[str] = []

        async def held_read(client: Any, payer: str, escrow_id: bytes) -> Any:
            if self.armed:  # the stranger's open: the buyer's has not left yet
                self.stranger_there.set()
                with trio.move_on_after(5):
                    await self.buyer_answered.wait()
            return await confirmed_lock(client, payer, escrow_id)

        monkeypatch.setattr(provider_module, "confirmed_lock", held_read)
        monkeypatch.setattr(channels_module, "confirmed_lock", held_read)
        claim = EscrowClaims.claim

        def counted(table: EscrowClaims, escrow_id: str, *args: Any, **kwargs: Any) -> bool:
            self.claims.append(escrow_id)
            return claim(table, escrow_id, *args, **kwargs)

        monkeypatch.setattr(EscrowClaims, "claim", counted)
        self.ask = buyer.market._ask_grant
        monkeypatch.setattr(buyer.market, "_ask_grant", self._ask_grant)
        self.attack: Callable[[w.OpenRequest], Awaitable[None]] | None = None

    async def _ask_grant(self, peer: Any, message: w.OpenRequest) -> w.GrantReply:
        if self.attack is None:
            return await self.ask(peer, message)
        attack, self.attack = self.attack, None

        async def stranger() -> None:
            try:
                await attack(message)
                self.stranger = "granted"
            except ClawnodeError as error:
                self.stranger = error
            finally:
                self.stranger_there.set()

        async with trio.open_nursery() as nursery:
            self.armed = True  # the buyer's lock is on chain now: the stranger names it
            nursery.start_soon(stranger)
            with trio.move_on_after(10):
                await self.stranger_there.wait()
            self.armed = False
            try:
                return await self.ask(peer, message)
            finally:
                self.buyer_answered.set()


async def test_a_stranger_naming_a_buyers_lock_is_refused_before_it_can_hold_the_buyers_open_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with market_nodes(SPECS) as (nodes, _):
        provider, buyer, stranger = nodes
        await discovered(buyer, provider)
        await discovered(stranger, provider)
        race = _Race(monkeypatch, buyer)

        async def name_the_buyers_lock(message: w.OpenRequest) -> None:
            _, payload = open_base64(message.envelope, domain=w.OPEN_DOMAIN, payload_type=w.OPEN_TYPE)
            opening = w.LeaseOpen.model_validate_json(payload)
            assert opening.lock is not None
            await _stranger_open(stranger, provider, opening.lock, opening.lease_id, None)

        race.attack = name_the_buyers_lock
        lease = await buyer.market.open_lease(str(provider.host.get_id()), WORDS, budget=20 * WORD_PRICE, duration_s=60)

        refused = race.stranger
        assert isinstance(refused, ClawnodeError), refused
        assert (refused.code, refused.reason) == (ErrorCode.FORBIDDEN, "lease_id_not_bound")
        escrow_id = "0x" + lease.lease_id
        assert race.claims == [escrow_id], "the stranger's open claimed nothing: only the buyer's did"
        held = provider.market.escrow_claims.get(escrow_id)
        assert held is not None and (held.held_as, held.holder, held.checking) == ("lease", lease.lease_id, False)
        assert [view.lease_id for view in provider.market.leases()] == [lease.lease_id]
        assert (await buyer.market.call(lease.lease_id, {"prompt": "one two three"})).units == 3


async def test_a_stranger_naming_a_buyers_idle_channel_neither_busies_nor_touches_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with market_nodes(SPECS) as (nodes, _):
        provider, buyer, stranger = nodes
        await discovered(buyer, provider)
        await discovered(stranger, provider)
        peer = str(provider.host.get_id())
        first = await buyer.market.open_lease(peer, WORDS, budget=20 * WORD_PRICE, duration_s=60, channel=True)
        assert (await buyer.market.call(first.lease_id, {"prompt": "one two three"})).units == 3
        await buyer.market.revoke(first.lease_id)
        (channel,) = await buyer.market.channels.list(role="consumer")
        await wait_for(lambda: channel.channel_id not in provider.market._channel_served)
        lock = w.EscrowLock(payer=channel.payer, escrow_id=channel.channel_id)

        # At the same moment as the buyer's next lease on the idle channel: the buyer's is granted.
        race = _Race(monkeypatch, buyer)

        async def name_the_buyers_channel(_message: w.OpenRequest) -> None:
            await _stranger_open(stranger, provider, lock, secrets.token_hex(32), 0)

        race.attack = name_the_buyers_channel
        second = await buyer.market.open_lease(peer, WORDS, budget=20 * WORD_PRICE, duration_s=60, channel=True)
        refused = race.stranger
        assert isinstance(refused, ClawnodeError), refused
        assert (refused.code, refused.reason) == (ErrorCode.FORBIDDEN, "channel_not_bound")
        assert race.claims == [channel.channel_id], "only the buyer's lease asked for the channel"
        assert (await buyer.market.call(second.lease_id, {"prompt": "four five"})).units == 2
        await buyer.market.revoke(second.lease_id)
        await wait_for(lambda: channel.channel_id not in provider.market._channel_served)

        # Alone, on the idle channel: refused at once, and the channel's idle clock (after which the provider
        # claims and closes it) is not started again.
        before = (await provider.market.channels.get(channel.channel_id)).last_used_at
        await trio.sleep(1.1)  # the ledger's clock counts whole seconds: a touch now would show
        with pytest.raises(ClawnodeError) as alone:
            await _stranger_open(stranger, provider, lock, secrets.token_hex(32), 0)
        assert (alone.value.code, alone.value.reason) == (ErrorCode.FORBIDDEN, "channel_not_bound")
        await trio.sleep(0.3)  # a touch the refusal spawned would have landed
        assert (await provider.market.channels.get(channel.channel_id)).last_used_at == before
