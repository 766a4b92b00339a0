"""Verified inference (issue 21): a provider that streams its reply and then stays silent instead of sending
its end frame is spot-checked like one that ended. With real nodes, a real lease and the tiny model: such a
provider's first such call is let go as an unproved cut and its next is caught (as an end frame without a
proof is), while an honest call this side cuts on its own (the caller cancelled, the caller's sink failed)
is not checked and leaves the lease usable. A provider that pauses past the stall and answers the cancel
with its end frame is checked with that frame's proof: ``tests/test_verify_stall_cancel.py``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import trio
from hypothesis import given
from hypothesis import strategies as st

from protocols.machines import left_calls
from protocols.machines.lease_consumer import (
    CUT_ENDINGS,
    CallEnding,
    call_ending,
    cut_forgiven,
    ending_checked,
    error_frame_checked,
)
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import check
from tests.support.market import market_nodes

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 8, "temperature": 0}
STALL_S = 0.5  # the consumer's stall_s in these tests (30 s by default)


@given(st.sampled_from(["end", "error", None]), st.booleans(), st.booleans(), st.integers(-1, 10**6))
def test_which_endings_are_checked(last: str | None, left: bool, stopped: bool, text_tokens: int) -> None:
    ending = call_ending(last, left=left, provider_stopped=stopped)
    checked = ending_checked(ending, text_tokens)
    if not left:  # the provider's own last frame: an end frame always, an error frame after text
        assert ending is (CallEnding.END if last == "end" else CallEnding.ERROR)
        assert checked == (last == "end" or text_tokens > 0)
    elif not stopped:  # this side left on its own (its caller's cancel or deadline, its sink failed)
        assert (ending, checked) == (CallEnding.LEFT, False)
    else:  # the provider stopped after text: checked as if it had ended, with the proof of what answered the cancel
        assert ending is (CallEnding.CANCELLED if last == "end" else CallEnding.STOPPED)
        assert checked == (text_tokens > 0)
    # The error frame's rule is this table's (an error frame that answers this side's cancel is not checked).
    assert error_frame_checked(text_tokens, left=left) == ending_checked(
        call_ending("error", left=left, provider_stopped=False), text_tokens
    )


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer's checks load the file for their prefill into a per-process cache: this module's
    go with its tests, not on to interpreter exit (where llama-cpp-python's ``__del__`` complains)."""
    monkeypatch.setattr(check, "_prefills", {})


def _spec(path: Path) -> ModelSpec:
    return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]


@contextlib.contextmanager
def _pausing_after_text(
    service: Any, mode: list[str], released: trio.Event, cut: Callable[[], Awaitable[None]] | None = None
) -> Iterator[None]:
    """The provider's own model service, pausing once its whole reply was streamed, before its end frame.
    ``mode[0]``: "deaf" pauses deaf to the consumer's cancel until ``released`` (a cheat that never sends
    the end frame), "cut" does too once ``cut()`` closed its connection to the consumer (a
    cheat that hangs up there, or an honest provider whose connection was cut there), "pause" pauses 4
    stalls and answers a cancel at once (its end frame, with its proof, follows the cancel),
    "" serves honestly. Only this instance is patched, and unpatched on the way out."""
    real_run = service.run

    async def run(body: dict[str, Any], emit: Any, **kwargs: Any) -> Any:
        usage = await real_run(body, emit, **kwargs)
        if mode[0] in ("deaf", "cut"):
            with trio.CancelScope(shield=True), trio.move_on_after(8):
                if mode[0] == "cut" and cut is not None:
                    await cut()
                await released.wait()
        elif mode[0] == "pause":
            await trio.sleep(4 * STALL_S)
        return usage

    service.run = run
    try:
        yield
    finally:
        del service.run


async def _stream_ready(consumer: Any, provider: Any) -> None:
    """The call's stream is negotiated before the call, as the consumer does after every call that ended
    (``spare_streams``), so the short stall times the provider's silence after its reply, not also the
    negotiation of a new stream in front of its first token: that put a first call's first chunk at
    about 0.1 s (up to 0.16 s) at load 5 on 2 cores, against 0.01 s on a stream negotiated ahead, and
    once such a call ended with nothing paid (its stall fired before the reply it is about)."""
    await consumer.market.spare_streams.refill(provider.host.get_id())


@given(st.sampled_from(list(CallEnding)), st.booleans(), st.integers(min_value=0, max_value=5))
def test_only_a_first_unproved_cut_since_a_pass_is_let_go(ending: CallEnding, proof_sent: bool, earlier: int) -> None:
    forgiven = cut_forgiven(ending, proof_sent, earlier)
    assert forgiven == (ending in CUT_ENDINGS and not proof_sent and earlier == 0)


def test_a_refused_left_call_keeps_no_allowance() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 400}]}
    state = left_calls.left(left_calls.LeftCalls(), 10.0, 5, body)
    state = left_calls.left(state, 11.0, 7, body)
    one = state.open[1].allowance
    assert left_calls.refused(state, 10.0).tolerance == one  # only that call's allowance goes
    assert left_calls.refused(state, 99.0) == state


