"""Two homes on the shipped defaults trade a task under the network's arbiter, as the profile names it.

A bootstrap serving its development chain holds the arbiter wallet and names its own peer id beside
it in the network profile (``arbiter_peer``, on ``/clawnode/network/1.1.0``); a node on
``escrow.mode = "auto"`` with no ``escrow.arbiter_peer`` of its own takes that pair as its arbiter.
Before, such a node knew the wallet alone: a task published without an arbiter was refused
``no_arbiter``, and a seller refused a single-arbiter award ``no_trusted_arbiter``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from pydantic import TypeAdapter, ValidationError

from bootstrap.network import (
    NETWORK_PROTOCOL,
    NETWORK_PROTOCOL_V1,
    NetworkProfile,
    NetworkProfileV1,
    ProfileReplyV1,
    ProfileRequest,
    ask_profile,
)
from node.config import ApiSection, BootstrapSection, Config, EscrowSection, NodeSection
from node.daemon import Node
from tests.support.market import WORDS, wait_for, watching
from wire.rpc import request

BUDGET = 10**15
CONTRACT = "0x" + "ab" * 20
WALLET = "0x" + "cd" * 20
_OLD_REPLY = TypeAdapter(ProfileReplyV1)
PEER = "12D3KooWRGkfSrypHaoQxJNTqZM6PGuxJFgmYDsxenCPAMG3MzKq"


def test_the_profile_names_the_arbiters_peer_id_only_as_a_peer_id_beside_its_wallet() -> None:
    profile = NetworkProfile(chain="eip155:4294967297", contract=CONTRACT, arbiter=WALLET, arbiter_peer=PEER)
    assert profile.arbiter_pair(WALLET.upper().replace("0X", "0x")) == (PEER, WALLET.upper().replace("0X", "0x"))
    assert profile.arbiter_pair("0x" + "ef" * 20) is None  # escrow.arbiter names another wallet: not its peer
    assert NetworkProfile(chain="eip155:4294967297", contract=CONTRACT, arbiter=WALLET).arbiter_pair(WALLET) is None
    # The old shape, for a 1.0.0 asker: the same profile less the field its nodes refuse.
    old = profile.v1()
    assert type(old) is NetworkProfileV1 and "arbiter_peer" not in old.model_dump_json()
    assert old.model_dump() == profile.model_dump(exclude={"arbiter_peer"})
    with pytest.raises(ValidationError):
        NetworkProfileV1.model_validate_json(profile.model_dump_json())  # what a node before 1.1.0 does with it
    for bad in ("1" * 46, "z" * 46, PEER[:-1], PEER + "x", "0x" + "ab" * 20):
        with pytest.raises(ValidationError):
            NetworkProfile(chain="eip155:4294967297", contract=CONTRACT, arbiter=WALLET, arbiter_peer=bad)
    with pytest.raises(ValidationError):  # a peer id with no wallet names nothing to trust
        NetworkProfile(chain="eip155:4294967297", contract=CONTRACT, arbiter_peer=PEER)


def _config(role: str, bootstrap: list[str]) -> Config:
    """The shipped escrow defaults (mode auto, no arbiter or arbiter_peer), on loopback, settling quickly."""
    return Config(
        node=NodeSection(listen=["/ip4/127.0.0.1/tcp/0"], role=role),  # type: ignore[call-arg, arg-type]
        api=ApiSection(port=0),
        bootstrap=BootstrapSection(peers=bootstrap, use_defaults=False),
        escrow=EscrowSection(settle_interval_s=0.5, dispute_window_s=5),  # type: ignore[call-arg]
    )


def _ready(node: Node) -> bool:
    return node.escrow_client is not None and node.settlement_queue is not None


@pytest.mark.usefixtures("scan_logs_for_secrets")  # no data dir path reaches a log line
async def test_two_nodes_on_the_defaults_trade_a_task_their_bootstrap_arbitrates(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        boot = Node(_config("bootstrap", []), tmp_path / "bootstrap")
        await nursery.start(boot.run)
        joined_through = [str(boot.listen_addrs()[0])]
        creator = Node(_config("node", joined_through), tmp_path / "creator")
        seller = Node(_config("node", joined_through), tmp_path / "seller")
        await nursery.start(creator.run)
        await nursery.start(seller.run)
        for node in (boot, creator, seller):
            await wait_for(lambda n=node: _ready(n), 60, "escrow")  # type: ignore[misc]
        boot_peer, boot_wallet = str(boot.host.get_id()), boot.escrow_client.account.address
        for node in (creator, seller):
            assert node.config.escrow.arbiter_peer == "" and node.network is not None
            assert node.network.state == "joined" and node.network.profile is not None
            assert node.network.profile.arbiter_peer == boot_peer  # the profile names the bootstrap as its holder
            assert node.network_view().arbiter_peer == boot_peer  # GET /api/network, `clawnode network`

        # A node before 1.1.0 asks on 1.0.0 and reads the profile in the shape it knows.
        old = await request(creator.host, boot.host.get_id(), NETWORK_PROTOCOL_V1, ProfileRequest(), _OLD_REPLY)
        assert old.profile is not None and old.profile.arbiter == boot_wallet

        await watching(creator, seller, WORDS)
        view = await creator.tasks.publish(WORDS, BUDGET, 120, params='{"prompt": "one two three"}')
        assert view.arbiter == boot_peer and view.arbiter_wallet == boot_wallet  # none named: the network's
        await wait_for(lambda: view.task_id in seller.tasks.book.tasks, 30, "announcement")
        bid = await seller.tasks.bid(view.task_id, BUDGET // 2)
        awarded = await creator.tasks.award(view.task_id, bid.bid_id)  # the seller takes it: a pair it trusts
        assert awarded.state == "task_awarded" and seller.tasks.view(view.task_id).state == "task_awarded"

        # The bootstrap holds the arbiter wallet and takes the case as the peer the profile names.
        await seller.tasks.submit(view.task_id, b"three")
        await creator.tasks.review(view.task_id, False, "not what I asked for")
        await wait_for(lambda: seller.tasks.view(view.task_id).result_state == "result_rejected", 10, "review")
        await seller.tasks.dispute(view.task_id, "it is exactly what was asked")
        await wait_for(lambda: view.task_id in boot.tasks.book.tasks, 10, "the case at the bootstrap")
        assert boot.tasks.view(view.task_id).role == "arbiter"
        resolved = await boot.tasks.resolve(view.task_id, BUDGET // 2)
        assert resolved.dispute_state == "dispute_resolved"
        await wait_for(lambda: seller.tasks.view(view.task_id).dispute_state == "dispute_resolved", 10, "ruling")

        # A node before 1.1.0 serves 1.0.0 alone: a new node asking it gets the profile, with no peer id.
        boot.host.remove_stream_handler(NETWORK_PROTOCOL)
        older = await ask_profile(creator.host, boot.host.get_id())
        assert older is not None and older.arbiter == boot_wallet and older.arbiter_peer is None
        nursery.cancel_scope.cancel()
