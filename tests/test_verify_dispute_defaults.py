"""A cheat caught on the shipped defaults is refunded in full by the network's arbiter (issue 21).

A bootstrap serving its development chain holds the arbiter wallet and names its own peer id beside
it in the network profile (``/clawnode/network/1.1.0``). A consumer and a provider on
``escrow.mode = "auto"`` with no ``escrow.arbiter_peer`` take that peer as their lease arbiter too:
the consumer sends its verification dispute case there, the provider shows its receipts to it and
believes its outcomes. Before, the lease market read ``escrow.arbiter_peer`` alone, so on the
defaults a consumer that caught a provider serving another model than it advertises ended the lease
without a dispute, and got back no more than the chain's deadline gives.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from node.config import ApiSection, BootstrapSection, Config, EscrowSection, NodeSection
from node.daemon import Node
from runtime.errors import ClawnodeError
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.identity import claim_identity
from tests.support.market import wait_for

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 12, "temperature": 0}
BUDGET = 10**9


def _config(role: str, bootstrap: list[str], model: Path) -> Config:
    """The shipped escrow defaults (mode auto, no arbiter, no arbiter_peer), on loopback, serving ``model``."""
    spec = ModelSpec(name="tiny", path=str(model), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]
    return Config(
        node=NodeSection(listen=["/ip4/127.0.0.1/tcp/0"], role=role),  # type: ignore[call-arg, arg-type]
        api=ApiSection(port=0),
        bootstrap=BootstrapSection(peers=bootstrap, use_defaults=False),
        escrow=EscrowSection(settle_interval_s=0.5, dispute_window_s=5),  # type: ignore[call-arg]
        models=[spec],
    )


def _ready(node: Node) -> bool:
    return node.escrow_client is not None and node.settlement_queue is not None


async def _escrow(node: Node, lease_id: str) -> Any:
    client = node.escrow_client
    assert client is not None
    return await trio.to_thread.run_sync(client.get, client.account.address, bytes.fromhex(lease_id))


async def test_a_cheat_caught_on_the_defaults_is_refunded_in_full_by_the_networks_arbiter(tmp_path: Path) -> None:
    advertised = write_tiny_llama_gguf(tmp_path / "advertised.gguf", seed=0)  # the bootstrap's: it is the arbiter
    substitute = write_tiny_llama_gguf(tmp_path / "substitute.gguf", seed=1)
    consumer_copy = write_tiny_llama_gguf(tmp_path / "consumer.gguf", seed=0)  # what the consumer checks with
    # The cheat: its record (and every commitment it signs) states the advertised file's sha256.
    claim_identity(substitute, advertised)

    async with trio.open_nursery() as nursery:
        boot = Node(_config("bootstrap", [], advertised), tmp_path / "bootstrap")
        await nursery.start(boot.run)
        joined_through = [str(boot.listen_addrs()[0])]
        cheat = Node(_config("node", joined_through, substitute), tmp_path / "cheat")
        consumer = Node(_config("node", joined_through, consumer_copy), tmp_path / "consumer")
        await nursery.start(cheat.run)
        await nursery.start(consumer.run)
        for node in (boot, cheat, consumer):
            await wait_for(lambda n=node: _ready(n), 60, "escrow")  # type: ignore[misc]
        boot_peer = str(boot.host.get_id())
        for node in (cheat, consumer):
            assert node.config.escrow.arbiter_peer == ""  # nothing configured: the profile names the arbiter
        assert cheat.model_host.sha256s["tiny"] == boot.model_host.sha256s["tiny"]  # it advertises the real file

        # Caught on its first call: the escrow is frozen, the case reaches the bootstrap, which re-runs the
        # check on its own copy of the advertised file and refunds everything locked.
        lease = await consumer.market.open_lease(str(cheat.host.get_id()), "model:tiny", budget=BUDGET, duration_s=60)
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.call(lease.lease_id, CHAT)
        assert (caught.value.reason or "").startswith("verification_")
        lease_id = lease.lease_id

        with trio.move_on_after(10):  # the freeze: without an arbiter peer the escrow stays as it was locked
            while (phase := (await _escrow(consumer, lease_id)).phase) == "active":
                await trio.sleep(0.1)
        assert phase in ("disputed", "closed"), f"no dispute was opened (escrow {phase})"
        await wait_for(lambda: lease_id in consumer.market.lease_disputes, 20, "the arbiter's decision")
        assert lease_id in boot.market.lease_disputes  # the network's arbiter decided it
        decided = consumer.market.lease_disputes[lease_id]
        assert decided.outcome == "refund" and decided.to_payee == 0 and decided.tx_hash
        state = await _escrow(consumer, lease_id)
        assert state.phase == "closed" and state.released == 0  # everything locked went back
        mine = {d.lease_id: d for d in await consumer.ledger.list_disputes()}[lease_id]
        assert mine.state == "dispute_resolved" and (mine.to_payee, mine.to_payer) == (0, state.amount)

        async def provider_recorded() -> bool:
            theirs = {d.lease_id: d for d in await cheat.ledger.list_disputes()}
            return lease_id in theirs and theirs[lease_id].state == "dispute_resolved"

        with trio.fail_after(10):  # the provider believed the outcome of the arbiter the profile names
            while not await provider_recorded():
                await trio.sleep(0.1)

        # Read when needed: a profile that changes (a bootstrap restarted with a fresh chain) is followed,
        # a node that lost its chain knows no arbiter peer, and a value set by hand still wins.
        assert consumer.market.arbiter_peer == cheat.market.arbiter_peer == boot_peer
        network = consumer.network
        assert network is not None and network.profile is not None
        fresh = network.profile.model_copy(update={"arbiter_peer": str(cheat.host.get_id())})
        network.profile = fresh
        assert consumer.market.arbiter_peer == str(cheat.host.get_id())
        network.forget()
        assert consumer.market.arbiter_peer == ""
        consumer.market.arbiter_peer = boot_peer
        assert consumer.market.arbiter_peer == boot_peer
        nursery.cancel_scope.cancel()
