"""One node's sandboxes: the kinds it runs, the caps it grants, and the runners behind them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from runtime.errors import ClawnodeError, ErrorCode
from runtime.sandbox.limits import Limits, RunResult, SandboxReason, refuse
from runtime.sandbox.native import NativeSandbox
from runtime.sandbox.stats import SandboxStats
from runtime.sandbox.wasm import MAX_MODULE_BYTES, WasmSandbox

log = logging.getLogger("runtime.sandbox")

Kind = Literal["wasm", "native"]
KINDS: tuple[Kind, ...] = ("wasm", "native")


@dataclass(frozen=True)
class SandboxPolicy:
    """What this node runs (``[sandbox]`` in the config)."""

    kinds: frozenset[str] = frozenset({"wasm"})
    auto_run: bool = True
    auto_arbitrate: bool = True
    cap: Limits = field(default_factory=lambda: Limits(fuel=10**10, memory_bytes=256 * 1024 * 1024, wall_s=60.0))
    max_module_bytes: int = MAX_MODULE_BYTES
    concurrency: int = 2


class Sandboxes:
    """The node's runners by kind; ``native`` is built on first use (its runs need bubblewrap)."""

    def __init__(self, policy: SandboxPolicy | None = None, stats: SandboxStats | None = None) -> None:
        self.policy = policy or SandboxPolicy()
        self.stats = stats or SandboxStats()
        self.wasm = WasmSandbox(
            max_module_bytes=self.policy.max_module_bytes,
            cap=self.policy.cap,
            stats=self.stats,
            concurrency=self.policy.concurrency,
        )
        self._native: NativeSandbox | None = None

    def accepts(self, kind: str) -> bool:
        return kind in self.policy.kinds

    def _runner(self, kind: str) -> WasmSandbox | NativeSandbox:
        if kind == "wasm":
            return self.wasm
        if kind == "native":
            if self._native is None:
                self._native = NativeSandbox(
                    max_program_bytes=self.policy.max_module_bytes,
                    cap=self.policy.cap,
                    stats=self.stats,
                    concurrency=self.policy.concurrency,
                )
                if self._native.cgroup_mode == "cgroup_v1":
                    log.info("native runs: a cgroup of their own each (memory, pids, cpu) and rlimits")
                else:
                    log.info("native runs: rlimits only, no per-run cgroup (%s)", self._native.cgroup_mode)
                if self._native.clock_mode == "pinned":
                    log.info("native runs: the clock pinned (libfaketime), reproducible by an arbiter")
                else:
                    log.info("native runs: the host's clock, not reproducible (%s)", self._native.clock_mode)
            return self._native
        raise refuse(ErrorCode.FORBIDDEN, SandboxReason.KIND_NOT_ACCEPTED, "no sandbox runs that kind")

    def has(self, kind: str, sha256: str) -> bool:
        try:
            return self._runner(kind).has(sha256)
        except ClawnodeError:
            return False

    def load(self, kind: str, module: bytes, sha256: str | None = None) -> str:
        return self._runner(kind).load(module, sha256)

    async def run(self, kind: str, sha256: str, input: bytes, limits: Limits, *, salt: bytes = b"") -> RunResult:
        """Run a loaded module; ``salt`` changes a ``native`` run's random stream (``wasm`` reads none)."""
        runner = self._runner(kind)
        if isinstance(runner, NativeSandbox):
            return await runner.run_async(sha256, input, limits, salt)
        return await runner.run_async(sha256, input, limits)

    def run_sync(self, kind: str, sha256: str, input: bytes, limits: Limits, *, salt: bytes = b"") -> RunResult:
        """:meth:`run` in the calling thread (a bench, a worker thread): never on the trio loop."""
        runner = self._runner(kind)
        if isinstance(runner, NativeSandbox):
            return runner.run(sha256, input, limits, salt=salt)
        return runner.run(sha256, input, limits)
