"""Verified inference (issue 21): a call's spot-check that started lands its outcome, even when the call's
deadline passes while it runs. The check ran inside the call's ``timeout_s``: a reply whose end frame
came just before the deadline was checked, the prefill's thread finished, and the timeout fired at the
next checkpoint, so a failed check was thrown away: the caller got ``E_TIMEOUT``, the call's units stayed
counted, the lease stayed open and nothing was disputed. With real nodes, a real lease and the tiny
model: a provider that serves a temperature-0.8 request greedily (failing ``too_greedy``), and a check
made to run past the call's deadline (its worker thread waits for it first)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from protocols.lease import verifying
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import check
from tests.support.market import market_nodes
from tests.test_verify_error_frame import _spec

logging.getLogger("libp2p").setLevel(logging.CRITICAL)

BODY = {"prompt": "Verify me: the quick brown fox jumps over the lazy dog.", "max_tokens": 190, "temperature": 0.8}
TIMEOUT_S = 3.0


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "_prefills", {})


async def test_a_failed_check_that_runs_past_the_calls_deadline_still_refuses_the_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    past_deadline: list[float] = []
    real_check = verifying.run_check

    def slow_check(*args: Any, **kwargs: Any) -> Any:
        time.sleep(max(0.0, past_deadline[0] - time.monotonic()))  # the check's thread runs past the deadline
        return real_check(*args, **kwargs)

    monkeypatch.setattr(verifying, "run_check", slow_check)
    async with market_nodes([{"models": (_spec(path),)}, {"models": (_spec(path),)}]) as (nodes, _):
        consumer, provider = nodes
        pid = str(provider.host.get_id())
        service: Any = provider.market.services.get("model:tiny")  # its run is replaced on this instance
        real_run = service.run

        async def greedy(body: dict[str, Any], emit: Any, **kw: Any) -> Any:
            return await real_run({**body, "temperature": 0}, emit, **kw)  # served greedily, signed 0.8

        service.run = greedy
        lease = await consumer.market.open_lease(pid, "model:tiny", budget=10**9, duration_s=60)
        past_deadline.append(time.monotonic() + TIMEOUT_S + 0.5)
        with pytest.raises(ClawnodeError) as caught:
            await consumer.market.call(lease.lease_id, BODY, timeout_s=TIMEOUT_S)
        assert time.monotonic() > past_deadline[0]  # the check did run past the deadline
        assert (caught.value.code, caught.value.reason) == (ErrorCode.FORBIDDEN, "verification_too_greedy")
        held = consumer.market.held[lease.lease_id]
        assert held.seen_units == 0  # the call's units were taken back
        record = consumer.market.verifying.book.get(pid)
        assert record is not None and (record.failed, record.last_reason) == (1, "too_greedy")
        with pytest.raises(ClawnodeError):
            await consumer.market.call(lease.lease_id, BODY)  # the lease is ended
