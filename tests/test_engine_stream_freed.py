"""A finished generation's stream is freed as soon as nothing refers to it, without the garbage
collector: one left to the collector per call (a reference cycle between the stream, its request and
the request's prompt closure) is memory a busy provider holds until the next collection, each with
its prompt ids, pieces and commitment blocks. With the collector off, a real model's stream is gone
once its last reference is and the engine's worker has moved on to the next generation, and its prompt
ids were still read while it lived."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from runtime.inference.engine import LlamaModel
from runtime.inference.tiny_model import write_tiny_llama_gguf


async def test_a_finished_streams_memory_is_freed_without_the_garbage_collector(tmp_path: Path) -> None:
    model = LlamaModel(write_tiny_llama_gguf(tmp_path / "tiny.gguf"), n_ctx=128)
    await model.load()
    gc.collect()
    gc.disable()
    try:
        stream = model.stream_chat([{"role": "user", "content": "hi"}], max_tokens=4)
        async with stream:
            pieces = [piece async for piece in stream]
        assert pieces and stream.prompt_ids  # the engine's own prompt ids, known after the decode
        freed = weakref.ref(stream)
        del stream
        # The worker's loop holds its last finished sequence until its next one: a second generation.
        async with model.stream_chat([{"role": "user", "content": "hello"}], max_tokens=2) as second:
            assert [piece async for piece in second]
        assert freed() is None  # no cycle kept it: freed by reference counting alone
    finally:
        gc.enable()
        await model.aclose()
