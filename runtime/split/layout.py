"""Where a split model's layers go: llama.cpp's placement rule and the layers of a GGUF file.

``layer_ranges`` is how llama.cpp places layers for ``tensor_split`` shares, ``shares_for`` the shares
that give each server exactly the layer counts a placement chose, and ``file_layers`` reads how many
layers a GGUF holds and how large its largest is (its tensor table only, through ggml's own reader).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ClawnodeError, ErrorCode

GGML_BASE_LIBRARY = "libggml-base.so"


def layer_ranges(n_layers: int, shares: Sequence[float]) -> list[tuple[int, int]]:
    """The ``[start, end)`` layers each server holds, as llama.cpp places them for ``shares``:
    layer ``i`` goes to the first device whose cumulative share exceeds ``i / (n_layers + 1)`` (the
    output head counts as layer ``n_layers``: it goes to the last server)."""
    total = float(sum(shares))
    if n_layers < 1 or not shares or total <= 0 or any(s < 0 for s in shares):
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "layer shares must be positive")
    # As llama.cpp computes them: the running sums first, each then divided by the total (dividing
    # first would round 1/5 + 2/5 above 3/5 and move a layer).
    bounds: list[float] = []
    running = 0.0
    for share in shares:
        running += share
        bounds.append(running / total)
    owner = []
    for layer in range(n_layers):
        at = layer / (n_layers + 1)
        owner.append(next((i for i, b in enumerate(bounds) if at < b), len(shares) - 1))
    ranges = []
    for index in range(len(shares)):
        mine = [layer for layer, o in enumerate(owner) if o == index]
        ranges.append((mine[0], mine[-1] + 1) if mine else (0, 0))
    return ranges


def shares_for(counts: Sequence[int]) -> list[float]:
    """``tensor_split`` shares under which llama.cpp gives server ``k`` exactly ``counts[k]`` layers
    (in order): the counts themselves, the last one more for the head's slot (layer ``n_layers``)."""
    if not counts or any(c < 1 for c in counts):
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "every server holds at least one layer")
    shares = [float(c) for c in counts]
    shares[-1] += 1.0
    return shares


@dataclass(frozen=True)
class FileLayers:
    """A GGUF's transformer layers: how many, and the bytes of the largest one's tensors."""

    count: int
    max_bytes: int


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]  # struct gguf_init_params


@functools.cache
def _ggml_base() -> ctypes.CDLL | None:
    from runtime.split import rpc

    folder = rpc.library_dir()
    if folder is None or not (folder / GGML_BASE_LIBRARY).is_file():
        return None
    lib = ctypes.CDLL(str(folder / GGML_BASE_LIBRARY), mode=getattr(os, "RTLD_GLOBAL", 0))
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_size.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_size.restype = ctypes.c_size_t
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.gguf_free.restype = None
    return lib


def file_layers(path: Path | str) -> FileLayers | None:
    """The layers (``blk.<i>.*`` tensors) of the GGUF at ``path``, or None where ggml's reader is
    missing or the file is no GGUF (blocks: it reads the file's header and tensor table)."""
    lib = _ggml_base()
    if lib is None:
        return None
    ctx = lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(True, None))
    if not ctx:
        return None
    sizes: dict[int, int] = {}
    try:
        for index in range(int(lib.gguf_get_n_tensors(ctx))):
            parts = (lib.gguf_get_tensor_name(ctx, index) or b"").split(b".")
            if len(parts) > 2 and parts[0] == b"blk" and parts[1].isdigit():
                layer = int(parts[1])
                sizes[layer] = sizes.get(layer, 0) + int(lib.gguf_get_tensor_size(ctx, index))
    finally:
        lib.gguf_free(ctx)
    if not sizes:
        return None
    return FileLayers(max(sizes) + 1, max(sizes.values()))
