"""What hardware this node advertises: detected cores and memory, the GPU as configured."""

from __future__ import annotations

import os
from typing import Protocol

import psutil

from dht.records import Hardware


class GpuSettings(Protocol):
    @property
    def gpu_model(self) -> str: ...

    @property
    def vram_mb(self) -> int: ...


def detect_hardware(gpu: GpuSettings) -> Hardware:
    return Hardware(
        gpu_model=gpu.gpu_model or None,
        vram_mb=gpu.vram_mb,
        cores=os.cpu_count() or 1,
        ram_mb=psutil.virtual_memory().total // (1 << 20),
    )
