"""The tiny random-weight model, written once per session; a loaded engine per test (trio run)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

from runtime.inference.engine import LlamaModel
from runtime.inference.tiny_model import write_tiny_llama_gguf


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", seed=0)


@pytest.fixture
async def tiny(tiny_path: Path) -> AsyncIterator[LlamaModel]:
    model = LlamaModel(tiny_path, name="tiny", n_ctx=512, n_threads=1)
    await model.load()
    try:
        yield model
    finally:
        await model.aclose()
