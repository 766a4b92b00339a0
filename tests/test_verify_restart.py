"""A verification dispute survives the consumer's restart (issue 21): real nodes on one chain. The consumer
catches a provider that advertises one tiny model's file while it serves another, keeps the signed case
in its ledger and freezes the escrow, then stops before the case reaches the arbiter. Started again on
the same data directory, it reads the case back and sends it while the escrow is frozen; the arbiter
re-runs the check and refunds everything, no person involved.

The same when the consumer stops after the freeze landed but before its ledger wrote the dispute, and
the refund then lets the lease settle before the resolution is recorded: the restart writes the
dispute's row before sending the case, so the split is recorded all the same (it was lost before).
And when the arbiter decided but this node's chain could not show the closed escrow yet, the case is kept
(it was dropped unrecorded before) and the next start records the split."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from node.daemon import Node
from protocols.lease import arbiter as arbiter_module
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.identity import claim_identity
from tests.support.market import SharedChain, market_nodes, wait_for

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 8, "temperature": 0}
BUDGET = 10**9


def _spec(path: Path) -> ModelSpec:
    return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]


async def _escrow(node: Node, lease_id: str) -> Any:
    client = node.escrow_client
    assert client is not None
    return await trio.to_thread.run_sync(client.get, client.account.address, bytes.fromhex(lease_id))


async def _until(predicate: Any, what: str, timeout_s: float = 20) -> None:
    with trio.fail_after(timeout_s):
        while not await predicate():
            await trio.sleep(0.1)


@dataclass
class _World:
    """A provider serving a substitute for the advertised file, an arbiter holding that file, and how a
    consumer holding it too starts (again) on the same data directory."""

    shared: SharedChain
    cheat: Node
    arbiter: Node
    consumer_spec: list[dict[str, Any]]
    joined: list[Any]
    root: Path

    def consumer(self) -> AbstractAsyncContextManager[Any]:
        return market_nodes(self.consumer_spec, chain=self.shared, bootstrap=self.joined, root=self.root)

    async def caught(self, consumer: Node) -> tuple[str, ClawnodeError]:
        """The consumer's lease on the cheat, and the refusal of its first call (a failed check)."""
        consumer.market.arbiter_peer = str(self.arbiter.host.get_id())
        lease = await consumer.market.open_lease(
            str(self.cheat.host.get_id()), "model:tiny", budget=BUDGET, duration_s=60
        )
        with pytest.raises(ClawnodeError) as refused:
            await consumer.market.call(lease.lease_id, CHAT)
        return lease.lease_id, refused.value


@asynccontextmanager
async def _cheat_and_arbiter(tmp_path: Path) -> AsyncIterator[_World]:
    advertised = write_tiny_llama_gguf(tmp_path / "advertised.gguf", seed=0)
    substitute = write_tiny_llama_gguf(tmp_path / "substitute.gguf", seed=1)
    consumer_copy = write_tiny_llama_gguf(tmp_path / "consumer.gguf", seed=0)
    arbiter_copy = write_tiny_llama_gguf(tmp_path / "arbiter.gguf", seed=0)
    claim_identity(substitute, advertised)
    shared = await trio.to_thread.run_sync(SharedChain.start)
    others = [
        {"models": (_spec(substitute),)},
        {"wallet_key": shared.arbiter.key.hex(), "models": (_spec(arbiter_copy),)},
    ]
    async with market_nodes(others, chain=shared) as ((cheat, arbiter), _):
        joined = [cheat.listen_addrs()[0], arbiter.listen_addrs()[0]]
        consumer_spec = [{"models": (_spec(consumer_copy),)}]
        yield _World(shared, cheat, arbiter, consumer_spec, joined, tmp_path / "consumer")