async def test_a_provider_that_streams_its_reply_and_never_sends_its_end_frame_is_caught_on_its_second_call(
    tmp_path: Path,
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    released = trio.Event()
    async with market_nodes([{"models": (_spec(path),)}, {"models": (_spec(path),)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        mode = [""]
        chunks: list[dict[str, Any]] = []

        async def collect(data: dict[str, Any]) -> None:
            chunks.append(data)

        async def hang_up() -> None:
            while not chunks:  # once the reply reached the consumer's caller, well inside the stall
                await trio.sleep(0.01)
            await trio.sleep(0.05)
            await provider.host.disconnect(consumer.host.get_id())

        try:
            with _pausing_after_text(provider.market.services.get("model:tiny"), mode, released, hang_up):
                # Silent after its reply, then, on a second lease, hanging up after it. The provider's first
                # such call is let go (paid its chunks, unchecked: an honest provider's connection may break
                # mid-reply); the next, on whatever lease (no check passed between), is checked and caught.
                for failed, caught_mode in enumerate(("deaf", "cut"), start=1):
                    # The default sample rate: a provider's first call (and every call after a failed check)
                    # is checked.
                    lease = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
                    first_paid = 0
                    if failed == 1:
                        chunks.clear()
                        mode[0] = "deaf"
                        await _stream_ready(consumer, provider)
                        with pytest.raises(ClawnodeError) as let_go:
                            await consumer.market.stream_call(lease.lease_id, CHAT, collect, stall_s=STALL_S)
                        assert chunks  # the reply was handed on before the provider went silent
                        assert let_go.value.code == ErrorCode.TIMEOUT  # the stall's own error: not checked
                        assert consumer.market.verifying.book.get(provider_id) is None
                        first_paid = consumer.market.held[lease.lease_id].seen_units
                        assert first_paid > 0  # its chunks are paid
                    chunks.clear()
                    mode[0] = caught_mode
                    if mode[0] == "cut":
                        # A call without a proof fails only where the provider's record names a file: asked of
                        # the provider as the lease opens, so one that hangs up after its reply cannot leave it
                        # unknown (before, it was asked at the check, and this call was skipped).
                        with trio.fail_after(5):
                            while not consumer.market.verifying._advertised.get(lease.lease_id):
                                await trio.sleep(0.01)
                    await _stream_ready(consumer, provider)
                    with pytest.raises(ClawnodeError) as caught:
                        await consumer.market.stream_call(lease.lease_id, CHAT, collect, stall_s=STALL_S)
                    assert "".join(chunk.get("text", "") for chunk in chunks)  # the reply was handed on, then nothing
                    # Not the stall's E_TIMEOUT (nor the cut's E_UNAVAILABLE): the reply it was paid for had no proof.
                    assert caught.value.code == ErrorCode.FORBIDDEN and caught.value.reason == "verification_no_proof"
                    record = consumer.market.verifying.book.get(provider_id)
                    assert record is not None and (record.failed, record.last_reason) == (failed, "no_proof")
                    assert consumer.market.verifying.standing(provider_id) == 0.0  # the router ranks it last
                    held = consumer.market.held.get(lease.lease_id)
                    if held is not None:  # the caught call's units are taken back, its left-call allowance too
                        assert held.seen_units == first_paid
                        assert len(held.left.open) == (1 if failed == 1 else 0)  # only the call let go keeps one
                    with pytest.raises(ClawnodeError) as ended:  # the lease is ended: no further call is sent on it
                        await consumer.market.call(lease.lease_id, CHAT)
                    assert ended.value.code in (ErrorCode.CONFLICT, ErrorCode.NOT_FOUND)
        finally:
            released.set()


async def test_honest_calls_this_side_cuts_are_not_checked_and_the_lease_stays_usable(tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    mode = [""]
    async with market_nodes([{"models": (_spec(path),)}, {"models": (_spec(path),)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        consumer.market.verifying.sample_rate = 1.0  # verify.sample_rate: every call is checked
        with _pausing_after_text(provider.market.services.get("model:tiny"), mode, trio.Event()):
            lease = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
            market = consumer.market

            # 1. The caller cancels after the first text chunk.
            async def cancel_at_first(data: dict[str, Any]) -> None:
                if data.get("text"):
                    scope.cancel()

            with trio.CancelScope() as scope:
                await market.stream_call(lease.lease_id, {**CHAT, "max_tokens": 64}, cancel_at_first)
            assert scope.cancelled_caught

            # 2. The caller's sink fails at the first text chunk.
            async def failing_sink(data: dict[str, Any]) -> None:
                if data.get("text"):
                    raise RuntimeError("the caller's client went away")

            with pytest.raises(ClawnodeError):
                await market.stream_call(lease.lease_id, {**CHAT, "max_tokens": 64}, failing_sink)

            # Neither was checked, and the lease still serves: its next call passes its check.
            record = market.verifying.book.get(provider_id)
            assert record is None or (record.passed, record.failed) == (0, 0)
            assert (await market.call(lease.lease_id, CHAT)).units > 0
            record = market.verifying.book.get(provider_id)
            assert record is not None and (record.passed, record.failed) == (1, 0)
            assert market.held[lease.lease_id].seen_units > 0
            assert market.verifying.standing(provider_id) > 0.5
