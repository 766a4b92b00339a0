"""What the split-model tests share: the mark that skips them where llama.cpp lacks its RPC backend."""

from __future__ import annotations

import pytest

from runtime.split import rpc

needs_rpc = pytest.mark.skipif(
    not rpc.rpc_available(),
    reason="llama-cpp-python is built without its RPC backend (libggml-rpc): rebuild with "
    "CMAKE_ARGS='-DGGML_RPC=ON' pip install --no-cache-dir llama-cpp-python (scripts/test does)",
)