async def test_a_consumer_that_restarts_between_the_freeze_and_the_case_sends_it_again(tmp_path: Path) -> None:
    async with _cheat_and_arbiter(tmp_path) as world:
        arbiter = world.arbiter

        # 1. Caught; the case is kept and the escrow frozen, then the consumer stops before sending it.
        async with world.consumer() as ((consumer,), _):
            market = consumer.market

            async def stopped_before_sending(case: Any, arbiter_peer: str) -> Any:
                await trio.sleep_forever()

            market._send_case = stopped_before_sending  # type: ignore[method-assign]
            lease_id, refusal = await world.caught(consumer)
            assert (refusal.reason or "").startswith("verification_")

            async def frozen() -> bool:
                return (await _escrow(consumer, lease_id)).phase == "disputed"

            await _until(frozen, "the escrow frozen")
            assert [row.lease_id for row in await consumer.ledger.dispute_cases()] == [lease_id]
        assert lease_id not in arbiter.market.lease_disputes  # the arbiter never heard of it

        # 2. Started again on the same data directory: the kept case goes to the arbiter, which refunds it all.
        async with world.consumer() as ((consumer,), _):
            assert str(consumer.host.get_id()) != str(world.cheat.host.get_id())
            assert consumer.market.arbiter_peer == ""  # not configured
            await wait_for(lambda: lease_id in arbiter.market.lease_disputes, 30, "the arbiter's decision")
            decided = arbiter.market.lease_disputes[lease_id]
            assert decided.outcome == "refund" and decided.to_payee == 0

            async def recorded() -> bool:
                disputes = {d.lease_id: d for d in await consumer.ledger.list_disputes()}
                return lease_id in disputes and disputes[lease_id].state == "dispute_resolved"

            await _until(recorded, "the consumer's ledger records the split")
            state = await _escrow(consumer, lease_id)
            assert state.phase == "closed" and state.released == 0
            mine = {d.lease_id: d for d in await consumer.ledger.list_disputes()}[lease_id]
            assert (mine.to_payee, mine.to_payer) == (0, state.amount)
            assert await consumer.ledger.dispute_cases() == []  # answered: not sent again at the next start


async def test_a_consumer_that_stops_before_writing_the_dispute_still_records_its_split(tmp_path: Path) -> None:
    async with _cheat_and_arbiter(tmp_path) as world:
        arbiter = world.arbiter

        # 1. Caught and frozen; the stop lands after the freeze, before the ledger's dispute row.
        async with world.consumer() as ((consumer,), _):
            market = consumer.market

            async def never_returns(*_args: Any, **_kwargs: Any) -> Any:
                await trio.sleep_forever()

            market._send_case = never_returns  # type: ignore[method-assign]
            market.ledger.open_dispute = never_returns  # type: ignore[method-assign]
            lease_id, _ = await world.caught(consumer)

            async def frozen() -> bool:
                return (await _escrow(consumer, lease_id)).phase == "disputed"

            await _until(frozen, "the escrow frozen")
            del market.ledger.open_dispute
            assert await consumer.ledger.disputes_of(lease_id) == []

        # 2. Started again: the refund lets the lease settle before the resolution is recorded.
        async with world.consumer() as ((consumer,), _):
            record = consumer.market._record_resolution

            async def after_the_settlement(*args: Any, **kwargs: Any) -> Any:
                with trio.move_on_after(15):
                    while (await consumer.ledger.get_lease(lease_id)).state != "lease_settled":
                        await trio.sleep(0.1)
                return await record(*args, **kwargs)

            consumer.market._record_resolution = after_the_settlement  # type: ignore[method-assign]
            await wait_for(lambda: lease_id in arbiter.market.lease_disputes, 30, "the arbiter's decision")

            async def recorded() -> bool:
                disputes = {d.lease_id: d for d in await consumer.ledger.list_disputes()}
                return lease_id in disputes and disputes[lease_id].state == "dispute_resolved"

            await _until(recorded, "the consumer's ledger records the split", 30)
            state = await _escrow(consumer, lease_id)
            mine = {d.lease_id: d for d in await consumer.ledger.list_disputes()}[lease_id]
            assert (state.phase, mine.to_payee, mine.to_payer) == ("closed", 0, state.amount)


async def test_a_decided_case_whose_split_cannot_be_read_yet_is_recorded_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(arbiter_module, "RECORD_RETRY_S", (0.1, 0.1))
    async with _cheat_and_arbiter(tmp_path) as world:
        # 1. Decided, but every read of the closed escrow fails on this node: the case is kept.
        async with world.consumer() as ((consumer,), _):
            market = consumer.market

            async def chain_unavailable(*_args: Any, **_kwargs: Any) -> bool:
                raise ClawnodeError(ErrorCode.UNAVAILABLE, "the chain did not answer")

            market._record_resolution = chain_unavailable  # type: ignore[method-assign]
            lease_id, _ = await world.caught(consumer)
            await wait_for(lambda: lease_id in market.lease_disputes, 30, "the decision reaching the consumer")
            assert [row.lease_id for row in await consumer.ledger.dispute_cases()] == [lease_id]
            [open_dispute] = await consumer.ledger.disputes_of(lease_id)
            assert open_dispute.state == "dispute_open"

        # 2. Started again: the kept case's split is recorded from the chain, and the case forgotten.
        async with world.consumer() as ((consumer,), _):

            async def recorded() -> bool:
                disputes = {d.lease_id: d for d in await consumer.ledger.list_disputes()}
                return lease_id in disputes and disputes[lease_id].state == "dispute_resolved"

            await _until(recorded, "the consumer's ledger records the split", 30)
            assert await consumer.ledger.dispute_cases() == []
            mine = {d.lease_id: d for d in await consumer.ledger.list_disputes()}[lease_id]
            assert mine.to_payee == 0
