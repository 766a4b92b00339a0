"""Verified inference's dispute, end to end (issue 21): real nodes, a real lease escrow on the shared chain.
A provider whose record states one GGUF file's sha256 while it serves another is caught on its first
call; the consumer freezes the escrow and sends the signed evidence to the escrow's arbiter, which
re-runs the check on its own copy of the advertised file and resolves on chain: everything locked goes
back to the consumer, no person involved, and both ledgers record the split; its lease ends and
nothing more is bought on it. The router never picks the cheat again and `clawnode find` shows it
failed; an honest provider on another build (other thread count) is never flagged, and a
consumer that disputes its honest call anyway pays it what it countersigned. An arbiter without the file says
so and leaves the escrow frozen for a person. A proof signed for another file than the record states
(model_mismatch) is disputed only when the call does not fit the file the proof names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from click.testing import CliRunner

from node.cli import main
from node.daemon import Node
from runtime.errors import ClawnodeError
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.identity import claim_identity
from tests.support.market import SharedChain, market_nodes, ranked_once_listed, wait_for

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 12, "temperature": 0}
BUDGET = 10**9


def _spec(path: Path, threads: int = 1) -> ModelSpec:
    return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=threads, n_ctx=256)  # type: ignore[call-arg]


async def _escrow(node: Node, lease_id: str) -> Any:
    client = node.escrow_client
    assert client is not None
    return await trio.to_thread.run_sync(client.get, client.account.address, bytes.fromhex(lease_id))


def ended_lease(consumer: Node, lease_id: str) -> Any:
    return lambda: any(v.lease_id == lease_id and v.state != "active" for v in consumer.market.leases())


async def _caught(consumer: Node, provider_id: str) -> str:
    lease = await consumer.market.open_lease(provider_id, "model:tiny", budget=BUDGET, duration_s=60)
    with pytest.raises(ClawnodeError) as caught:
        await consumer.market.call(lease.lease_id, CHAT)
    assert caught.value.reason is not None and caught.value.reason.startswith("verification_")
    return lease.lease_id


async def test_a_substitute_is_refunded_in_full_by_the_arbiter_and_an_honest_build_is_never_flagged(
    tmp_path: Path,
) -> None:
    advertised = write_tiny_llama_gguf(tmp_path / "advertised.gguf", seed=0)
    substitute = write_tiny_llama_gguf(tmp_path / "substitute.gguf", seed=1)
    honest = write_tiny_llama_gguf(tmp_path / "honest.gguf", seed=0)  # the same bytes, another node's copy
    arbiter_copy = write_tiny_llama_gguf(tmp_path / "arbiter.gguf", seed=0)
    # The cheat: its record (and every commitment it signs) states the advertised file's sha256.
    claim_identity(substitute, advertised)

    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [
        {"models": (_spec(advertised),)},
        {"models": (_spec(substitute),)},
        {"models": (_spec(honest, threads=2),)},  # another build's noise: two threads, not one
        {"wallet_key": shared.arbiter.key.hex(), "models": (_spec(arbiter_copy),)},
    ]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        consumer, cheat, fair, arbiter = nodes
        cheat_id, fair_id = str(cheat.host.get_id()), str(fair.host.get_id())
        consumer.market.arbiter_peer = str(arbiter.host.get_id())  # escrow.arbiter_peer
        fair.market.arbiter_peer = str(arbiter.host.get_id())  # the only peer it shows its receipts to

        assert cheat.model_host.sha256s["tiny"] == fair.model_host.sha256s["tiny"]  # both advertise one file

        # 1. Caught on its first call; the escrow is frozen, the arbiter re-runs and refunds it all.
        lease_id = await _caught(consumer, cheat_id)

        def ended() -> bool:
            return any(v.lease_id == lease_id and v.state != "active" for v in consumer.market.leases())

        await wait_for(ended, what="the cheat's lease ended")
        with pytest.raises(ClawnodeError):
            await consumer.market.call(lease_id, CHAT)  # nothing more is bought on that lease
        await wait_for(lambda: lease_id in consumer.market.lease_disputes, 20, "the arbiter's decision")
        decided = consumer.market.lease_disputes[lease_id]
        assert decided.outcome == "refund" and decided.to_payee == 0 and decided.tx_hash
        state = await _escrow(consumer, lease_id)
        assert state.phase == "closed" and state.released == 0  # everything locked went back
        disputes = {d.lease_id: d for d in await consumer.ledger.list_disputes()}
        mine = disputes[lease_id]
        assert mine.state == "dispute_resolved" and (mine.to_payee, mine.to_payer) == (0, state.amount)
        assert mine.opened_by == str(consumer.host.get_id()) and mine.reason.startswith("verification_")

        async def provider_recorded() -> bool:
            theirs = {d.lease_id: d for d in await cheat.ledger.list_disputes()}
            return lease_id in theirs and theirs[lease_id].state == "dispute_resolved"

        with trio.fail_after(10):
            while not await provider_recorded():
                await trio.sleep(0.1)
        theirs = {d.lease_id: d for d in await cheat.ledger.list_disputes()}[lease_id]
        assert (theirs.to_payee, theirs.to_payer) == (0, state.amount)
        assert lease_id not in consumer.market.verifying.evidence  # the case is closed

        # 2. An arbiter without the advertised file says so; the escrow stays frozen for a person.
        model_of = arbiter.market.verifying.local_model
        arbiter.market.verifying.local_model = lambda sha256: None
        second = await _caught(consumer, cheat_id)
        told = ("lease_dispute", "E_NOT_FOUND")  # arbiter_no_file
        await wait_for(lambda: arbiter.market.failures[told] >= 1, 20, "the arbiter's answer")
        assert (await _escrow(consumer, second)).phase == "disputed"  # frozen, nothing resolved
        assert second not in consumer.market.lease_disputes
        assert {d.lease_id: d for d in await consumer.ledger.list_disputes()}[second].state == "dispute_open"
        arbiter.market.verifying.local_model = model_of

        # 3. An honest provider on another build: every call checked, never flagged, never disputed.
        kept: dict[str, Any] = {}  # the package of each checked call, as a lying consumer would keep it
        verifying = consumer.market.verifying
        real_failed = verifying._failed

        async def failed(provider: str, facts: Any, package: Any = None) -> str:
            if package is not None:
                kept[package.lease_id] = package
            return await real_failed(provider, facts, package)

        verifying._failed = failed  # type: ignore[method-assign]
        verifying.sample_rate = 1.0
        lease = await consumer.market.open_lease(fair_id, "model:tiny", budget=BUDGET, duration_s=60)
        for _ in range(3):
            result = await consumer.market.call(lease.lease_id, CHAT)
            assert result.units > 0 and "logprobs" not in result.chunks[0]  # asked none: sent none
        record = verifying.book.get(fair_id)
        assert record is not None and record.failed == 0 and record.passed == 3
        assert lease.lease_id not in consumer.market.lease_disputes and lease.lease_id not in verifying.evidence

        # A consumer that disputes the honest lease anyway, with the honest call's own package, and says it
        # owes nothing: the arbiter's re-run passes, and the provider is paid what its newest receipt the
        # consumer countersigned says (the arbiter asks it), the rest goes back.
        held = consumer.market.held[lease.lease_id]
        verifying.evidence[lease.lease_id] = kept[lease.lease_id]
        vouched = held.committed
        assert vouched > 0
        held.committed = 0  # the lie
        rejected = await consumer.market.dispute_lease(lease.lease_id, 0)
        assert rejected is not None and rejected.outcome == "reject" and rejected.reason == "passed"
        countersigned = await fair.ledger.countersigned_amount(lease.lease_id)
        state = await _escrow(consumer, lease.lease_id)
        assert state.phase == "closed" and vouched <= state.released <= countersigned
        mine = {d.lease_id: d for d in await consumer.ledger.list_disputes()}[lease.lease_id]
        assert (mine.to_payee, mine.to_payer) == (state.released, state.amount - state.released)
        verifying.evidence.pop(lease.lease_id, None)

        # 4. The router never buys from the cheat again; the honest provider stays in its ranking.
        ranked = await ranked_once_listed(consumer, "model:tiny", {cheat_id, fair_id})
        assert fair_id in ranked and cheat_id not in ranked

        # `clawnode find` shows this node's checks of each provider it lists.
        def find() -> str:
            args = ["find", "model:tiny", "--data-dir", str(consumer.data_dir)]
            return CliRunner().invoke(main, args, catch_exceptions=False).output

        shown = await trio.to_thread.run_sync(find)
        assert f"{cheat_id}  verification FAILED (" in shown and f"{fair_id}  verification passed" in shown

        # 5. A record that advertises another file than the proofs name: model_mismatch, which no signature
        # makes the provider's fault to a third party. The call is still checked against the file the
        # proof names: the cheat's call does not fit it (the provider's own signed statement proved
        # false), so that failure is disputed and refunded; the honest provider's does, so only the
        # mismatch stands: refused, the lease ended, nothing frozen.
        async def advertises_another(provider: str, lease_id: str) -> str:
            return "cd" * 32

        verifying.advertised = advertises_another
        third = await consumer.market.open_lease(cheat_id, "model:tiny", budget=BUDGET, duration_s=60)
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.call(third.lease_id, CHAT)
        assert caught.value.reason not in (None, "verification_model_mismatch")
        await wait_for(lambda: third.lease_id in consumer.market.lease_disputes, 20, "the arbiter's decision")
        assert consumer.market.lease_disputes[third.lease_id].outcome == "refund"
        fourth = await consumer.market.open_lease(fair_id, "model:tiny", budget=BUDGET, duration_s=60)
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.call(fourth.lease_id, CHAT)
        assert caught.value.reason == "verification_model_mismatch"
        assert fourth.lease_id not in verifying.evidence
        await wait_for(ended_lease(consumer, fourth.lease_id), what="the mismatched lease ended")
        assert (await _escrow(consumer, fourth.lease_id)).phase == "active"  # not frozen: no dispute
