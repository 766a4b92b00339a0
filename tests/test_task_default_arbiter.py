"""A task published with no arbiter named takes the node's own: ``escrow.arbiter_peer`` with the wallet
its escrow terms name (README: ``arbiter_wallet``? "default: the node's configured arbiter")."""

from __future__ import annotations

import pytest

from node.localnet import market_nodes
from runtime.errors import ClawnodeError
from tests.support.market import WORDS


async def test_a_task_published_without_an_arbiter_names_the_nodes_configured_one() -> None:
    async with market_nodes([{}, {}]) as (nodes, shared):
        creator, arbiter = nodes
        with pytest.raises(ClawnodeError) as refused:  # no arbiter peer configured: nothing to default to
            await creator.tasks.publish(WORDS, budget=1000, deadline_s=600)
        assert refused.value.reason == "no_arbiter"

        escrow = creator.config.escrow.model_copy(update={"arbiter_peer": str(arbiter.host.get_id())})
        creator.config = creator.config.model_copy(update={"escrow": escrow})  # as if configured so
        view = await creator.tasks.publish(WORDS, budget=1000, deadline_s=600)
        assert view.arbiter == str(arbiter.host.get_id())
        assert view.arbiter_wallet is not None and view.arbiter_wallet.lower() == shared.arbiter.address.lower()
