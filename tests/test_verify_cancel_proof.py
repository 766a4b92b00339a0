"""Verified inference (issue 21): an honest provider proves a reply it streamed before the consumer's cancel,
every time, so an end frame that answers the cancel without a proof counts as an unproved cut (let go once
between passed checks, caught the next time), not as a free pass.

Before, the cancel stopped the service before the engine's last commitment block reached the provider's
recorder (a block is handed out after its last token's text, or as the cancel ends it), so a provider that
paused past ``stall_s`` mid-block sent no proof; and the proof's prompt was tokenized again through the
engine's admission queue, behind any other generation, past the consumer's 1 s drain (and holding an
honest end frame as long). So a proof-less answer to the cancel was let go every time, and a cheat that
stalled at the end of every reply was paid unchecked. Now the engine's unsent chunks give the recorder
their blocks (never the consumer), and the proof binds the prompt ids the engine decoded."""

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

from protocols.lease.verifying import prompt_ids
from protocols.machines.lease_consumer import (
    CUT_ENDINGS,
    CallEnding,
    call_ending,
    cut_forgiven,
    ending_checked,
    unproved_cut,
)
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference import engine
from runtime.inference.engine import LlamaModel
from runtime.inference.models import ModelSpec
from runtime.inference.sampling import Sampling
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.verify import check
from runtime.verify.commitment import K
from tests.support.market import market_nodes
from tests.test_verify_stall import CHAT, STALL_S, _stream_ready

MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "Which model are you?"}]  # CHAT's


# -- the rule ------------------------------------------------------------------------------------


def test_a_provider_that_answers_every_cancel_without_a_proof_is_let_go_once_then_checked() -> None:
    ending = call_ending("end", left=True, provider_stopped=True)  # stalled after text, the cancel answered
    assert ending is CallEnding.CANCELLED and ending_checked(ending, 5)
    let_go = []
    for earlier in range(3):  # its unproved cuts since its last passed check
        assert unproved_cut(ending, 5, proof_sent=False)
        let_go.append(cut_forgiven(ending, False, earlier))
    assert let_go == [True, False, False]  # the second is checked: drawn, it fails no_proof
    # With a proof it is checked every time (an honest one passes); before any text nothing is checked.
    assert not unproved_cut(ending, 5, proof_sent=True) and not cut_forgiven(ending, True, 0)
    assert not unproved_cut(ending, 0, proof_sent=False)


@given(st.sampled_from(list(CallEnding)), st.integers(-1, 10**6), st.booleans(), st.integers(0, 5))
def test_every_unproved_ending_after_text_counts_alike(
    ending: CallEnding, text_tokens: int, proof_sent: bool, earlier: int
) -> None:
    # An end frame answering the cancel is no exception: as an error frame or a stop without a proof.
    assert CallEnding.CANCELLED in CUT_ENDINGS
    assert unproved_cut(ending, text_tokens, proof_sent) == (
        ending in CUT_ENDINGS and text_tokens > 0 and not proof_sent
    )
    assert cut_forgiven(ending, proof_sent, earlier) == (ending in CUT_ENDINGS and not proof_sent and earlier == 0)


# -- the engine ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer's checks load the file for their prefill into a per-process cache: this module's
    go with its tests, not on to interpreter exit (where llama-cpp-python's ``__del__`` complains)."""
    monkeypatch.setattr(check, "_prefills", {})


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("cancel_proof") / "tiny.gguf", seed=0)


@contextlib.contextmanager
def _slow_tokens(monkeypatch: pytest.MonkeyPatch, seconds: float) -> Iterator[None]:
    """Each sampled token takes ``seconds`` more on the engine's worker: a cancel lands mid-generation."""
    step = engine._Choice.step

    def slow(self: Any, logits: Any) -> int | None:
        import time

        time.sleep(seconds)
        return step(self, logits)

    monkeypatch.setattr(engine._Choice, "step", slow)
    try:
        yield
    finally:
        monkeypatch.setattr(engine._Choice, "step", step)


