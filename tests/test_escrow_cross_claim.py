"""One escrow named at the same moment by a task award and a lease open on a node that both sells tasks and
provides leases: real nodes, gossip, task and lease streams, the dev chain.

A task's creator derives its lock's id from its own peer id and a salt, as a channel's (or a lease's own
lock's) is, so it can name the escrow of a payment channel it is opening with the same node. The seller's
award check asks its ledger for a lease row or a channel under that escrow, and the provider's channel check
asks it for a lease row under it; each reads before the other's row is written. Sent together, both passed:
the task's price and the channel's vouchers drew on one locked amount, and the node was paid for one of the
two. Each side kept its own in-flight set (the bidder's awards being checked, the lease market's escrow
claims), blind to the other's.

The node now keeps one claim table (``protocols.escrow_claims.EscrowClaims``) that both markets take their
claim in before any read: the second is refused at once. The window is narrow (one must reach the node
after the other's chain reads and before its row is written), so each test holds the first one's row write
until the second has its answer, and the second lands in the window every run. Both tests failed before:
both were taken.
"""

from __future__ import annotations

import os
import secrets
import time
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from pydantic import TypeAdapter

from protocols import lease_wire as lw
from protocols import task_wire as w
from protocols.lease.channels import ChannelDraw
from protocols.lease_wire import EscrowLock
from protocols.machines.lease import lease_id_for
from protocols.settings import MarketSection
from protocols.task import TASK_PROTOCOL
from protocols.task import creator as creator_module
from runtime.errors import ClawnodeError, ErrorCode
from runtime.ledger import LeaseOpen
from runtime.ledger.channels import ChannelLedger
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, discovered, market_nodes, wait_for, watching
from wire.rpc import request
from wire.signed import seal, to_base64

CAPABILITY = "model:words"
PRICE = 10 * WORD_PRICE
MARKET = MarketSection(channel_duration_s=600, channel_idle_close_s=3600, channel_margin_s=0)  # type: ignore[call-arg]
# The arbiter both nodes name (escrow.arbiter_peer, with the chain's arbiter wallet): the seller takes an award
# only under the peer id and wallet of an arbiter it trusts. No node runs it; no dispute is raised here.
ARBITER_PEER = str(ID.from_pubkey(create_new_key_pair().public_key))
NODES = [
    {"market": MARKET, "arbiter_peer": ARBITER_PEER},
    {"offers": (WORD_OFFER,), "market": MARKET, "arbiter_peer": ARBITER_PEER},
]

_ACK = TypeAdapter(w.Ack)

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")


async def _a_task_bid_on(creator: Any, seller: Any, arbiter_wallet: str) -> tuple[w.TaskView, w.BidView]:
    """The seller offers leases and watches tasks; the creator finds its offer and publishes a task (price
    ``PRICE``, under the node's arbiter) that the seller bids its price on."""
    await discovered(creator, seller)
    await watching(creator, seller, CAPABILITY)
    view = await creator.tasks.publish(
        CAPABILITY,
        PRICE,
        120,
        params="{}",
        arbiter_peer=ARBITER_PEER,
        arbiter_wallet=arbiter_wallet,
        review_timeout_s=60,
    )
    await wait_for(lambda: view.task_id in seller.tasks.book.tasks, 30, "announcement")
    return view, await seller.tasks.bid(view.task_id, PRICE)


