"""Verified inference (issue 21): a provider that streams its reply, goes silent until the consumer leaves
(``stall_s``) and answers the consumer's cancel with an end frame is spot-checked like one that ended. The
end frame that answers the cancel carries the signed proof of what was streamed: an honest provider that
stalls passes its check, and one that sends no proof is let go once (an unproved cut, as a broken
connection or an older provider's error frame without a proof) and caught on the next. Before, such a
call was paid its chunks and never checked, so a cheat that stalled at the end of every reply was never
caught. An honest provider proves such a reply whenever it stalls, mid-block or behind a busy engine
(``tests/test_verify_cancel_proof.py``). The rules are the pure table's
(``protocols.machines.lease_consumer``); one test runs real nodes, a real lease and the tiny model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import trio
from hypothesis import given
from hypothesis import strategies as st

from protocols.machines.lease_consumer import (
    CUT_ENDINGS,
    CallEnding,
    call_ending,
    cut_forgiven,
    ending_checked,
    unproved_cut,
)
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import check
from tests.support.market import market_nodes
from tests.test_verify_stall import CHAT, STALL_S, _pausing_after_text, _spec, _stream_ready


@given(st.sampled_from(["end", "error", None]), st.integers(-1, 10**6))
def test_a_provider_that_stopped_after_text_is_checked_whatever_answered_the_cancel(
    last: str | None, text_tokens: int
) -> None:
    ending = call_ending(last, left=True, provider_stopped=True)
    assert ending is (CallEnding.CANCELLED if last == "end" else CallEnding.STOPPED)
    assert ending_checked(ending, text_tokens) == (text_tokens > 0)
    # A cancel of this side's own (its caller's cancel or deadline, its sink) stays unchecked.
    assert not ending_checked(call_ending(last, left=True, provider_stopped=False), text_tokens)


@given(st.sampled_from(list(CallEnding)), st.integers(-1, 10**6), st.booleans(), st.integers(0, 5))
def test_an_unproved_error_stop_or_cancelled_call_is_let_go_once_between_passed_checks(
    ending: CallEnding, text_tokens: int, proof_sent: bool, earlier: int
) -> None:
    counted = unproved_cut(ending, text_tokens, proof_sent)
    # Counted: an error frame, a stop or an end frame answering the cancel, after text, without a proof.
    assert counted == (
        ending in (CallEnding.ERROR, CallEnding.STOPPED, CallEnding.CANCELLED) and text_tokens > 0 and not proof_sent
    )
    assert CUT_ENDINGS == {CallEnding.ERROR, CallEnding.STOPPED, CallEnding.CANCELLED}
    # Only the first since the last passed check is let go; an unasked end frame without a proof never is.
    assert cut_forgiven(ending, proof_sent, earlier) == (ending in CUT_ENDINGS and not proof_sent and earlier == 0)


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer's checks load the file for their prefill into a per-process cache: this module's
    go with its tests, not on to interpreter exit (where llama-cpp-python's ``__del__`` complains)."""
    monkeypatch.setattr(check, "_prefills", {})


async def test_a_stall_answered_by_an_end_frame_is_checked_honest_proof_passes_no_proof_is_caught_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    async with market_nodes([{"models": (_spec(path),)}, {"models": (_spec(path),)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        market = consumer.market
        texts: list[str] = []

        async def collect(data: dict[str, Any]) -> None:
            texts.append(data.get("text", ""))

        async def stalled_call(lease_id: str) -> ClawnodeError:
            texts.clear()
            await _stream_ready(consumer, provider)  # the stall times the silence after the reply only
            with pytest.raises(ClawnodeError) as caught:
                await market.stream_call(lease_id, CHAT, collect, stall_s=STALL_S)
            assert "".join(texts)  # the reply was handed on, then the provider went silent
            return caught.value

        # The provider streams its whole reply, then pauses past the stall: this side leaves and cancels,
        # and the provider answers the cancel at once with its end frame.
        with _pausing_after_text(provider.market.services.get("model:tiny"), ["pause"], trio.Event()):
            lease = await market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
            # 1. Honest: its end frame proves the streamed reply. A provider's first call is always checked
            # (the default sample rate): it passes, and the caller gets the stall's own error.
            error = await stalled_call(lease.lease_id)
            assert error.code == ErrorCode.TIMEOUT
            record = market.verifying.book.get(provider_id)
            assert record is not None and (record.passed, record.failed) == (1, 0)
            paid = market.held[lease.lease_id].seen_units
            assert paid > 0  # its chunks are paid

            # 2. A cheat (or a provider of an older release) answers the cancel with an end frame without a
            # proof. Every call drawn from now on: its first such call since the passed check is let go (paid,
            # unchecked, as a cut), the next is checked and fails no_proof.
            market.verifying.sample_rate = 1.0

            async def no_proof(*args: Any) -> None:
                return None

            monkeypatch.setattr(provider.market, "_failed_call_proof", no_proof)
            error = await stalled_call(lease.lease_id)
            assert error.code == ErrorCode.TIMEOUT  # let go
            record = market.verifying.book.get(provider_id)
            assert record is not None and (record.passed, record.failed) == (1, 0)
            paid = market.held[lease.lease_id].seen_units
            error = await stalled_call(lease.lease_id)
            assert (error.code, error.reason) == (ErrorCode.FORBIDDEN, "verification_no_proof")
            record = market.verifying.book.get(provider_id)
            assert record is not None and (record.failed, record.last_reason) == (1, "no_proof")
            assert market.verifying.standing(provider_id) == 0.0  # the router ranks it last
            held = market.held.get(lease.lease_id)
            assert held is None or held.seen_units == paid  # the caught call's units are taken back
            with pytest.raises(ClawnodeError) as ended:  # the lease is ended: no further call is sent on it
                await market.call(lease.lease_id, CHAT)
            assert ended.value.code in (ErrorCode.CONFLICT, ErrorCode.NOT_FOUND)
