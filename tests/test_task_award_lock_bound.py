"""A task award naming a buyer's lease lock: real nodes (a creator, a seller offering words, a buyer), gossip,
task and lease streams, the dev chain.

A buyer's lease lock for a seller pays the seller's wallet under the seller's arbiter, for the seller's
window, and holds at least a task's price, so every check of an award's lock passed for it. A creator with
one bid from the seller could award the task naming the buyer's lock (sent just before the buyer's open):
the seller took it, wrote the task's lease row under the buyer's escrow (consumer: the creator), and
refused the buyer's own open ``lease_exists`` for good; the buyer's money stood behind the creator's task.

An award's lock id is now derived from the creator's peer id and a salt the award carries, as a lease's is
from its consumer's: the seller refuses any other lock at once (``lock_not_bound``), before it claims the
escrow or reads the chain, and the buyer's open is granted.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from pydantic import TypeAdapter

from protocols import lease_wire as lw
from protocols import task_wire as w
from protocols.lease_wire import EscrowLock
from protocols.machines.lease_provider import lease_id_for
from protocols.machines.task_checks import award_lock_bound_verdict
from protocols.settings import MarketSection
from protocols.task import TASK_PROTOCOL
from runtime.errors import ClawnodeError, ErrorCode
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, discovered, market_nodes, wait_for, watching
from wire.rpc import request
from wire.signed import open_base64, seal, to_base64

CAPABILITY = "model:words"
PRICE = 10 * WORD_PRICE
MARKET = MarketSection(channel_duration_s=600, channel_idle_close_s=3600, channel_margin_s=0)  # type: ignore[call-arg]

_ACK = TypeAdapter(w.Ack)

pytestmark = pytest.mark.usefixtures("scan_logs_for_secrets")


async def test_an_award_naming_a_buyers_lease_lock_is_refused_and_the_buyers_open_is_granted() -> None:
    # The seller trusts the task's arbiter (escrow.arbiter_peer with the chain's arbiter wallet): it bids, and
    # only the lock's binding can refuse the award.
    arbiter_peer = str(ID.from_pubkey(create_new_key_pair().public_key))
    seller_spec = {"offers": (WORD_OFFER,), "market": MARKET, "arbiter_peer": arbiter_peer}
    specs: list[dict[str, Any]] = [{"market": MARKET}, seller_spec, {"market": MARKET}]
    async with market_nodes(specs) as (nodes, shared):
        creator, seller, buyer = nodes
        await discovered(creator, seller)
        await watching(creator, seller, CAPABILITY)
        view = await creator.tasks.publish(
            CAPABILITY,
            PRICE,
            60,
            params="{}",
            arbiter_peer=arbiter_peer,
            arbiter_wallet=shared.arbiter.address,
            review_timeout_s=30,
        )
        await wait_for(lambda: view.task_id in seller.tasks.book.tasks, 30, "announcement")
        bid = await seller.tasks.bid(view.task_id, PRICE)
        await discovered(buyer, seller)
        creator_client, seller_client = creator.escrow_client, seller.escrow_client
        assert creator_client is not None and seller_client is not None
        seen: dict[str, Any] = {}
        ask = buyer.market._ask_grant

        async def award_first(peer: Any, message: Any) -> Any:
            """The buyer's lock is on chain, its open not yet sent: the creator awards the task on it first,
            with the buyer's own salt (the best guess it could make)."""
            _, payload = open_base64(message.envelope, domain=lw.OPEN_DOMAIN, payload_type=lw.OPEN_TYPE)
            opening = lw.LeaseOpen.model_validate_json(payload)
            assert opening.lock is not None
            seen["escrow_id"] = opening.lock.escrow_id
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
                lock=EscrowLock(payer=opening.lock.payer, escrow_id=opening.lock.escrow_id),
                salt=opening.salt,
                awarded_at=int(time.time()),
                announcement=creator.tasks.local[view.task_id].announcement_env or "",
                params="{}",
            )
            envelope = to_base64(seal(notice, creator.tasks.key, domain=w.AWARD_DOMAIN, payload_type=w.AWARD_TYPE))
            try:
                message_ = w.AwardRequest(envelope=envelope)
                await request(creator.host, seller.host.get_id(), TASK_PROTOCOL, message_, _ACK)
                seen["award"] = "taken"
            except ClawnodeError as error:
                seen["award"] = (error.code, error.reason)
            return await ask(peer, message)

        buyer.market._ask_grant = award_first  # type: ignore[method-assign]
        lease = await buyer.market.open_lease(str(seller.host.get_id()), WORDS, budget=50 * WORD_PRICE, duration_s=600)

        assert seen["award"] == (ErrorCode.FORBIDDEN, "lock_not_bound")
        assert "0x" + lease.lease_id == seen["escrow_id"]
        assert seller.tasks.view(view.task_id).state == "task_open"
        row = await seller.ledger.get_lease(lease.lease_id)
        assert row.consumer == str(buyer.host.get_id())  # the buyer's lease, not the creator's task


def test_the_award_lock_binding_takes_only_the_creators_own_lock_id() -> None:
    creator, buyer = (ID.from_pubkey(create_new_key_pair().public_key).to_bytes() for _ in range(2))
    salt = bytes(range(32))
    own, buyers = ("0x" + lease_id_for(peer, salt).hex() for peer in (creator, buyer))
    assert award_lock_bound_verdict(creator, salt.hex(), own) is None
    for named_salt, escrow_id in ((salt.hex(), buyers), (None, own), ("00" * 32, own)):
        refusal = award_lock_bound_verdict(creator, named_salt, escrow_id)
        assert refusal is not None and (refusal.code, refusal.reason) == (ErrorCode.FORBIDDEN, "lock_not_bound")