@pytest.mark.parametrize("parallel", [1, 2])
async def test_a_stream_left_mid_block_keeps_the_block_of_every_token_handed_out_and_its_prompt_ids(
    tiny_path: Path, parallel: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = LlamaModel(tiny_path, name="tiny", n_ctx=256, n_threads=1, parallel=parallel)
    await model.load()
    try:
        sampling = Sampling(temperature=0.8, commit_top=K)
        with _slow_tokens(monkeypatch, 0.01):
            stream = model.stream_generate(messages=MESSAGES, max_tokens=150, sampling=sampling, seed=3)
            handed = committed = 0
            async with stream:
                async for chunk in stream:
                    handed += chunk["tokens"]
                    committed += sum(len(block) for block in chunk.get("commit", []))
                    if handed >= 3:
                        break  # left in the middle of the first block (256 tokens)
        assert stream.completion is None and committed == 0
        # The block the cancel ended was kept for the stream's owner: it covers every token handed out.
        kept = [block for chunk in stream.unread for block in chunk.get("commit", [])]
        assert sum(len(block) for block in kept) >= handed
        # The prompt ids the engine decoded are the ones the verifier renders (a v2 body binds them).
        assert stream.prompt_ids is not None
        assert stream.prompt_ids == await prompt_ids(model, {"messages": MESSAGES}, len(stream.prompt_ids))
    finally:
        await model.aclose()


# -- end to end ----------------------------------------------------------------------------------


def _spec(path: Path, parallel: int | None = None) -> ModelSpec:
    return ModelSpec(  # type: ignore[call-arg]
        name="tiny", path=str(path), price_per_unit=1000, n_threads=1, n_ctx=256, parallel=parallel
    )


@contextlib.contextmanager
def _pausing_mid_reply(service: Any, after: list[int]) -> Iterator[None]:
    """The provider's own model service goes silent past the consumer's stall once ``after[0]`` tokens of
    its reply have left (an honest provider on a busy machine), until the consumer's cancel."""
    real_run = service.run

    async def run(body: dict[str, Any], emit: Any, **kwargs: Any) -> Any:
        tokens = 0

        async def pausing(data: dict[str, Any]) -> None:
            nonlocal tokens
            await emit(data)
            if data.get("text") and tokens < after[0] <= tokens + data["tokens"]:
                tokens += data["tokens"]
                await trio.sleep(20 * STALL_S)  # the consumer's cancel ends it
            tokens += data.get("tokens", 0) if data.get("text") else 0

        return await real_run(body, pausing, **kwargs)

    service.run = run
    try:
        yield
    finally:
        del service.run


async def test_an_honest_provider_that_stalls_mid_reply_proves_it_in_the_cancels_end_frame_every_time(
    tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with market_nodes([{"models": (_spec(tiny_path),)}, {"models": (_spec(tiny_path),)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        market = consumer.market
        market.verifying.sample_rate = 1.0  # every call is checked
        texts: list[str] = []

        async def collect(data: dict[str, Any]) -> None:
            texts.append(data.get("text", ""))

        after = [1]
        body = {**CHAT, "max_tokens": 40}
        with _pausing_mid_reply(provider.market.services.get("model:tiny"), after):
            lease = await market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
            paid = 0
            # Paused after a few tokens: the first time with the engine still generating (the cancel ends
            # its block mid-way), then with the engine done and its last block unread by the service.
            for calls, (pause_after, token_s) in enumerate(((1, 0.03), (2, 0.003), (20, 0.003)), start=1):
                after[0] = pause_after
                texts.clear()
                await _stream_ready(consumer, provider)  # the stall times the pause, not a new stream's negotiation
                with _slow_tokens(monkeypatch, token_s), pytest.raises(ClawnodeError) as caught:
                    await market.stream_call(lease.lease_id, body, collect, stall_s=STALL_S)
                assert "".join(texts)  # a part of the reply was handed on, then the provider went silent
                assert caught.value.code == ErrorCode.TIMEOUT  # the stall's own error: its check passed
                record = market.verifying.book.get(provider_id)
                assert record is not None and (record.passed, record.failed) == (calls, 0)
                assert market.verifying.unproved_cut(provider_id) == 0  # proved: no cut counted
                assert market.held[lease.lease_id].seen_units > paid  # its chunks are paid
                paid = market.held[lease.lease_id].seen_units


async def test_a_proof_is_not_held_behind_another_generation_in_the_engines_queue(tiny_path: Path) -> None:
    spec = _spec(tiny_path, parallel=1)
    async with market_nodes([{"models": (spec,)}, {"models": (spec,)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        market = consumer.market
        market.verifying.sample_rate = 1.0
        service: Any = provider.market.services.get("model:tiny")
        real_run = service.run
        released = trio.Event()
        pause = [False]

        async with trio.open_nursery() as nursery:

            async def run(body: dict[str, Any], emit: Any, **kwargs: Any) -> Any:
                usage = await real_run(body, emit, **kwargs)
                # Another consumer's call is admitted as this one's generation ends, before its proof is built.
                admitted = await nursery.start(_hold_engine, service.model, released)
                assert admitted
                if pause[0]:
                    await trio.sleep(20 * STALL_S)  # silent past the stall: the consumer's cancel ends it
                return usage

            service.run = run
            try:
                lease = await market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
                # 1. Its end frame leaves at once with its proof: the call ends well, its check passes.
                await _stream_ready(consumer, provider)  # the stall times the pause, not a new stream's negotiation
                end = await market.stream_call(lease.lease_id, CHAT, _ignore, stall_s=STALL_S)
                assert end.verify is not None
                record = market.verifying.book.get(provider_id)
                assert record is not None and (record.passed, record.failed) == (1, 0)
                released.set()
                # 2. Stalled, its cancel's end frame too comes within the consumer's drain, with its proof.
                released = trio.Event()
                pause[0] = True
                await _stream_ready(consumer, provider)
                with pytest.raises(ClawnodeError) as caught:
                    await market.stream_call(lease.lease_id, CHAT, _ignore, stall_s=STALL_S)
                assert caught.value.code == ErrorCode.TIMEOUT
                record = market.verifying.book.get(provider_id)
                assert record is not None and (record.passed, record.failed) == (2, 0)
            finally:
                released.set()
                del service.run


async def _hold_engine(model: LlamaModel, until: trio.Event, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with model.stream_generate(messages=MESSAGES, max_tokens=4):
        task_status.started(True)
        with trio.move_on_after(8):
            await until.wait()


async def _ignore(data: dict[str, Any]) -> None:
    return None
