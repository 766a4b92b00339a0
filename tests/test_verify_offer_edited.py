"""An honest provider whose owner edits or withdraws its model offer mid-lease keeps proving its calls.

The consumer keeps the file's sha256 the provider's record named when the lease opened, and fails an end
frame that owes a proof and carries none on every call (``protocols.machines.verify.every_call_facts``).
The provider read the live offer's sha256 on each call, so an offer edited through the API without it
(a new price) or withdrawn to drain the node left the open lease served without proofs: every call of
an honest provider failed ``no_proof`` (its lease ended, its standing 0). Now a lease's calls are proved
for the file it was granted for (``ServedLease.sha256``). Real nodes on loopback, the tiny model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import check
from tests.support.market import market_nodes
from tests.test_verify_stall import CHAT, _spec


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "_prefills", {})


@pytest.mark.parametrize("edit", ["price_without_sha256", "withdrawn"])
async def test_an_offer_edited_mid_lease_does_not_fail_the_honest_provider(tmp_path: Path, edit: str) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    models = {"models": (_spec(path),)}
    async with market_nodes([models, models]) as (nodes, _):
        consumer, provider = nodes
        market = consumer.market
        market.verifying.sample_rate = 0.0  # after the first call, no call is drawn for the full check
        provider_id = str(provider.host.get_id())
        lease = await market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=120)
        await market.call(lease.lease_id, CHAT)  # drawn, proved, passed
        record = market.verifying.book.get(provider_id)
        assert record is not None and (record.passed, record.failed) == (1, 0)
        offer = next(o for o in provider.publisher.offers if o.name == "model:tiny")
        assert offer.sha256
        if edit == "withdrawn":
            await provider.remove_offer("model:tiny")
        else:  # PUT /api/offers/model:tiny with the owner's JSON: a new price, no sha256 key
            await provider.set_offer(offer.model_copy(update={"sha256": "", "price_per_unit": 2000}))
        # The same model keeps serving the open lease, honestly, and proves it.
        for _ in range(2):
            result = await market.call(lease.lease_id, CHAT)
            assert "".join(c.get("text", "") for c in result.chunks)
        record = market.verifying.book.get(provider_id)
        assert record is not None and record.failed == 0


async def test_a_lease_restored_after_a_restart_is_proved_for_the_file_loaded(tmp_path: Path) -> None:
    """After a restart the grant-time file is not kept (``ServedLease.sha256`` is in memory only), and an
    offer edited without its sha256 stays so on disk (offers.json): a restored lease is proved for the file
    this node loaded for the capability (``ServedLease.restored``; its flag set by ``_restore_served``)."""
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    models = {"models": (_spec(path),)}
    async with market_nodes([models, models]) as (nodes, _):
        consumer, provider = nodes
        market = consumer.market
        market.verifying.sample_rate = 0.0
        provider_id = str(provider.host.get_id())
        lease = await market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=120)
        await market.call(lease.lease_id, CHAT)  # drawn, proved, passed
        offer = next(o for o in provider.publisher.offers if o.name == "model:tiny")
        await provider.set_offer(offer.model_copy(update={"sha256": "", "price_per_unit": 2000}))
        # As ``_restore_served`` leaves it: the grant-time file unknown, the lease marked restored.
        served = provider.market.served[lease.lease_id]
        served.sha256, served.restored = "", True
        for _ in range(2):
            result = await market.call(lease.lease_id, CHAT)
            assert "".join(c.get("text", "") for c in result.chunks)
        assert served.sha256 == offer.sha256  # the loaded file's
        record = market.verifying.book.get(provider_id)
        assert record is not None and record.failed == 0
