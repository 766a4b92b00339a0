"""Verified inference (issue 21): a call that streams its reply and then ends with an error frame instead of
an end frame is spot-checked like one that ended. With real nodes, a real lease and the tiny model: a
provider that streams and then fails every call with no proof is caught on its second call (its first is
an unproved cut, let go), and an honest provider whose call fails after streaming attaches the proof of
what it streamed, passes the check, and its caller gets the provider's own error on a lease that stays
usable. A provider that sends such an error frame without a proof (a cheat, or an honest provider of a
release before error-frame proofs) is let go once since its last passed check, as an unproved cut, and caught
on the next."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hypothesis import given
from hypothesis import strategies as st

from protocols.lease.base import CALL_FRAMES, error_frame
from protocols.lease.serving import ServingRole
from protocols.machines.lease_consumer import error_frame_checked
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.models import ModelSpec
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import check
from tests.support.market import market_nodes
from wire.rpc import parse_reply

CHAT = {"messages": [{"role": "user", "content": "Which model are you?"}], "max_tokens": 8, "temperature": 0}
INJECTED = "generation failed: injected"  # the engine failure each test fakes (ErrorCode.INTERNAL)


@given(st.integers(min_value=-1, max_value=10**6), st.booleans())
def test_an_error_frame_is_checked_only_after_reply_text_and_only_when_this_side_did_not_leave(
    text_tokens: int, left: bool
) -> None:
    assert error_frame_checked(text_tokens, left=left) == (text_tokens > 0 and not left)


def test_an_error_frames_proof_is_ignored_by_an_older_reader_and_a_malformed_one_reads_as_none() -> None:
    frame = {"type": "error", "code": "E_INTERNAL", "message": "boom", "units": 12, "verify": {"tokens": "x"}}
    raw = json.dumps(frame).encode()
    # An older consumer reads the frame as ``ErrorReply``: the proof is an unknown field, dropped.
    with pytest.raises(ClawnodeError) as caught:
        parse_reply(raw, CALL_FRAMES)
    assert (caught.value.code, caught.value.message) == (ErrorCode.INTERNAL, "boom")
    # This one keeps the billed units and reads a proof that does not parse as none (drawn: no_proof).
    read = error_frame(raw)
    assert read is not None and (read.units, read.verify) == (12, None)
    assert error_frame(json.dumps({"type": "chunk", "data": {}}).encode()) is None


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer's checks load the file for their prefill into a per-process cache: this module's
    go with its tests, not on to interpreter exit (where llama-cpp-python's ``__del__`` complains)."""
    monkeypatch.setattr(check, "_prefills", {})


def _spec(path: Path) -> ModelSpec:
    return ModelSpec(name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256)  # type: ignore[call-arg]


@contextlib.contextmanager
def _failing_after_text(service: Any, mode: list[str]) -> Iterator[None]:
    """The provider's own model service, failing as its engine would after the reply's text chunks
    (faked: llama.cpp gives no way to fail on demand). ``mode[0]``: "end" fails once the whole reply
    was streamed (the engine reported no prompt count: its own failure bills none), "mid" right after
    the first text chunk left (a failure the engine reports with the prompt it decoded, ``on_cut``;
    asked with logprobs, so each chunk carries its committed positions: without, the engine hands
    them a block of tokens at a time, and a failure mid-block leaves no proof of the whole text),
    "" serves honestly. Only this instance is patched (its class still says it takes ``on_cut``), and
    unpatched on the way out, so no bound method keeps the model alive past its node."""
    real_run = service.run

    async def run(body: dict[str, Any], emit: Any, **kwargs: Any) -> Any:
        async def emit_then_fail(data: dict[str, Any]) -> None:
            await emit(data)
            if mode[0] == "mid" and data.get("text"):
                raise ClawnodeError(ErrorCode.INTERNAL, INJECTED)

        usage = await real_run(body, emit_then_fail, **kwargs)
        if mode[0] == "end":
            raise ClawnodeError(ErrorCode.INTERNAL, INJECTED)
        return usage

    service.run = run
    try:
        yield
    finally:
        del service.run


