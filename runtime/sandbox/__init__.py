"""Sandboxed execution of task programs on this node: ``wasm`` (wasmtime) and ``native`` (bubblewrap).

Knows nothing of libp2p or the task market: it takes module bytes, an input and limits, and answers
a :class:`RunResult` (output, its sha256, the fuel used, how it ended) or a refusal with a stable
code (:class:`SandboxReason`). Runs happen in worker threads or child processes, never on the loop.
"""

from runtime.sandbox.limits import KILLED_BY_LIMIT, Limits, Outcome, RunResult, SandboxReason, sha256_hex
from runtime.sandbox.runner import KINDS, Sandboxes, SandboxPolicy
from runtime.sandbox.stats import SandboxStats
from runtime.sandbox.wasm import WasmSandbox

__all__ = [
    "KILLED_BY_LIMIT",
    "KINDS",
    "Limits",
    "Outcome",
    "RunResult",
    "SandboxPolicy",
    "SandboxReason",
    "SandboxStats",
    "Sandboxes",
    "WasmSandbox",
    "sha256_hex",
]
