"""Verified inference's top-k kept a block of tokens at a time (``CommitRows``, ``ChatService.run(...,
commit=k)``) gives the very figures the per-token logprobs give: the commitment stays bit-exact."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from runtime.errors import ClawnodeError
from runtime.inference.engine import LlamaModel
from runtime.inference.sampling import CommitRows, Sampling, TokenPicker
from runtime.inference.service import ChatService
from runtime.verify.check import index_for
from runtime.verify.commitment import K, commit
from runtime.verify.provider import CallRecorder


def _rows(rng: np.random.Generator, count: int, n_vocab: int, kind: str) -> np.ndarray:
    rows = (rng.normal(size=(count, n_vocab)) * rng.uniform(0.5, 20)).astype(np.float32)
    if kind == "ties":  # whole numbers: many equal logits, also at the k-th place
        rows = np.round(rows / 4).astype(np.float32)
    if kind == "masked":  # -inf entries, as a grammar's mask or a bias leaves them
        rows[rng.random(rows.shape) < 0.3] = -np.inf
    return rows


@pytest.mark.parametrize("n_vocab", [3, 356, 5000])
@pytest.mark.parametrize("kind", ["plain", "ties", "masked"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_block_of_rows_gives_the_top_k_of_pick_exactly(n_vocab: int, kind: str, temperature: float) -> None:
    rng = np.random.default_rng(n_vocab + len(kind) + int(10 * temperature))
    k = K
    picker = TokenPicker(Sampling(temperature=temperature, logprobs=True, top_logprobs=min(k, n_vocab)), n_vocab, 1)
    kept = CommitRows(k, n_vocab)
    expected, got = [], []
    for row in _rows(rng, 600, n_vocab, kind):  # two whole blocks and a part (or many of one row)
        try:
            pick = picker.pick(row, Counter(), None)
        except ClawnodeError:  # every entry -inf: pick refuses it, nothing is produced
            continue
        expected.append((pick.token, pick.top))
        got += kept.add(row, pick.token) or []
    got += kept.flush()
    assert len(got) == len(expected) > 0
    assert got == expected  # ids, order and float values, exactly
    assert commit([_position(p) for p in got]).root == commit([_position(p) for p in expected]).root
    assert kept.flush() == []


def _position(entry: tuple[int, tuple[tuple[int, float], ...]]) -> Any:
    from runtime.verify.commitment import Position

    return Position(entry[0], entry[1])


ASK = [{"role": "user", "content": "Tell me about the sea."}]


async def _serve(model: LlamaModel, body: dict[str, Any], commit_k: int) -> tuple[list[dict[str, Any]], Any]:
    chunks: list[dict[str, Any]] = []

    async def emit(data: dict[str, Any]) -> None:
        chunks.append(data)

    service = ChatService(model)
    usage = await (service.run(body, emit, commit=commit_k) if commit_k else service.run(body, emit))
    return chunks, usage


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 5}])
async def test_a_call_served_with_commit_records_what_top_logprobs_record(
    tiny: LlamaModel, tiny_path: Path, sampling: dict[str, Any]
) -> None:
    """The provider's recorder gets the same positions (hence the same commitment root) whether the engine
    hands them out as logprobs per token or as blocks of ``commit`` entries; the text and every token
    count stay as they were, and no logprobs reach the consumer."""
    index = await trio.to_thread.run_sync(index_for, tiny_path)
    body = {"messages": ASK, "max_tokens": 70, **sampling}  # one block: two whole chunks of 32 and a tail

    old = CallRecorder(body, index)
    old_chunks, old_usage = await _serve(tiny, old.body, 0)
    shown_old = [old.see(chunk) for chunk in old_chunks]

    new = CallRecorder(body, index)
    new_chunks, new_usage = await _serve(tiny, body, K)
    shown_new = [new.see(chunk) for chunk in new_chunks]

    assert new_usage == old_usage and new_usage.detail["completion_tokens"] == 70
    assert len(new.positions) == len(old.positions) == 70
    assert new.positions == old.positions
    assert new.finish() is not None and old.finish() is not None
    assert new.finish().root == old.finish().root  # type: ignore[union-attr]
    assert new.text == old.text
    assert sum(chunk.get("tokens", 0) for chunk in shown_new) == 70
    assert all("logprobs" not in chunk and "commit" not in chunk for chunk in shown_new + shown_old)
    assert "".join(c.get("text", "") for c in shown_new) == "".join(c.get("text", "") for c in shown_old)


async def test_commit_under_a_grammar_falls_back_to_logprobs(tiny: LlamaModel, tiny_path: Path) -> None:
    """A constrained reply's committed figures are its constrained distribution's: carried as logprobs."""
    body = {
        "messages": ASK,
        "max_tokens": 6,
        "temperature": 0,
        "response_format": {"type": "json_object"},
    }
    chunks, _ = await _serve(tiny, body, K)
    entries = [entry for chunk in chunks for entry in chunk.get("logprobs", [])]
    assert len(entries) == 6 and all(len(entry["top_logprobs"]) >= 1 for entry in entries)
    assert not any("commit" in chunk for chunk in chunks)


def test_a_chunks_encoding_is_the_commitments_bytes_as_before() -> None:
    """``encode_chunk`` (rewritten for speed) gives the bytes the commitment always had: the produced
    token as 0, other ids + 1 as LEB128 varints (multi-byte past 127), quantised logprobs clipped at 255,
    a short top padded with clipped entries and a long one cut to k."""
    from runtime.verify.commitment import Position, encode_chunk

    positions = [
        Position(7, ((7, -0.01), (300, -2.5), (12, -3.03125), (262143, -40.0))),
        Position(127, ((126, -0.5), (127, -0.75), (128, -16.0), (5, -15.97))),
        Position(3, ((3, -0.0),)),
        Position(9, ((1, -1.0), (2, -2.0), (3, -3.0), (4, -4.0), (5, -5.0))),
    ]
    expected = "00ad020d808010002830ff7f00810106080cffff0000000000ffffff0203040510203040"
    assert encode_chunk(positions).hex() == expected
