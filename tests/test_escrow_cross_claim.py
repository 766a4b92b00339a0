"""One escrow named at the same moment by a task award and a lease open on a node that both sells tasks and
provides leases: real nodes, gossip, task and lease streams, the dev chain.

A task's creator picks its lock's id freely, so it can name the escrow of a payment channel (or of a lease's
own lock) it is opening with the same node. The seller's award check asks its ledger for a lease row or a
channel under that escrow, and the provider's channel check asks it for a lease row under it; each reads
before the other's row is written. Sent together, both passed: the task's price and the channel's vouchers
drew on one locked amount, and the node was paid for one of the two. Each side kept its own in-flight set
(the bidder's awards being checked, the lease market's escrow claims), blind to the other's.

The node now keeps one claim table (``protocols.escrow_claims.EscrowClaims``) that both markets take their
claim in before any read: the second is refused at once. The window is narrow (the award must reach the
seller after the channel check's chain reads and before its channel row is written), so the test holds the
provider's channel-row write until the award has its answer, and the award lands in the window every run.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from pydantic import TypeAdapter

from dht.discovery import DiscoveryQuery
from protocols import lease_wire as lw
from protocols import task_wire as w
from protocols.gossip import task_topic
from protocols.lease_wire import EscrowLock
from protocols.settings import MarketSection
from protocols.task import TASK_PROTOCOL
from runtime.errors import ClawnodeError, ErrorCode
from runtime.ledger.channels import ChannelLedger
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes, wait_for
from wire.rpc import request
from wire.signed import seal, to_base64

CAPABILITY = "model:words"
MARKET = MarketSection(channel_duration_s=600, channel_idle_close_s=3600, channel_margin_s=0)  # type: ignore[call-arg]

_ACK = TypeAdapter(w.Ack)

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")


async def test_a_task_award_and_a_channel_open_naming_one_escrow_at_once_take_it_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with market_nodes([{"market": MARKET}, {"offers": (WORD_OFFER,), "market": MARKET}]) as (nodes, shared):
        creator, seller = nodes
        await seller.tasks.watch(CAPABILITY)
        await wait_for(lambda: seller.publisher.record is not None)
        with trio.fail_after(30):
            while not await creator.discover(DiscoveryQuery(capability=WORDS)):
                await trio.sleep(0.2)
        topic = task_topic(CAPABILITY)
        await wait_for(lambda: seller.host.get_id() in creator.announcements.pubsub.peer_topics.get(topic, ()), 30)
        view = await creator.tasks.publish(
            CAPABILITY,
            10 * WORD_PRICE,
            120,
            params="{}",
            arbiter_peer=str(ID.from_pubkey(create_new_key_pair().public_key)),
            arbiter_wallet=shared.arbiter.address,
            review_timeout_s=60,
        )
        await wait_for(lambda: view.task_id in seller.tasks.book.tasks, 30, "announcement")
        bid = await seller.tasks.bid(view.task_id, 10 * WORD_PRICE)

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
                notice = w.AwardNotice(
                    task_id=view.task_id,
                    bid_id=bid.bid_id,
                    creator=str(creator.host.get_id()),
                    bidder=str(seller.host.get_id()),
                    price=10 * WORD_PRICE,
                    payee=seller_client.account.address,
                    arbiter_wallet=shared.arbiter.address,
                    chain_id=creator_client.chain.chain_id,
                    contract=creator_client.address,
                    lock=EscrowLock(payer=creator_client.account.address, escrow_id=writing[0]),
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
