"""A consumer whose case reaches the arbiter while the arbiter is still deciding it (an earlier send of
the same case timed out while the arbiter went on: a re-run plus two transactions may outlast the
consumer's wait) waits for the decision instead of taking ``case_in_progress`` for a refusal: before,
it forgot its kept case and never recorded the arbiter's resolution."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import protocols.lease.arbiter as arbiter_module
from runtime.errors import ClawnodeError
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.identity import claim_identity
from tests.support.market import SharedChain, market_nodes

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 4, "temperature": 0}


def _spec(path: Path) -> ModelSpec:
    return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]


async def test_a_case_the_arbiter_is_still_deciding_is_waited_for_not_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(arbiter_module, "CASE_RETRY_S", (0.3, 0.3, 0.3, 0.3))
    advertised = write_tiny_llama_gguf(tmp_path / "advertised.gguf", seed=0)
    substitute = write_tiny_llama_gguf(tmp_path / "substitute.gguf", seed=1)
    copies = [write_tiny_llama_gguf(tmp_path / f"{name}.gguf", seed=0) for name in ("consumer", "arbiter")]
    claim_identity(substitute, advertised)
    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [
        {"models": (_spec(copies[0]),)},
        {"models": (_spec(substitute),)},
        {"wallet_key": shared.arbiter.key.hex(), "models": (_spec(copies[1]),)},
    ]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        consumer, cheat, arbiter = nodes
        consumer.market.arbiter_peer = str(arbiter.host.get_id())
        lease = await consumer.market.open_lease(str(cheat.host.get_id()), "model:tiny", budget=10**9, duration_s=60)
        # The arbiter is busy with this very case (the consumer's earlier send, as it timed out) for a while.
        arbiter.market._cases = {lease.lease_id}

        async def finish_deciding() -> None:
            await trio.sleep(0.8)
            arbiter.market._cases.discard(lease.lease_id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(finish_deciding)
            with pytest.raises(ClawnodeError) as caught:
                await consumer.market.call(lease.lease_id, CHAT)
        assert (caught.value.reason or "").startswith("verification_")
        with trio.fail_after(20):
            while lease.lease_id not in consumer.market.lease_disputes:
                await trio.sleep(0.05)
        assert consumer.market.lease_disputes[lease.lease_id].outcome == "refund"
        disputes = {d.lease_id: d for d in await consumer.ledger.list_disputes()}
        assert disputes[lease.lease_id].state == "dispute_resolved"
        assert await consumer.ledger.dispute_cases() == []
