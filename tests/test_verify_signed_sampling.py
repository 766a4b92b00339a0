"""Verified inference (issue 21): a proof's signed temperature and top_p must be the request's. Every
sampling-dependent rule (``not_sampled``, ``too_greedy``) reads the signed pair, so a provider that
served a temperature-0.8 request greedily and signed temperature 0 passed them all. The consumer compares
the signed pair with its own request (clamped as the provider signs it) and refuses a mismatch as
``sampling_mismatch``: its own word (the arbiter never sees the request), so nothing is disputed. With
real nodes, a real lease and the tiny model."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import runtime.verify.evidence as evidence
from protocols.machines.verify import CheckFacts, check_verdict, sampling_matches, signed_sampling
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import check
from runtime.verify.provider import declared_sampling
from tests.support.market import market_nodes
from tests.test_verify_error_frame import _spec

logging.getLogger("libp2p").setLevel(logging.CRITICAL)

BODY = {"prompt": "Verify me: the quick brown fox jumps over the lazy dog.", "max_tokens": 24, "temperature": 0.8}


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "_prefills", {})


def test_the_signed_pair_must_be_the_requests_clamped_as_the_provider_signs_it() -> None:
    assert sampling_matches((800, 950), declared_sampling(BODY))
    assert sampling_matches((800, 950), declared_sampling({"prompt": "x"}))  # the engine's defaults
    assert not sampling_matches((0, 950), declared_sampling(BODY))
    assert not sampling_matches((800, 500), declared_sampling(BODY))
    assert signed_sampling(declared_sampling({"temperature": 2.5, "top_p": 1.5})) == (2000, 1000)
    assert sampling_matches((1, 1), declared_sampling({"temperature": 0.001, "top_p": 0}))
    assert sampling_matches((0, 950), None)  # a request this node cannot read: nothing to compare
    verdict = check_verdict(CheckFacts(True, True, True, True, sampling_matches=False, body_version=2))
    assert (verdict.outcome, verdict.reason, verdict.dispute) == ("failed", "sampling_mismatch", False)


async def test_a_provider_that_signs_a_cooler_temperature_than_asked_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    declared = evidence.declared_sampling
    # The cheat: every call served greedily, and its proof signs temperature 0 (the rest as asked).
    monkeypatch.setattr(evidence, "declared_sampling", lambda body: (0, declared(body)[1]))
    async with market_nodes([{"models": (_spec(path),)}, {"models": (_spec(path),)}]) as (nodes, _):
        consumer, provider = nodes
        pid = str(provider.host.get_id())
        service: Any = provider.market.services.get("model:tiny")  # its run is replaced on this instance
        real_run = service.run

        async def greedy(body: dict[str, Any], emit: Any, **kw: Any) -> Any:
            return await real_run({**body, "temperature": 0}, emit, **kw)

        service.run = greedy
        lease = await consumer.market.open_lease(pid, "model:tiny", budget=10**9, duration_s=60)
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.call(lease.lease_id, BODY)
        assert (caught.value.code, caught.value.reason) == (ErrorCode.FORBIDDEN, "verification_sampling_mismatch")
        record = consumer.market.verifying.book.get(pid)
        assert record is not None and (record.failed, record.last_reason) == (1, "sampling_mismatch")
        assert lease.lease_id not in consumer.market.verifying.evidence  # the consumer's word: not disputed
        held = consumer.market.held[lease.lease_id]
        assert held.seen_units == 0  # the call's units were taken back
        with pytest.raises(ClawnodeError):
            await consumer.market.call(lease.lease_id, BODY)  # the lease is ended
