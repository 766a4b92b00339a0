"""Verified inference (issue 21): a consumer that picks a request's ``seed`` picks the draws an honest
provider's sampling makes, so it can pick one whose reply comes out all greedy and have it fail
``too_greedy``; before, the failure was disputed too and the arbiter, re-running the same reply, agreed
and refunded the escrow. Now the consumer does not apply ``too_greedy`` to a request that names a seed,
and ``too_greedy`` is the consumer's word only (never disputed: the arbiter never sees the request, so
it cannot tell a seeded one). With real nodes, a real lease and the tiny model: the seed below makes the
tiny model's temperature-2 reply to the prompt its greedy reply over the 34 tokens asked, which fails
``too_greedy`` when checked as unseeded."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from protocols.machines.verify import CheckFacts, check_verdict, findings_counted
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import check
from tests.support.market import market_nodes
from tests.test_verify_error_frame import _spec

logging.getLogger("libp2p").setLevel(logging.CRITICAL)

FRAMING_SEED = 596997  # found by drawing seeds until one's uniforms all fall under the best token's chance
BODY = {
    "prompt": "Verify me: the quick brown fox jumps over the lazy dog.",
    "max_tokens": 34,
    "temperature": 2.0,
    "seed": FRAMING_SEED,
}


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "_prefills", {})


def test_too_greedy_is_not_applied_to_a_seeded_request_and_is_never_disputed() -> None:
    assert findings_counted("too_greedy", seeded=True) == ""
    assert findings_counted("too_greedy", seeded=False) == "too_greedy"
    assert findings_counted("not_sampled", seeded=True) == "not_sampled"  # the other rules hold whatever the seed
    verdict = check_verdict(CheckFacts(True, True, True, True, findings_reason="too_greedy", body_version=2))
    assert (verdict.outcome, verdict.reason, verdict.dispute) == ("failed", "too_greedy", False)


async def test_an_honest_reply_drawn_with_a_consumer_chosen_seed_is_not_failed_too_greedy(tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    async with market_nodes([{"models": (_spec(path),)}, {"models": (_spec(path),)}]) as (nodes, _):
        consumer, provider = nodes
        pid = str(provider.host.get_id())
        lease = await consumer.market.open_lease(pid, "model:tiny", budget=10**9, duration_s=60)
        result = await consumer.market.call(lease.lease_id, BODY)  # the first call: always checked
        assert result.usage["completion_tokens"] == 34
        record = consumer.market.verifying.book.get(pid)
        assert record is not None and (record.passed, record.failed) == (1, 0)
        assert lease.lease_id not in consumer.market.verifying.evidence  # nothing to dispute
        await consumer.market.call(lease.lease_id, BODY)  # the lease stays usable
