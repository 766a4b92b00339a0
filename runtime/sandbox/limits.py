"""What a sandboxed run may use, what it produced, and the stable codes of its refusals and kills.

A run ends in one of two ways:

* a :class:`RunResult`: the program ran and its outcome is *deterministic* (the same module, input
  and limits give the same output hash, fuel and outcome on any machine): it exited, trapped, or a
  deterministic limit stopped it (fuel, memory, output). Anyone can re-run it and compare.
* a :class:`~runtime.errors.ClawnodeError` with a stable reason from :class:`SandboxReason`: the
  run was refused before it started (module too large, bad hash, forbidden import, limits above
  this node's) or killed by a limit that is not deterministic (the wall clock). Such a run proves
  nothing and is never submitted as a result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from runtime.errors import ClawnodeError, ErrorCode

MiB = 1024 * 1024


class Outcome(StrEnum):
    """How a run that ran ended; each is deterministic for a given module, input and limits."""

    EXITED = "exited"  # returned from _start or called proc_exit; ``exit_code`` says how
    TRAP = "trap"  # a wasm trap (unreachable, out-of-bounds access, ...), or a native signal
    FUEL_EXHAUSTED = "fuel_exhausted"  # the fuel cap was spent (native: the CPU-seconds cap)
    MEMORY_LIMIT = "memory_limit"  # a trap with the memory at its cap, or memory refused at start
    OUTPUT_LIMIT = "output_limit"  # wrote more than the output cap


KILLED_BY_LIMIT = frozenset({Outcome.FUEL_EXHAUSTED, Outcome.MEMORY_LIMIT, Outcome.OUTPUT_LIMIT})


class SandboxReason(StrEnum):
    """Stable reasons of the sandbox's refusals (with ``ErrorCode``); once published they keep their meaning."""

    MODULE_TOO_LARGE = "module_too_large"  # E_INVALID_ARGUMENT
    MODULE_INVALID = "module_invalid"  # E_INVALID_ARGUMENT: not a wasm module (or not an ELF program)
    MODULE_HASH_MISMATCH = "module_hash_mismatch"  # E_INVALID_ARGUMENT: the bytes are not the named sha256
    MODULE_UNKNOWN = "module_unknown"  # E_NOT_FOUND: not in this node's module cache
    IMPORT_NOT_ALLOWED = "import_not_allowed"  # E_FORBIDDEN: imports outside the sandbox's ABI
    NO_ENTRY_POINT = "no_entry_point"  # E_INVALID_ARGUMENT: no exported _start
    INPUT_TOO_LARGE = "input_too_large"  # E_INVALID_ARGUMENT
    LIMITS_TOO_HIGH = "limits_too_high"  # E_FORBIDDEN: asks more than this node grants
    KIND_NOT_ACCEPTED = "kind_not_accepted"  # E_FORBIDDEN: this node does not run that kind
    WALL_CLOCK = "wall_clock"  # E_TIMEOUT: killed at the wall-clock cap (not deterministic)
    SANDBOX_UNAVAILABLE = "sandbox_unavailable"  # E_UNAVAILABLE: bubblewrap missing or refused to start


def refuse(code: ErrorCode, reason: SandboxReason, message: str) -> ClawnodeError:
    return ClawnodeError(code, message, str(reason))


MAX_INPUT_BYTES = 1024 * 1024  # a run's input, whatever the kind


def checked_program(program: bytes, sha256: str | None, max_bytes: int, noun: str) -> str:
    """The sha256 of a module or program a runner is asked to load; refused when it is larger than
    ``max_bytes`` or is not the ``sha256`` it was named by (``noun``: "module", "program")."""
    if len(program) > max_bytes:
        raise refuse(
            ErrorCode.INVALID_ARGUMENT, SandboxReason.MODULE_TOO_LARGE, f"{noun}s are at most {max_bytes} bytes"
        )
    digest = sha256_hex(program)
    if sha256 is not None and sha256 != digest:
        raise refuse(
            ErrorCode.INVALID_ARGUMENT, SandboxReason.MODULE_HASH_MISMATCH, f"the {noun} is not the named sha256"
        )
    return digest


def check_run(limits: Limits, cap: Limits, input: bytes) -> None:
    """A run asks no more than the node's ``cap`` grants, on an input within :data:`MAX_INPUT_BYTES`."""
    if not limits.within(cap):
        raise refuse(ErrorCode.FORBIDDEN, SandboxReason.LIMITS_TOO_HIGH, "the limits exceed this node's caps")
    if len(input) > MAX_INPUT_BYTES:
        raise refuse(
            ErrorCode.INVALID_ARGUMENT, SandboxReason.INPUT_TOO_LARGE, f"inputs are at most {MAX_INPUT_BYTES} bytes"
        )


class Limits(BaseModel):
    """What one run may use. ``fuel`` is wasm instructions (native: CPU-milliseconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fuel: int = Field(10_000_000, ge=1, le=10**13)
    memory_bytes: int = Field(16 * MiB, ge=64 * 1024, le=4096 * MiB)
    wall_s: float = Field(5.0, gt=0, le=3600)
    output_bytes: int = Field(64 * 1024, ge=0, le=16 * MiB)
    pids: int = Field(16, ge=1, le=4096, description="native only: processes and threads")

    def within(self, cap: Limits) -> bool:
        """Does this run ask no more than ``cap`` grants?"""
        return (
            self.fuel <= cap.fuel
            and self.memory_bytes <= cap.memory_bytes
            and self.wall_s <= cap.wall_s
            and self.output_bytes <= cap.output_bytes
            and self.pids <= cap.pids
        )


@dataclass(frozen=True)
class RunResult:
    """A run that ran: what it wrote (at most the output cap), its hash, the fuel it used, how it ended."""

    output: bytes
    output_sha256: str
    fuel_used: int
    outcome: Outcome
    exit_code: int | None  # for EXITED
    denied_calls: tuple[str, ...] = ()  # system calls the sandbox refused (escape attempts), in order, bounded
    wall_s: float = 0.0

    @property
    def killed_by_limit(self) -> bool:
        return self.outcome in KILLED_BY_LIMIT

    @property
    def ok(self) -> bool:
        return self.outcome == Outcome.EXITED and self.exit_code == 0


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
