"""A provider cannot pick the arbiter of the consumer's lock.

The arbiter decides a disputed escrow alone: a provider whose quote named a second wallet of its own
as the arbiter could dispute after the grant and resolve the whole amount to itself. The consumer
locks only under the arbiter its own node trusts (its own escrow terms'), for a lease's own escrow
and for a payment channel alike; a quote naming another is refused before any money moves."""

from __future__ import annotations

import pytest
import trio
from eth_account import Account

from node.daemon import Node
from runtime.errors import ClawnodeError, ErrorCode
from tests.support.market import WORD_OFFER, WORD_PRICE, WORDS, market_nodes


def _peer(node: Node) -> str:
    return str(node.host.get_id())


def _wallet(node: Node) -> tuple[int, int]:
    """The consumer's balance and transactions sent, as the chain says."""
    client = node.escrow_client
    assert client is not None
    eth = client.chain.w3.eth
    address = client.account.address
    return int(eth.get_balance(address)), int(eth.get_transaction_count(address))


@pytest.mark.parametrize("channel", [False, True])
async def test_a_quote_naming_the_providers_own_arbiter_locks_nothing(channel: bool) -> None:
    async with market_nodes([{"offers": (WORD_OFFER,)}, {}]) as (nodes, _shared):
        provider, consumer = nodes
        # The provider's quotes now name a wallet of its own as the escrow's arbiter (as its
        # escrow.arbiter would); the consumer trusts the network's arbiter.
        provider._arbiter = Account.create().address
        before = _wallet(consumer)
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.open_lease(
                _peer(provider), WORDS, budget=WORD_PRICE * 20, duration_s=60, channel=channel
            )
        assert caught.value.code == ErrorCode.FORBIDDEN
        assert caught.value.reason == "quote_untrusted_arbiter"
        await trio.sleep(0.5)  # a lock sent in the background would have landed by now
        # Nothing was locked or sent: the consumer's money is untouched, no lease or channel was opened.
        assert _wallet(consumer) == before
        assert consumer.market.held == {}
        assert await consumer.market.channels.list() == []
        assert await consumer.ledger.list_leases() == []

        # The same provider under the arbiter both trust again: the lease opens and locks.
        provider._arbiter = consumer._arbiter.lower()  # the case does not matter
        view = await consumer.market.open_lease(
            _peer(provider), WORDS, budget=WORD_PRICE * 20, duration_s=60, channel=channel
        )
        assert view.lease_id in consumer.market.held
        assert _wallet(consumer)[1] > before[1]
