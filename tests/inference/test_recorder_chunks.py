"""The provider's recorder encodes each full chunk of positions as the reply streams; its commitment is
still byte for byte the one ``commit`` builds from the whole reply at the end."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.inference.sampling import CommitBlock
from runtime.verify.commitment import CHUNK, K, Position, commit, encode_chunk
from runtime.verify.provider import CallRecorder, encode_block


def _rows(rng: random.Random, n: int) -> list[tuple[int, tuple[tuple[int, float], ...]]]:
    """``n`` positions: a produced id and 1..K alternatives (fewer: a small vocabulary, -inf ones)."""
    return [
        (rng.randrange(300_000), tuple((rng.randrange(300_000), -rng.random() * 40) for _ in range(rng.randint(1, K))))
        for _ in range(n)
    ]


class _NoIndex:
    def id_of(self, entry: dict[str, object]) -> int:
        raise AssertionError("the commit entries carry ids")


@settings(max_examples=25, deadline=None)
@given(
    st.randoms(use_true_random=False),
    st.integers(1, 5 * CHUNK + 3),
    st.lists(st.integers(1, 2 * CHUNK + 1), min_size=1),
)
def test_a_reply_streamed_in_any_blocks_commits_to_the_same_bytes(
    rng: random.Random, n: int, blocks: list[int]
) -> None:
    rows = _rows(rng, n)
    recorder = CallRecorder({"messages": [{"role": "user", "content": "hi"}]}, _NoIndex())
    at = 0
    while at < len(rows):
        size = blocks[at % len(blocks)]
        shown = recorder.see({"text": "x", "commit": rows[at : at + size]})
        assert "commit" not in shown  # kept for the commitment, never shown
        at += size
    got = recorder.finish()
    want = commit([Position(token, top) for token, top in rows])
    assert got is not None
    assert got.chunks == want.chunks
    assert got.n_tokens == want.n_tokens == len(rows)
    assert got.root == want.root


def test_a_reply_with_nothing_produced_commits_to_nothing() -> None:
    recorder = CallRecorder({"messages": [{"role": "user", "content": "hi"}]}, _NoIndex())
    recorder.see({"text": ""})
    assert recorder.finish() is None


def _block(rng: np.random.Generator, n: int, n_vocab: int, kind: str) -> CommitBlock:
    """A block as ``CommitRows.take`` hands it out: ids best first, float32 logprobs and values."""
    ids = np.stack([rng.choice(n_vocab, size=K, replace=False) for _ in range(n)])
    values = np.sort(rng.normal(size=(n, K)).astype(np.float32) * 8, axis=1)[:, ::-1].copy()
    logprobs = (values - np.float32(rng.uniform(8, 30))).astype(np.float32)
    tokens = [int(row[0]) if rng.random() < 0.8 else int(rng.integers(n_vocab)) for row in ids]
    if kind == "halves":  # -logprob * 16 exactly half-way between two bytes: rounded half to even
        logprobs = (-(rng.integers(0, 600, size=(n, K)) + 0.5) / 16).astype(np.float32)
    if kind == "positive":  # a logprob a hair above 0 (float error): its byte is 0
        logprobs[:, 0] = np.float32(1e-6)
    if kind == "masked":  # an -inf alternative: left out, the position padded (encode_chunk's way)
        values[0, K - 1] = logprobs[0, K - 1] = -np.inf
    return CommitBlock(tokens, ids, logprobs, values)


@pytest.mark.parametrize("n_vocab", [100, 356, 20_000, 262_144])
@pytest.mark.parametrize("kind", ["plain", "halves", "positive", "masked"])
def test_a_block_of_positions_is_encoded_from_its_arrays_to_the_same_bytes(n_vocab: int, kind: str) -> None:
    """The recorder encodes the engine's blocks from their arrays (``encode_block``): the very bytes
    ``encode_chunk`` gives their positions, varints of every length, rounding and clipping included, and
    the same commitment whether the blocks come whole, cut across chunks, or as tuples."""
    rng = np.random.default_rng(n_vocab + len(kind))
    blocks = [_block(rng, size, n_vocab, kind) for size in (100, 32, 32, 7, 32, 1, 40)]
    for block in blocks:
        positions = [Position(token, top) for token, top in block.entries()]
        for start, stop in ((0, len(block)), (0, 1), (3, len(block))):
            if start >= stop:
                continue
            encoded = encode_block(block, start, stop)
            if not np.isfinite(block.values[start:stop]).all():
                assert encoded is None  # padded by encode_chunk instead
            else:
                assert encoded == encode_chunk(positions[start:stop])
    as_blocks = CallRecorder({"messages": [{"role": "user", "content": "hi"}]}, _NoIndex())
    as_tuples = CallRecorder({"messages": [{"role": "user", "content": "hi"}]}, _NoIndex())
    for block in blocks:
        as_blocks.see({"text": "x", "commit": [block]})
        as_tuples.see({"text": "x", "commit": block.entries()})
    want = commit([Position(token, top) for block in blocks for token, top in block.entries()])
    for recorder in (as_blocks, as_tuples):
        got = recorder.finish()
        assert got is not None and got.chunks == want.chunks and got.root == want.root
    assert as_blocks.positions == as_tuples.positions
    assert len(as_blocks.positions) == sum(len(block) for block in blocks)
