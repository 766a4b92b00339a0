"""A provider that bills more tokens than its own proof commits is not paid for them.

The consumer pays a call's end frame within the chunks' ``tokens`` and the prompt's estimate
(``end_frame_verdict``). A provider that streamed its real reply with each chunk's ``tokens`` inflated
and a valid proof of the real tokens was paid up to ``max_tokens`` plus the estimate for a short reply,
on every call, checked or not (the check compares the proof with the text, which was real); one that
billed the prompt's estimate instead of the prompt it signed was paid that too. Now a frame is also
held to the proof it carries (``protocols.machines.lease_calls.proof_meter_verdict``): refused, counted
as nothing, and the lease ended. Pure tests of the rule, and one with real nodes, a real lease and the
tiny model, whose honest calls (ended by ``max_tokens``, by a stop string, cancelled) are paid as
before: their chunks' tokens are exactly the tokens their proofs commit."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import trio
from hypothesis import given
from hypothesis import strategies as st

from protocols.machines.lease_calls import (
    CHUNKS_OVER_PROOF,
    END_FRAME_OVER_PROOF,
    UNITS_OVER_PROOF,
    ProvedCounts,
    chunk_tokens,
    end_frame_verdict,
    prompt_units_estimate,
    proof_meter_verdict,
)
from protocols.machines.lease_consumer import end_frame_units
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.service import Usage
from runtime.verify import check
from tests.support.market import market_nodes, wait_for
from tests.test_verify_stall import CHAT, _spec

_counts = st.builds(ProvedCounts, st.integers(1, 4096), st.integers(1, 4096), st.integers(0, 4096))
_units = st.integers(0, 10**6)


@given(_units, _units)
def test_a_frame_without_a_proof_is_bounded_as_before(claimed: int, received: int) -> None:
    assert proof_meter_verdict(claimed, received, None) is None
    before = end_frame_verdict(claimed, received, CHAT)
    assert end_frame_units(claimed, received, CHAT, None) == (claimed if before is None else before)


@given(_units, _units, _counts)
def test_a_frame_is_paid_no_more_than_its_proof_commits(claimed: int, received: int, proved: ProvedCounts) -> None:
    verdict = proof_meter_verdict(claimed, received, proved)
    committed = min(proved.completion_tokens, proved.token_ids)
    admitted = received <= committed and claimed <= proved.prompt_tokens + committed
    assert (verdict is None) == admitted
    if verdict is not None:
        assert (verdict.code, verdict.reason) == (ErrorCode.CONFLICT, END_FRAME_OVER_PROOF)
        assert verdict.message == (CHUNKS_OVER_PROOF if received > committed else UNITS_OVER_PROOF)
    # Only ever lowers what is paid: a frame end_frame_verdict refuses stays refused, whatever the proof.
    counted = end_frame_units(claimed, received, CHAT, proved)
    if end_frame_verdict(claimed, received, CHAT) is not None or verdict is not None:
        assert not isinstance(counted, int)
    else:
        assert counted == claimed


@given(st.integers(1, 4096), st.integers(1, 4096), st.integers(0, 4096))
def test_an_honest_frame_is_paid_exactly(prompt: int, completion: int, cut: int) -> None:
    # An honest end frame: its chunks' tokens are the committed tokens, its units the signed prompt plus
    # those; a cut call's frame bills the chunks written and the prompt it decoded, which its proof signs.
    proved = ProvedCounts(prompt, completion, completion)
    assert proof_meter_verdict(prompt + completion, completion, proved) is None
    written = min(cut, completion)
    assert proof_meter_verdict(prompt + written, written, proved) is None
    # A forged proof with bigger numbers gains nothing over end_frame_verdict's bound.
    big = ProvedCounts(2 * prompt, 10 * completion, 10 * completion)
    assert proof_meter_verdict(prompt + completion, completion, big) is None


@given(st.integers(1, 64), st.integers(2, 5))
def test_inflated_chunks_with_a_real_proof_are_refused(tokens: int, factor: int) -> None:
    proved = ProvedCounts(20, tokens, tokens)
    refused = proof_meter_verdict(20 + factor * tokens, factor * tokens, proved)
    assert refused is not None and refused.message == CHUNKS_OVER_PROOF
    # The prompt part: honest chunks, the prompt's estimate billed instead of the prompt signed.
    refused = proof_meter_verdict(prompt_units_estimate(CHAT) + tokens, tokens, proved)
    assert refused is not None and refused.message == UNITS_OVER_PROOF


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer's checks load the file for their prefill into a per-process cache: this module's
    go with its tests, not on to interpreter exit (where llama-cpp-python's ``__del__`` complains)."""
    monkeypatch.setattr(check, "_prefills", {})


FACTOR = 3  # the cheat's chunks claim 3 tokens a real one


