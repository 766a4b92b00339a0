"""Chunks that piled up while the wire was slow go out merged, but never as one frame larger than a
call frame may be: one reply of 1,900 tokens with 20 logprobs each, read slowly, was merged into one
2.5 MB chunk, past the 1 MiB frame bound, so the provider failed the call after generating it all
(billed the first chunk only; an honest consumer on a slow link lost its answer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from protocols.lease.base import MAX_CALL_FRAME
from runtime.inference.engine import LlamaModel
from runtime.inference.service import ChatService, merge_chunks


async def test_a_slowly_read_long_reply_goes_out_in_frames_the_wire_takes(tiny_path: Path) -> None:
    model = LlamaModel(tiny_path, name="tiny", n_ctx=2048, n_threads=1)
    await model.load()
    try:
        sizes: list[int] = []
        tokens = 0

        async def emit(chunk: dict[str, Any]) -> None:
            nonlocal tokens
            sizes.append(len(json.dumps({"data": chunk})))
            tokens += chunk["tokens"]
            if len(sizes) == 1:
                await trio.sleep(2.5)  # a slow link: the engine finishes the reply meanwhile

        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1900,
            "logprobs": True,
            "top_logprobs": 20,
            "temperature": 1.0,
            "seed": 1,
            "logit_bias": {"0": -100, "1": -100, "2": -100},  # no end token: the whole 1,900
        }
        usage = await ChatService(model).run(body, emit)
        assert usage.detail["completion_tokens"] == tokens == 1900
        assert max(sizes) < MAX_CALL_FRAME // 4, max(sizes)
    finally:
        await model.aclose()


def test_held_chunks_merge_into_bounded_chunks() -> None:
    chunks = [{"tokens": 1, "text": "ab", "logprobs": [{"token": "ab", "logprob": -1.0}]} for _ in range(1000)]
    merged = merge_chunks([dict(c) for c in chunks])
    assert sum(c["tokens"] for c in merged) == 1000
    assert "".join(c["text"] for c in merged) == "ab" * 1000
    assert max(c["tokens"] for c in merged) <= 64
