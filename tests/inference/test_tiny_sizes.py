"""The tiny model's sizes: the default writes the same bytes as ever (every test's model), and a wider,
deeper one (the bench's ``tiny-wide`` stand-in for a GPU engine's token rate) is what it says and, like
the default, never ends a greedy reply before ``max_tokens``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from runtime.inference.engine import LlamaModel
from runtime.inference.tiny_model import write_tiny_llama_gguf

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

# sha256 of the default model (seed 0, the ChatML template, 64 dims, 2 layers, ff 128), as written
# before the sizes were arguments: the tests' determinism figures are this file's.
DEFAULT_SHA256 = "9294f1b785ca917fe0489d8f263f2bf100920e331e2c92bdfc88fa1c5c86c2f9"


def test_the_default_model_keeps_its_bytes(tiny_path: Path) -> None:
    assert hashlib.sha256(tiny_path.read_bytes()).hexdigest() == DEFAULT_SHA256


async def test_a_wider_deeper_model_loads_with_its_sizes_and_runs_to_max_tokens(tmp_path: Path) -> None:
    path = write_tiny_llama_gguf(tmp_path / "wide.gguf", n_embd=128, n_layer=3, n_ff=256)
    model = LlamaModel(path, name="wide", n_ctx=256, n_threads=1)
    report = await model.load()
    try:
        assert report.metadata["llama.embedding_length"] == "128"
        assert report.metadata["llama.block_count"] == "3"
        assert report.metadata["llama.feed_forward_length"] == "256"
        messages = [{"role": "user", "content": "Say something."}]
        first = await model.chat(messages, max_tokens=40, temperature=0)
        again = await model.chat(messages, max_tokens=40, temperature=0)
        assert first.finish_reason == "length" and first.usage.completion_tokens == 40
        assert first.text.strip() and first.text.isprintable() and first.text == again.text
    finally:
        await model.aclose()


def test_sizes_that_cannot_make_heads_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_tiny_llama_gguf(tmp_path / "odd.gguf", n_embd=100)