@contextlib.contextmanager
def _cheating(market: Any, service: Any, mode: str) -> Iterator[None]:
    """The provider's own model service, wrapped by a cheat's: the real engine serves the call and the
    provider's serving code signs the proof of its real tokens, while the cheat inflates each chunk's
    ``tokens`` (``mode`` "chunks": ``FACTOR`` times, its end frame billing them; "error": so, then
    failing the call, its error frame billing the chunks with the proof of the real tokens, which the
    provider's own code would leave out) or bills the prompt's whole estimate instead of the prompt it
    decoded ("prompt"). Only these instances are patched."""
    original, proof_of = service.run, market._failed_call_proof

    async def run(body: dict[str, Any], emit: Any, **kwargs: Any) -> Usage:
        async def inflated(data: dict[str, Any]) -> None:
            if mode != "prompt" and data.get("tokens"):
                data = {**data, "tokens": data["tokens"] * FACTOR}
            await emit(data)

        usage = await original(body, inflated, **kwargs)
        if mode == "error":
            raise ClawnodeError(ErrorCode.INTERNAL, "failed after the reply")
        completion = usage.detail["completion_tokens"]
        units = FACTOR * completion + usage.detail["prompt_tokens"]
        if mode == "prompt":
            units = completion + prompt_units_estimate(CHAT)
        return Usage(units=units, detail=usage.detail)

    async def unguarded(recorder: Any, *args: Any) -> Any:
        *rest, ticket, decoded = args
        streamed, ticket.streamed = ticket.streamed, len(recorder.tokens)  # past the guard on a short proof
        try:
            return await proof_of(recorder, *rest, ticket, decoded)
        finally:
            ticket.streamed = streamed

    service.run, market._failed_call_proof = run, unguarded
    try:
        yield
    finally:
        del service.run, market._failed_call_proof


async def test_a_provider_billing_past_its_proof_is_not_paid_and_an_honest_one_is(tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    async with market_nodes([{"models": (_spec(path),)}, {"models": (_spec(path),)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id, market = str(provider.host.get_id()), consumer.market
        service = provider.market.services.get("model:tiny")

        # Honest calls, on the real engine: each chunk's tokens add up to the tokens its proof commits,
        # and its end frame to those and the prompt it signs; paid that, as the provider meters it.
        lease = await market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
        held, served = market.held[lease.lease_id], provider.market.served[lease.lease_id]

        async def honest(body: dict[str, Any]) -> tuple[str, str]:
            chunks: list[dict[str, Any]] = []

            async def collect(data: dict[str, Any]) -> None:
                chunks.append(data)

            before = held.seen_units
            end = await market.stream_call(lease.lease_id, body, collect)
            assert end.verify is not None
            signed = end.verify.commitment.body
            assert sum(chunk_tokens(c) for c in chunks) == signed.completion_tokens == len(end.verify.tokens)
            assert end.units == signed.prompt_tokens + signed.completion_tokens == held.seen_units - before
            finish = [c["finish_reason"] for c in chunks if "finish_reason" in c]
            return "".join(c.get("text", "") for c in chunks), finish[-1]

        text, finish = await honest(CHAT)
        assert finish == "length"  # cut by max_tokens
        stop = text[len(text) // 2 :][:2]
        _, finish = await honest({**CHAT, "stop": [stop]})
        assert finish == "stop"  # its stop string's tokens are paid and committed alike

        # Cancelled after its first chunk: the end frame that answers the cancel carries the proof of what
        # was written, and is paid as before.
        drained: list[Any] = []
        leave = market._leave_call

        async def leave_call(*args: Any) -> Any:
            drained.append(await leave(*args))
            return drained[-1]

        market._leave_call = leave_call  # type: ignore[method-assign,assignment]
        with trio.CancelScope() as scope:

            async def cancel(data: dict[str, Any]) -> None:
                scope.cancel()

            await market.stream_call(lease.lease_id, {**CHAT, "max_tokens": 64}, cancel)
        del market._leave_call
        assert drained[0].last == "end" and drained[0].proof is not None and drained[0].counted > 0
        await wait_for(lambda: served.session.units_metered == held.seen_units, 10, what="both sides agree")

        # A cheat inflating its chunks' tokens, one billing the prompt's estimate, one inflating its chunks
        # and failing the call: refused, nothing counted, the lease ended. Before, the first was paid 3
        # times its reply, the second the estimate, the third 3 times its reply.
        for mode in ("chunks", "prompt", "error"):
            cheated = await market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
            failures = market.failures[("call", ErrorCode.CONFLICT.value)]
            with _cheating(provider.market, service, mode), pytest.raises(ClawnodeError) as caught:
                await market.call(cheated.lease_id, CHAT)
            if mode == "error":  # the call's own error, its bill refused beside it
                assert caught.value.code == ErrorCode.INTERNAL
            else:
                assert (caught.value.code, caught.value.reason) == (ErrorCode.CONFLICT, END_FRAME_OVER_PROOF), mode
            assert market.failures[("call", ErrorCode.CONFLICT.value)] == failures + 1
            gone = market.held.get(cheated.lease_id)
            assert gone is None or gone.seen_units == 0
            with pytest.raises(ClawnodeError) as ended:  # no further call is sent on it
                await market.call(cheated.lease_id, CHAT)
            assert ended.value.code in (ErrorCode.CONFLICT, ErrorCode.NOT_FOUND)
