"""A plain reply (text, no logprobs or tool calls) that piled up while the engine outran the wire goes
out in few chunks: at most 64 tokens a chunk made a fast engine's 256-token reply 6-7 frames, each one
framing, Noise and Yamux work on both nodes (issue 19). Its chunks stay far under the call frame bound;
chunks with logprobs keep the 64-token bound (tests/inference/test_chunk_frames.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from protocols.lease.base import MAX_CALL_FRAME
from runtime.inference.engine import LlamaModel
from runtime.inference.service import ChatService, merge_chunks


def test_a_held_plain_reply_merges_into_one_chunk_and_long_text_stays_bounded() -> None:
    chunks = [{"tokens": 1, "text": "ab"} for _ in range(1000)]
    merged = merge_chunks([dict(c) for c in chunks])
    assert merged == [{"tokens": 1000, "text": "ab" * 1000}]

    wide = [{"tokens": 1, "text": "\u2028" * 100} for _ in range(1000)]  # 100 characters a token
    merged = merge_chunks([dict(c) for c in wide])
    assert sum(c["tokens"] for c in merged) == 1000
    assert "".join(c["text"] for c in merged) == "\u2028" * 100_000
    assert max(len(json.dumps({"data": c})) for c in merged) < MAX_CALL_FRAME // 4


async def test_a_slowly_read_plain_reply_goes_out_in_few_chunks(tiny_path: Path) -> None:
    model = LlamaModel(tiny_path, name="tiny", n_ctx=2048, n_threads=1)
    await model.load()
    try:
        chunks: list[dict[str, Any]] = []

        async def emit(chunk: dict[str, Any]) -> None:
            chunks.append(chunk)
            if len(chunks) == 1:
                await trio.sleep(1.5)  # a slow link: the engine finishes the reply meanwhile

        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1500,
            "temperature": 1.0,
            "seed": 1,
            "logit_bias": {"0": -100, "1": -100, "2": -100},  # no end token: the whole 1,500
        }
        usage = await ChatService(model).run(body, emit)
        assert usage.detail["completion_tokens"] == sum(c["tokens"] for c in chunks) == 1500
        # The first token, then the rest as it piled up: 1,024 tokens a chunk at most (64 before: 24).
        assert len(chunks) <= 4, [c["tokens"] for c in chunks]
        assert max(len(json.dumps({"data": c})) for c in chunks) < MAX_CALL_FRAME // 4
    finally:
        await model.aclose()
