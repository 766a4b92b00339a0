"""The provider's recorder encodes each full chunk of positions as the reply streams; its commitment is
still byte for byte the one ``commit`` builds from the whole reply at the end."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.verify.commitment import CHUNK, K, Position, commit
from runtime.verify.provider import CallRecorder


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