async def test_a_provider_that_streams_then_sends_an_error_frame_without_a_proof_is_let_go_once_then_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)

    async def no_proof(*args: Any) -> None:
        return None  # a cheat (or an older provider) sends its error frame without the proof

    # raising=False: the code before this change has no such method (its error frames never carry one).
    monkeypatch.setattr(ServingRole, "_failed_call_proof", no_proof, raising=False)
    async with market_nodes([{"models": (_spec(path),)}, {"models": (_spec(path),)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        chunks: list[dict[str, Any]] = []

        async def collect(data: dict[str, Any]) -> None:
            chunks.append(data)

        with _failing_after_text(provider.market.services.get("model:tiny"), ["end"]):
            # The default sample rate: a provider's first call (and every call after a failed check) is checked.
            lease = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
            # Its first such call since a passed check is let go (an older provider's error frame has no proof):
            # paid its chunks, unchecked, and the caller gets the provider's own error.
            with pytest.raises(ClawnodeError) as let_go:
                await consumer.market.stream_call(lease.lease_id, CHAT, collect)
            assert (let_go.value.code, let_go.value.message) == (ErrorCode.INTERNAL, INJECTED)
            assert consumer.market.verifying.book.get(provider_id) is None
            first_paid = consumer.market.held[lease.lease_id].seen_units
            assert first_paid > 0
            chunks.clear()
            with pytest.raises(ClawnodeError) as caught:
                await consumer.market.stream_call(lease.lease_id, CHAT, collect)
            assert "".join(chunk.get("text", "") for chunk in chunks)  # the reply was handed on before the error
            assert caught.value.code == ErrorCode.FORBIDDEN and caught.value.reason == "verification_no_proof"
            record = consumer.market.verifying.book.get(provider_id)
            assert record is not None and (record.failed, record.last_reason) == (1, "no_proof")
            assert consumer.market.verifying.standing(provider_id) == 0.0  # the router ranks it last
            held = consumer.market.held.get(lease.lease_id)
            assert held is None or held.seen_units == first_paid  # its units are taken back: the call is not owed
            with pytest.raises(ClawnodeError) as ended:  # the lease is ended: no further call is sent on it
                await consumer.market.call(lease.lease_id, CHAT)
            assert ended.value.code in (ErrorCode.CONFLICT, ErrorCode.NOT_FOUND)


async def test_an_honest_call_that_fails_after_streaming_carries_its_proof_and_passes_the_check(
    tmp_path: Path,
) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    mode = [""]
    async with market_nodes([{"models": (_spec(path),)}, {"models": (_spec(path),)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        consumer.market.verifying.sample_rate = 1.0  # verify.sample_rate: every call is checked
        with _failing_after_text(provider.market.services.get("model:tiny"), mode):
            lease = await consumer.market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
            for passed, mode[0] in enumerate(("end", "mid"), start=1):
                body = {**CHAT, "logprobs": True} if mode[0] == "mid" else CHAT
                with pytest.raises(ClawnodeError) as caught:
                    await consumer.market.call(lease.lease_id, body)
                # The provider's own error, not a verification failure: its proof passed the check.
                assert (caught.value.code, caught.value.message) == (ErrorCode.INTERNAL, INJECTED)
                record = consumer.market.verifying.book.get(provider_id)
                assert record is not None and (record.passed, record.failed) == (passed, 0)
            held = consumer.market.held[lease.lease_id]
            assert held.seen_units > 0  # the replies streamed before the errors are paid
            mode[0] = ""
            assert (await consumer.market.call(lease.lease_id, CHAT)).units > 0  # the lease stays usable
            assert consumer.market.verifying.standing(provider_id) > 0.5
