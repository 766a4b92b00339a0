"""A payer that freezes its lease's escrow and never sends the arbiter a case (issue 21's leftover):
before, the provider's countersigned pay waited for a person for good. Once the escrow's deadline +
window has passed (the payer's whole time to dispute) the provider's node asks the arbiter to end the
freeze: it is paid what the newest receipt with the payer's voucher says, the rest goes back to the
payer. Before that time, with another peer's receipt, or without the payer's voucher, nothing moves."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import trio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from protocols.lease.arbiter import DISPUTE_PROTOCOL, MAX_DISPUTE_FRAME, OUTCOME, LeaseStaleFreeze
from protocols.lease.base import ACK
from protocols.machines.verdict import Refusal
from protocols.machines.verify import Arbitration, StaleFreezeFacts, stale_freeze_verdict
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.market import SharedChain, market_nodes
from wire.rpc import request

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 2, "temperature": 0}


def test_the_rule_pays_at_most_the_payers_voucher_and_only_after_its_time_to_dispute() -> None:
    facts = StaleFreezeFacts(
        lease_id="ab" * 32,
        escrow_id="0x" + "ab" * 32,
        our_wallet="0xA",
        escrow_arbiter="0xa",
        phase="disputed",
        threshold=0,
        amount=1000,
        released=100,
        deadline=50,
        window=10,
        chain_now=61,
        deciding=False,
        vouched=400,
    )

    def verdict(**kw: object) -> Refusal | Arbitration:
        return stale_freeze_verdict(dataclasses.replace(facts, **kw))  # type: ignore[arg-type]

    assert verdict() == Arbitration("reject", 300, "no_case")  # the voucher's 400, less the 100 released
    assert verdict(vouched=10**9) == Arbitration("reject", 900, "no_case")  # never more than is left
    refused = {
        "case_time_left": verdict(chain_now=60),  # deadline + window: the payer may still send its case
        "no_voucher": verdict(vouched=None),
        "case_in_progress": verdict(deciding=True),
        "not_disputed": verdict(phase="active"),
        "not_arbiter": verdict(threshold=2),
        "no_escrow": verdict(phase="none"),
    }
    assert {reason: r.reason if isinstance(r, Refusal) else r for reason, r in refused.items()} == {
        reason: reason for reason in refused
    }
    assert verdict(escrow_arbiter="0xb") == refused["not_arbiter"]


async def test_a_freeze_the_payer_sends_no_case_for_ends_with_the_provider_paid_what_it_vouched(
    tmp_path: Path,
) -> None:
    files = [write_tiny_llama_gguf(tmp_path / f"{name}.gguf", seed=0) for name in ("p",)]
    spec = ModelSpec(name="tiny", path=str(files[0]), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]
    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [{}, {"models": (spec,)}, {"wallet_key": shared.arbiter.key.hex()}]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        consumer, provider, arbiter = nodes
        provider.market.arbiter_peer = str(arbiter.host.get_id())
        lease = await consumer.market.open_lease(str(provider.host.get_id()), "model:tiny", budget=10**9, duration_s=60)
        await consumer.market.call(lease.lease_id, CHAT)
        with trio.fail_after(20):
            while not await provider.ledger.countersigned_amount(lease.lease_id):
                await trio.sleep(0.05)
        owed = await provider.ledger.countersigned_amount(lease.lease_id)
        payer_client = consumer.escrow_client
        assert payer_client is not None
        payer, escrow_id = payer_client.account.address, bytes.fromhex(lease.lease_id)
        await trio.to_thread.run_sync(payer_client.dispute, payer, escrow_id)  # frozen, and no case ever sent
        consumer_id = str(consumer.host.get_id())
        key = f"verify-dispute/{lease.lease_id}"  # as the consumer's dispute_lease records it
        await consumer.ledger.open_dispute(
            lease.lease_id, opened_by=consumer_id, reason="verification_x", idempotency_key=key
        )

        with pytest.raises(ClawnodeError) as early:  # the payer may still send its case
            await provider.market.end_stale_freeze(lease.lease_id)
        assert (early.value.code, early.value.reason) == (ErrorCode.CONFLICT, "case_time_left")
        state = await trio.to_thread.run_sync(payer_client.get, payer, escrow_id)
        await trio.to_thread.run_sync(shared.chain.time_travel, state.deadline + state.window - shared.chain.now() + 5)

        # Another peer presenting the provider's receipt as its own is refused.
        records = await provider.ledger.list_receipts(lease.lease_id, limit=8)
        receipt = max((r for r in records if r.countersigned), key=lambda r: r.seq).receipt
        ask = LeaseStaleFreeze(lease_id=lease.lease_id, payer=payer, receipt=receipt)
        with pytest.raises(ClawnodeError) as stranger:
            await request(
                consumer.host, arbiter.host.get_id(), DISPUTE_PROTOCOL, ask, OUTCOME, max_frame=MAX_DISPUTE_FRAME
            )
        assert stranger.value.reason == "no_voucher"
        odd = ask.model_copy(update={"lease_id": "not-an-escrow-id"})
        with pytest.raises(ClawnodeError) as unbound:
            await request(
                provider.host, arbiter.host.get_id(), DISPUTE_PROTOCOL, odd, OUTCOME, max_frame=MAX_DISPUTE_FRAME
            )
        assert (unbound.value.code, unbound.value.reason) == (ErrorCode.INVALID_ARGUMENT, "escrow_not_lease")

        # The provider's sweep finds its claim held up by the freeze and takes it to the arbiter.
        await provider.ledger.enqueue_claim(lease.lease_id)
        provider.market.wake_settlement()
        with trio.fail_after(10):
            while not await provider.market.stale_freeze_pass():
                await trio.sleep(0.05)
        outcome = provider.market.lease_disputes[lease.lease_id]
        assert (outcome.outcome, outcome.reason, outcome.to_payee) == ("reject", "no_case", owed - state.released)
        closed = await trio.to_thread.run_sync(payer_client.get, payer, escrow_id)
        assert (closed.phase, closed.released) == ("closed", owed)
        disputes = await provider.ledger.list_disputes(limit=10)
        assert [(d.lease_id, d.state) for d in disputes] == [(lease.lease_id, "dispute_resolved")]
        # The consumer is told too and records the split the chain shows (its dispute no longer stays open).
        with trio.fail_after(10):
            while (mine := await consumer.ledger.list_disputes(limit=10))[0].state != "dispute_resolved":
                await trio.sleep(0.05)
        assert (mine[0].to_payee, mine[0].to_payer) == (owed, closed.amount - owed)
        # A push about a lease of the consumer's with no dispute open writes nothing into its ledger.
        with pytest.raises(ClawnodeError) as unknown:
            await request(provider.host, consumer.host.get_id(), DISPUTE_PROTOCOL, outcome, ACK)
        assert unknown.value.reason == "unknown_lease"