async def test_a_task_award_and_a_channel_open_naming_one_escrow_at_once_take_it_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with market_nodes(NODES) as (nodes, shared):
        creator, seller = nodes
        view, bid = await _a_task_bid_on(creator, seller, shared.arbiter.address)

        # The provider's write of the channel row waits (5 s at most) until the award has its answer.
        writing: list[str] = []
        channel_checked, award_answered = trio.Event(), trio.Event()
        record = ChannelLedger.record

        async def held_channel_row(book: ChannelLedger, **row: Any) -> Any:
            if row.get("role") == "provider":
                writing.append(row["channel_id"])
                channel_checked.set()
                with trio.move_on_after(5):
                    await award_answered.wait()
            return await record(book, **row)

        monkeypatch.setattr(ChannelLedger, "record", held_channel_row)
        creator_client, seller_client = creator.escrow_client, seller.escrow_client
        assert creator_client is not None and seller_client is not None
        outcomes: dict[str, object] = {}

        async def channel_lease() -> None:
            try:
                outcomes["channel"] = await creator.market.open_lease(
                    str(seller.host.get_id()), WORDS, budget=50 * WORD_PRICE, duration_s=60, channel=True
                )
            except ClawnodeError as error:
                outcomes["channel"] = error

        async def award_on_the_channel() -> None:
            with trio.move_on_after(10):
                await channel_checked.wait()  # the channel's chain reads are done, its row not yet written
            try:
                channel = await ChannelLedger(creator.ledger).get(writing[0])
                notice = w.AwardNotice(
                    task_id=view.task_id,
                    bid_id=bid.bid_id,
                    creator=str(creator.host.get_id()),
                    bidder=str(seller.host.get_id()),
                    price=PRICE,
                    payee=seller_client.account.address,
                    arbiter_wallet=shared.arbiter.address,
                    chain_id=creator_client.chain.chain_id,
                    contract=creator_client.address,
                    lock=EscrowLock(payer=creator_client.account.address, escrow_id=writing[0]),
                    salt=channel.salt,  # bound to the creator's peer id, as an award's lock must be
                    awarded_at=int(time.time()),
                    announcement=creator.tasks.local[view.task_id].announcement_env or "",
                    params="{}",
                )
                envelope = to_base64(seal(notice, creator.tasks.key, domain=w.AWARD_DOMAIN, payload_type=w.AWARD_TYPE))
                message = w.AwardRequest(envelope=envelope)
                await request(creator.host, seller.host.get_id(), TASK_PROTOCOL, message, _ACK)
                outcomes["award"] = "taken"
            except ClawnodeError as error:
                outcomes["award"] = error
            finally:
                award_answered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel_lease)
            nursery.start_soon(award_on_the_channel)

        # Exactly one use of the escrow: the channel (first to claim it) is granted, the award refused.
        lease = outcomes["channel"]
        award = outcomes["award"]
        assert isinstance(lease, lw.LeaseView), outcomes
        assert isinstance(award, ClawnodeError), outcomes
        assert (award.code, award.reason) == (ErrorCode.CONFLICT, "lock_of_another_task")
        assert seller.tasks.view(view.task_id).state == "task_open"
        assert seller.tasks.view(view.task_id).role == "bidder"
        with pytest.raises(ClawnodeError) as unknown:
            await seller.ledger.get_lease(writing[0][2:])  # no task lease row under the channel's escrow
        assert unknown.value.code == ErrorCode.NOT_FOUND
        assert [row.channel_id for row in await seller.market.channels.list(role="provider")] == writing


async def test_a_channel_open_naming_the_lock_of_an_award_being_checked_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other way round: the creator locks its award under an escrow id it derived from its own peer id
    and a salt, as a channel's is, and opens a payment channel naming it while the seller checks the award.
    The seller's write of the task's lease row is held until the channel open has its answer, so the open
    lands in the window every run. Before, the channel check found no lease row and both were taken."""
    async with market_nodes(NODES) as (nodes, shared):
        creator, seller = nodes
        view, bid = await _a_task_bid_on(creator, seller, shared.arbiter.address)
        salt = os.urandom(32)
        escrow_id = "0x" + lease_id_for(creator.host.get_id().to_bytes(), salt).hex()
        stub = SimpleNamespace(token_bytes=lambda n: salt, token_hex=secrets.token_hex)
        monkeypatch.setattr(creator_module, "secrets", stub)  # the award's lock salt, as the creator picks it

        checking, channel_answered = trio.Event(), trio.Event()
        open_lease = seller.ledger.open_lease

        async def held_task_row(lease: LeaseOpen, *, idempotency_key: str) -> Any:
            if idempotency_key.startswith("award/"):
                checking.set()
                with trio.move_on_after(5):
                    await channel_answered.wait()
            return await open_lease(lease, idempotency_key=idempotency_key)

        monkeypatch.setattr(seller.ledger, "open_lease", held_task_row)

        async def on_the_award_lock(*_: Any) -> ChannelDraw:
            return ChannelDraw(escrow_id, salt.hex(), 0, PRICE)

        monkeypatch.setattr(creator.market, "draw_channel", on_the_award_lock)
        outcomes: dict[str, object] = {}

        async def award() -> None:
            try:
                outcomes["award"] = await creator.tasks.award(view.task_id, bid.bid_id)
            except ClawnodeError as error:
                outcomes["award"] = error

        async def channel_lease() -> None:
            with trio.move_on_after(10):
                await checking.wait()  # the award's chain reads are done, its lease row not yet written
            try:
                outcomes["channel"] = await creator.market.open_lease(
                    str(seller.host.get_id()), WORDS, budget=5 * WORD_PRICE, duration_s=60, channel=True
                )
            except ClawnodeError as error:
                outcomes["channel"] = error
            finally:
                channel_answered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(award)
            nursery.start_soon(channel_lease)

        channel = outcomes["channel"]
        assert isinstance(outcomes["award"], w.TaskView), outcomes
        assert isinstance(channel, ClawnodeError), outcomes
        assert (channel.code, channel.reason) == (ErrorCode.CONFLICT, "escrow_in_use")
        assert seller.tasks.view(view.task_id).role == "awarded_bidder"
        assert (await seller.ledger.get_lease(escrow_id[2:])).escrow is not None  # the task's lease row
        assert await seller.market.channels.list(role="provider") == []
        assert seller.market.leases() == []
