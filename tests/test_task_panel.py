"""A ``native`` task disputed and decided by a 2-of-3 arbiter panel, with real nodes on a real anvil chain.

The task names three arbiters and a threshold of two at publication; the buyer locks the price with
the panel's wallets. The buyer rejects an honest result and disputes; every member gets the case,
re-runs the program in its own sandbox and votes with its wallet's signature (one member does not
run native programs: it abstains); the first two agreeing votes pay the seller on chain, with no
person and no single arbiter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import httpx
import pytest
import trio
from pydantic import TypeAdapter

from node.daemon import Node
from node.datadir import read_api_token
from protocols import task_wire as w
from protocols.gossip import task_topic
from protocols.machines.task import TaskState
from protocols.task import TASK_PROTOCOL
from protocols.task.panel import ZERO_WALLET
from runtime.errors import ClawnodeError
from runtime.escrow import Chain, EscrowClient
from runtime.sandbox import Limits
from runtime.sandbox.native import bwrap_available
from tests.runtime.support import anvil_process, anvil_skip_reason
from tests.support import native_programs
from tests.support.market import SharedChain, market_nodes, wait_for
from wire.rpc import request
from wire.signed import seal, to_base64

CAPABILITY = "model:native-upper"
ETH = 10**18
PRICE = ETH // 2
LIMITS = Limits(fuel=2000, memory_bytes=64 * 1024 * 1024, wall_s=5.0, output_bytes=4096, pids=8)

_skip = anvil_skip_reason() or (None if bwrap_available() else "bubblewrap is not installed")
pytestmark = [
    pytest.mark.skipif(_skip is not None, reason=_skip or ""),
    pytest.mark.usefixtures("scan_logs_for_secrets"),
]


@pytest.fixture
def anvil_chain() -> Iterator[SharedChain]:
    with anvil_process() as url:
        chain = Chain.rpc(url)
        yield SharedChain(chain, EscrowClient.deploy(chain, chain.dev_accounts()[0]))


def _peer(node: Node) -> str:
    return str(node.host.get_id())


async def test_a_native_task_disputed_is_decided_by_two_of_three_panel_votes_on_chain(
    anvil_chain: SharedChain,
) -> None:
    # The seller trusts the members (escrow.trusted_arbiters: their PEER:WALLET): a panel it could not trust is
    # refused.
    specs = [{}, {"trusts": (2, 3, 4)}, {}, {}, {}]
    async with market_nodes(specs, chain=anvil_chain) as (nodes, _):
        creator, seller, *members = nodes
        for node in (seller, members[0], members[1]):
            node.sandbox.policy = dataclasses.replace(node.sandbox.policy, kinds=frozenset({"wasm", "native"}))
        # members[2] runs wasm only: it cannot re-run a native program, so it abstains.
        await seller.tasks.watch(CAPABILITY)
        topic = task_topic(CAPABILITY)
        await wait_for(lambda: seller.host.get_id() in creator.announcements.pubsub.peer_topics.get(topic, ()), 30)
        panel = w.PanelTerms(
            members=[w.PanelMember(peer=_peer(n), wallet=n.escrow_client.account.address) for n in members],  # type: ignore[union-attr]
            threshold=2,
        )
        # A panel that is not a strict majority, or that seats a party, is refused at publication.
        for bad in (
            panel.model_copy(update={"threshold": 1}),
            w.PanelTerms(members=[w.PanelMember(peer=_peer(creator), wallet=ZERO_WALLET[:-1] + "1")], threshold=1),
        ):
            with pytest.raises(ClawnodeError) as refused:
                await creator.tasks.publish_run(
                    CAPABILITY, ETH, 120, kind="native", module=native_programs.UPPER, limits=LIMITS, panel=bad
                )
            assert refused.value.reason in ("panel_threshold", "panel_party")
        view = await creator.tasks.publish_run(
            CAPABILITY,
            ETH,
            120,
            kind="native",
            module=native_programs.UPPER,
            input=b"shout this",
            limits=LIMITS,
            review_timeout_s=60,
            panel=panel,
        )
        task_id = view.task_id
        assert view.panel == panel and view.arbiter_wallet == ZERO_WALLET
        await wait_for(lambda: task_id in seller.tasks.book.tasks, 30, "announcement")
        bid = await seller.tasks.bid(task_id, PRICE)
        awarded = await creator.tasks.award(task_id, bid.bid_id)
        # On chain: no single arbiter, the three wallets, m = 2.
        client = creator.escrow_client
        assert client is not None and awarded.escrow_id is not None
        escrow_id = bytes.fromhex(awarded.escrow_id[2:])
        state = await client.chain.run(client.get, client.account.address, escrow_id)
        assert (int(state.arbiter, 16), state.threshold) == (0, 2)
        assert [a.lower() for a in await client.chain.run(client.panel_of, client.account.address, escrow_id)] == [
            m.wallet.lower() for m in panel.members
        ]
        await wait_for(lambda: creator.tasks.view(task_id).result_state == "result_submitted", 20, "result")
        assert creator.tasks.artifact(task_id) == b"SHOUT THIS"
        await creator.tasks.review(task_id, False, "too loud")
        await creator.tasks.dispute(task_id, "too loud")

        for node in (creator, seller):
            await wait_for(lambda n=node: str(n.tasks.book.get(task_id).state) == TaskState.CLOSED, 30, "closed")  # type: ignore[misc]
            assert (node.tasks.view(task_id).to_bidder, node.tasks.view(task_id).to_creator) == (PRICE, 0)
        state = await client.chain.run(client.get, client.account.address, escrow_id)
        assert (state.phase, state.released) == ("closed", PRICE)
        # Every member voted once: two splits paying the seller, one abstention; the parties saw the votes.
        await wait_for(lambda: len(seller.tasks.view(task_id).panel_votes) == 3, 10, "votes")
        for node in (seller, *members):
            assert node.tasks.view(task_id).panel_votes == {
                panel.members[0].peer: PRICE,
                panel.members[1].peer: PRICE,
                panel.members[2].peer: None,
            }
            assert node.tasks.view(task_id).panel_state == "decided"
        # Each member's signed record of its re-run (or why it could not) is in both parties' ledgers.
        for party in (creator, seller):
            await wait_for(lambda p=party: len(p.tasks.view(task_id).evidence) == 3, 10, "records")  # type: ignore[misc]
            pieces = {e.submitted_by: e.note for e in await party.ledger.list_evidence(task_id)}
            assert set(pieces) == set(panel.peers) and "kind_not_accepted" in pieces[panel.members[2].peer]
        assert members[0].tasks.view(task_id).run_verdict == "rerun_matches"
        assert members[2].tasks.view(task_id).run_verdict == "kind_not_accepted"
        assert members[0].sandbox.stats.runs["native"] == 1

        # A vote from outside the panel, or a member changing its vote, is refused with a stable reason.
        forged = w.VoteNotice(
            task_id=task_id,
            voter=_peer(seller),
            wallet=seller.escrow_client.account.address,
            to_bidder=PRICE,
            reason="by_hand",
            voted_at=1,
        )  # type: ignore[union-attr]
        changed = w.VoteNotice(
            task_id=task_id,
            voter=_peer(members[0]),
            wallet=panel.members[0].wallet,
            to_bidder=None,
            reason="by_hand",
            voted_at=1,
        )
        for author, notice, reason in ((seller, forged, "not_on_panel"), (members[0], changed, "vote_final")):
            envelope = to_base64(seal(notice, author.tasks.key, domain=w.VOTE_DOMAIN, payload_type=w.VOTE_TYPE))
            with pytest.raises(ClawnodeError) as refused:
                await request(
                    author.host,
                    creator.host.get_id(),
                    TASK_PROTOCOL,
                    w.VoteRequest(envelope=envelope),
                    TypeAdapter(w.Ack),
                    max_frame=w.MAX_TASK_FRAME,
                )
            assert refused.value.reason == reason
        # By hand, through the API (a panel whose task asks for a person): only a member may vote.
        token = await trio.to_thread.run_sync(read_api_token, seller.data_dir)
        async with httpx.AsyncClient(timeout=10) as http:
            reply = await http.post(
                f"{seller.api_url}/api/tasks/{task_id}/vote",
                json={"to_bidder": 0},
                headers={"authorization": f"Bearer {token}"},
            )
        assert reply.status_code == 403 and "not_on_panel" in reply.text
