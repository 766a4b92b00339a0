"""A hostile party against the lease arbiter (/clawnode/lease-dispute/1.0.0), on real nodes and a real
escrow: the escrow's payee can freeze it as well as its payer, so a provider that freezes its own
honest lease and sends the arbiter a case of its own (its honest call's package, which it signed, and
"the consumer owes everything locked") must not be paid a wei more than the consumer owes: the arbiter
takes a case only with the payer's signature over it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from protocols.lease.arbiter import DISPUTE_PROTOCOL, MAX_DISPUTE_FRAME, OUTCOME, LeaseDisputeCase
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from tests.support.market import SharedChain, market_nodes
from wire.rpc import request

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 8, "temperature": 0}


def _spec(path: Path) -> ModelSpec:
    return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]


async def test_a_provider_that_freezes_its_own_lease_cannot_name_what_it_is_owed(tmp_path: Path) -> None:
    files = [write_tiny_llama_gguf(tmp_path / f"{name}.gguf", seed=0) for name in ("c", "p", "a")]
    shared = await trio.to_thread.run_sync(SharedChain.start)
    specs = [
        {"models": (_spec(files[0]),)},
        {"models": (_spec(files[1]),)},
        {"wallet_key": shared.arbiter.key.hex(), "models": (_spec(files[2]),)},
    ]
    async with market_nodes(specs, chain=shared) as (nodes, _):
        consumer, provider, arbiter = nodes
        consumer.market.arbiter_peer = str(arbiter.host.get_id())
        kept: dict[str, Any] = {}  # the honest call's package: the provider holds the same (it signed it)
        verifying = consumer.market.verifying
        real_failed = verifying._failed

        async def failed(peer: str, facts: Any, package: Any = None) -> str:
            if package is not None:
                kept[package.lease_id] = package
            return await real_failed(peer, facts, package)

        verifying._failed = failed  # type: ignore[method-assign,assignment]
        verifying.sample_rate = 1.0
        lease = await consumer.market.open_lease(str(provider.host.get_id()), "model:tiny", budget=10**9, duration_s=60)
        await consumer.market.call(lease.lease_id, CHAT)
        package = kept[lease.lease_id]

        payer_client, payee_client = consumer.escrow_client, provider.escrow_client
        assert payer_client is not None and payee_client is not None
        payer, escrow_id = payer_client.account.address, bytes.fromhex(lease.lease_id)
        await trio.to_thread.run_sync(payee_client.dispute, payer, escrow_id)  # the payee may freeze it
        before = await trio.to_thread.run_sync(payer_client.get, payer, escrow_id)
        assert before.phase == "disputed" and before.amount - before.released > 0

        # Its own signature in place of the payer's, then none at all.
        forged = "0x" + (await trio.to_thread.run_sync(payee_client.sign_dispute_case, escrow_id, 10**30)).hex()
        for sig in (forged, "0x" + "11" * 65):
            case = LeaseDisputeCase(
                lease_id=lease.lease_id, payer=payer, package=package, owed_if_honest=10**30, payer_sig=sig
            )
            with pytest.raises(ClawnodeError) as refused:
                await request(
                    provider.host, arbiter.host.get_id(), DISPUTE_PROTOCOL, case, OUTCOME, max_frame=MAX_DISPUTE_FRAME
                )
            assert (refused.value.code, refused.value.reason) == (ErrorCode.FORBIDDEN, "case_not_payer")
        after = await trio.to_thread.run_sync(payer_client.get, payer, escrow_id)
        assert (after.phase, after.released) == ("disputed", before.released)  # nothing paid out
        assert lease.lease_id not in arbiter.market.lease_disputes
