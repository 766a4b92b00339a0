"""Verified inference (issue 21): a provider that streams a chat reply's chunks with tokens and no text is
checked like one that streams text. Every chunk's tokens are paid; before, only chunks with text counted
as the reply the spot check covers, so a provider that streamed ``{"tokens": n}`` chunks was paid for a
reply its caller never saw and, its check seeing no reply (its end frame without a proof, naming no
completion tokens), was never checked. The rule is ``protocols.machines.lease_calls.reply_tokens``; one
test runs real nodes, a real lease and the tiny model."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hypothesis import given
from hypothesis import strategies as st

from protocols.machines.lease_calls import chunk_tokens, generation_body, reply_tokens
from protocols.machines.lease_consumer import CUT_ENDINGS, CallEnding, ending_checked
from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference.tiny_model import write_tiny_llama_gguf
from runtime.service import Usage
from runtime.verify import check
from tests.support.market import market_nodes
from tests.test_verify_stall import CHAT, _spec

_values = st.none() | st.booleans() | st.integers(-5, 10**6) | st.text(max_size=8) | st.lists(st.floats(), max_size=3)
_chunks = st.dictionaries(
    st.sampled_from(["text", "tokens", "index", "embeddings", "finish_reason", "logprobs"]), _values, max_size=6
)
_generation = st.one_of(
    st.fixed_dictionaries({"messages": st.just([{"role": "user", "content": "hi"}])}),
    st.fixed_dictionaries({"prompt": st.text(max_size=8) | st.lists(st.integers(0, 99), min_size=1, max_size=4)}),
).map(lambda body: {**body, "max_tokens": 8})
_embeddings = st.fixed_dictionaries({"input": st.text(max_size=8) | st.lists(st.text(max_size=4), max_size=3)})


@given(_generation, _chunks)
def test_every_chunk_of_a_generation_is_part_of_the_reply_checked_text_or_not(
    body: dict[str, Any], chunk: dict[str, Any]
) -> None:
    assert generation_body(body)
    assert reply_tokens(body, chunk) == chunk_tokens(chunk)  # checked as it is paid


@given(_embeddings, _chunks)
def test_an_embeddings_chunk_is_no_reply_to_check(body: dict[str, Any], chunk: dict[str, Any]) -> None:
    assert not generation_body(body)
    vectors = {key: value for key, value in chunk.items() if key != "text"}
    assert reply_tokens(body, vectors) == 0  # vectors (or anything without text) are not checked as a reply
    # A chunk with text counts as it always did, on any body: nothing is checked less than before.
    assert reply_tokens(body, {**chunk, "text": "x"}) == chunk_tokens({**chunk, "text": "x"})


@given(_generation | _embeddings, st.lists(_chunks, max_size=6))
def test_an_honest_engines_chunks_count_as_before_and_never_more_than_they_are_paid(
    body: dict[str, Any], chunks: list[dict[str, Any]]
) -> None:
    for chunk in chunks:
        before = chunk_tokens(chunk) if isinstance(chunk.get("text"), str) else 0  # the rule this replaces
        assert before <= reply_tokens(body, chunk) <= chunk_tokens(chunk)
        if isinstance(chunk.get("text"), str):  # every chunk an honest engine sends of a reply, in every release
            assert reply_tokens(body, chunk) == before


@given(st.lists(st.integers(1, 1000), min_size=1, max_size=5), st.sampled_from(sorted(CUT_ENDINGS)))
def test_a_cut_reply_of_textless_chunks_is_checked(tokens: list[int], ending: CallEnding) -> None:
    # What ``stream_call`` sums and hands ``ending_checked``: a provider that failed or stopped after
    # text-less chunks it was paid for is checked as one that streamed text (it was let go before).
    generated = sum(reply_tokens(CHAT, {"tokens": n}) for n in tokens)
    assert generated == sum(tokens) and ending_checked(ending, generated)


@pytest.fixture(autouse=True)
def _own_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    """The consumer's checks load the file for their prefill into a per-process cache: this module's
    go with its tests, not on to interpreter exit (where llama-cpp-python's ``__del__`` complains)."""
    monkeypatch.setattr(check, "_prefills", {})


CHUNKS, TOKENS = 4, 2  # the cheat's reply: 4 chunks of 2 tokens each, no text


@contextlib.contextmanager
def _textless(service: Any) -> Iterator[None]:
    """The provider's own model service, replaced by a cheat's: it streams chunks with tokens and no text
    (nothing its engine ran, so the provider's real serving code signs no proof) and reports no
    completion tokens. Only this instance is patched, and unpatched on the way out."""

    async def run(body: dict[str, Any], emit: Any, **kwargs: Any) -> Usage:
        for _ in range(CHUNKS):
            # A finish reason on each: the provider's serving code joins none of them (its join assumes text).
            await emit({"tokens": TOKENS, "finish_reason": "length"})
        return Usage(units=CHUNKS * TOKENS + 10, detail={"prompt_tokens": 10, "completion_tokens": 0})

    service.run = run
    try:
        yield
    finally:
        del service.run


async def test_a_provider_that_streams_textless_chunks_is_checked_and_its_call_not_owed(tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    async with market_nodes([{"models": (_spec(path),)}, {"models": (_spec(path),)}]) as (nodes, _):
        consumer, provider = nodes
        provider_id = str(provider.host.get_id())
        market = consumer.market
        chunks: list[dict[str, Any]] = []

        async def collect(data: dict[str, Any]) -> None:
            chunks.append(data)

        with _textless(provider.market.services.get("model:tiny")):
            # The default sample rate: a provider's first call is always checked.
            lease = await market.open_lease(provider_id, "model:tiny", budget=10**9, duration_s=60)
            with pytest.raises(ClawnodeError) as caught:
                await market.stream_call(lease.lease_id, CHAT, collect)
        # The caller was handed chunks with no text: paid for before, never checked.
        assert len(chunks) == CHUNKS and not any(chunk.get("text") for chunk in chunks)
        assert caught.value.code == ErrorCode.FORBIDDEN and caught.value.reason == "verification_no_proof"
        record = market.verifying.book.get(provider_id)
        assert record is not None and (record.failed, record.last_reason) == (1, "no_proof")
        held = market.held.get(lease.lease_id)
        assert held is None or held.seen_units == 0  # the call's units are not owed
        with pytest.raises(ClawnodeError) as ended:  # the lease is ended: no further call is sent on it
            await market.call(lease.lease_id, CHAT)
        assert ended.value.code in (ErrorCode.CONFLICT, ErrorCode.NOT_FOUND)
