"""A GGUF loaded with its layers on RPC servers (each reached at a loopback ``host:port``).

llama-cpp-python's ``Llama()`` builds ``llama_model_params`` itself and takes no device list: for
the length of one load, ``llama_model_default_params`` hands out params naming the RPC devices (the
same hook, under the same lock, as the engine's load-progress callback). All layers and the output
head go to the servers, in the proportions ``shares`` (llama.cpp's ``tensor_split``: contiguous
layer ranges, the first server the first layers); only the token embeddings (a lookup) stay here.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from runtime.errors import ClawnodeError, ErrorCode
from runtime.inference import engine
from runtime.inference.engine import LlamaModel
from runtime.split import rpc
from runtime.split.layout import layer_ranges, shares_for


class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]  # llama_model_tensor_buft_override


# The output head's weight (its own, or the token embeddings it is tied to, loaded once more for it).
HEAD_PATTERN = rb"^(output|token_embd)\.weight$"


@contextlib.contextmanager
def _devices_in_params(devices: Sequence[int], head_local: bool) -> Iterator[None]:
    import llama_cpp.llama_cpp as bindings

    array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)  # NULL-terminated
    overrides = (_BuftOverride * 2)()
    if head_local:
        overrides[0] = _BuftOverride(HEAD_PATTERN, rpc.cpu_buffer_type())
    with engine._DEFAULT_PARAMS_LOCK:
        original = bindings.llama_model_default_params

        def params_with_devices() -> Any:
            params = original()
            params.devices = ctypes.cast(array, ctypes.c_void_p)
            # Plain CPU buffers here too (no repacking): the head computes as a server would.
            params.use_extra_bufts = False
            if head_local:
                params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
            return params

        bindings.llama_model_default_params = params_with_devices
        try:
            yield
        finally:
            bindings.llama_model_default_params = original


@contextlib.contextmanager
def _plain_cpu_buffers() -> Iterator[None]:
    import llama_cpp.llama_cpp as bindings

    with engine._DEFAULT_PARAMS_LOCK:
        original = bindings.llama_model_default_params

        def params_without_repacking() -> Any:
            params = original()
            params.use_extra_bufts = False
            return params

        bindings.llama_model_default_params = params_without_repacking
        try:
            yield
        finally:
            bindings.llama_model_default_params = original


class PlainCpuLlamaModel(LlamaModel):
    """A whole model that computes as an RPC server does: no CPU weight repacking
    (``use_extra_bufts = False``). The server keeps weights in plain CPU buffers; the local CPU
    backend repacks quantised weights into interleaved layouts whose sums round differently, so
    greedy text drifts apart after some tokens (gemma3-270m: after about a dozen)."""

    def _load_blocking(self, progress: Any = None) -> Any:
        with _plain_cpu_buffers():
            return super()._load_blocking(progress)


class SplitLlamaModel(LlamaModel):
    """A :class:`LlamaModel` whose layers run on the RPC servers at ``endpoints`` (``host:port``)."""

    def __init__(
        self,
        path: Path | str,
        *,
        endpoints: Sequence[str],
        shares: Sequence[float] | None = None,
        head_local: bool = True,
        **kwargs: Any,
    ) -> None:
        if not endpoints:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "a split model needs at least one layer server")
        kwargs.setdefault("parallel", 1)
        # No saved prefixes: saving one reads the sequence's KV cache back, and here it lives on the
        # layer servers, one GET_TENSOR round trip per cell row per layer (9258 for gemma3-270m after
        # a 48-token answer, ~1 ms each through a tunnel) before the next prompt's first token.
        kwargs.setdefault("prefix_cache_mb", 0)
        super().__init__(path, n_gpu_layers=-1, **kwargs)
        self.endpoints = list(endpoints)
        self.shares = list(shares) if shares is not None else [1.0] * len(self.endpoints)
        self.head_local = head_local
        if len(self.shares) != len(self.endpoints):
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "one share per layer server")

    def _llama_kwargs(self) -> dict[str, Any]:
        kwargs = super()._llama_kwargs()
        kwargs["tensor_split"] = self.shares
        return kwargs

    def _load_blocking(self, progress: Any = None) -> Any:
        if not rpc.rpc_available():
            raise rpc.unavailable()
        devices: list[int] = []
        for endpoint in self.endpoints:
            found = rpc.server_devices(endpoint)
            devices.append(found[0])  # a server's first device: this project's servers serve one
        with _devices_in_params(devices, self.head_local):
            return super()._load_blocking(progress)


__all__ = ["PlainCpuLlamaModel", "SplitLlamaModel", "layer_ranges", "shares_for"]
