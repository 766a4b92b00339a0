"""ctypes bindings to llama.cpp's RPC backend (``libggml-rpc.so``, built with ``-DGGML_RPC=ON``).

llama-cpp-python 0.3.36 binds none of it, and ``llama_model_params`` has no ``rpc_servers`` any more:
a client adds each server with ``ggml_backend_rpc_add_server(endpoint)`` (one registry per endpoint,
one device per server-side device) and names the devices in ``llama_model_params.devices``. The
devices are never registered globally: another model loaded in the same process stays local.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from runtime.errors import ClawnodeError, ErrorCode

NO_RPC = "rpc_unavailable"  # stable reason: the installed llama.cpp was built without GGML_RPC
RPC_LIBRARY = "libggml-rpc.so"
GGML_LIBRARY = "libggml.so"
DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type


def library_dir() -> Path | None:
    """The folder of the installed llama_cpp package's shared libraries (without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        lib = Path(folder) / "lib"
        if lib.is_dir():
            return lib
    return None


def rpc_library_path() -> Path | None:
    """``libggml-rpc.so`` of the installed llama.cpp, or None where it was built without RPC."""
    lib = library_dir()
    if lib is None:
        return None
    path = lib / RPC_LIBRARY
    return path if path.is_file() else None


def rpc_available() -> bool:
    return rpc_library_path() is not None


def unavailable() -> ClawnodeError:
    return ClawnodeError(
        ErrorCode.UNAVAILABLE,
        "this node's llama.cpp is built without its RPC backend (rebuild with CMAKE_ARGS=-DGGML_RPC=ON)",
        NO_RPC,
    )


@functools.cache
def _libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """libggml (registry) and libggml-rpc, the very files llama_cpp loads (one copy of their state)."""
    path = rpc_library_path()
    if path is None:
        raise unavailable()
    mode = getattr(os, "RTLD_GLOBAL", 0)
    ggml = ctypes.CDLL(str(path.parent / GGML_LIBRARY), mode=mode)
    rpc = ctypes.CDLL(str(path), mode=mode)
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ggml.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_get_device_memory.argtypes = [
        ctypes.c_char_p,
        ctypes.c_uint32,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    rpc.ggml_backend_rpc_get_device_memory.restype = None
    return ggml, rpc


def cpu_buffer_type() -> int:
    """``ggml_backend_cpu_buffer_type()``: plain host memory of the CPU backend."""
    ggml, _ = _libraries()
    cpu = ctypes.CDLL(str(Path(ggml._name).parent / "libggml-cpu.so"), mode=getattr(os, "RTLD_GLOBAL", 0))
    cpu.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    return int(cpu.ggml_backend_cpu_buffer_type())


def server_devices(endpoint: str) -> list[int]:
    """The devices of the RPC server at ``host:port`` (connects to it; blocks)."""
    ggml, rpc = _libraries()
    reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
    if not reg:
        raise ClawnodeError(ErrorCode.UNAVAILABLE, "the RPC server answered no devices", "rpc_no_devices")
    return [int(ggml.ggml_backend_reg_dev_get(reg, i)) for i in range(int(ggml.ggml_backend_reg_dev_count(reg)))]


def serve(endpoint: str, n_threads: int, cache_dir: str | None = None) -> None:
    """Serve this machine's CPU device at ``host:port`` until the process ends (never returns)."""
    ggml, rpc = _libraries()
    cpu = ggml.ggml_backend_dev_by_type(DEVICE_TYPE_CPU)
    if not cpu:
        raise ClawnodeError(ErrorCode.UNAVAILABLE, "no CPU device", "rpc_no_devices")
    devices = (ctypes.c_void_p * 1)(cpu)
    rpc.ggml_backend_rpc_start_server(
        endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, 1, devices
    )
