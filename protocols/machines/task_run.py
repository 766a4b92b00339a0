"""The rules of sandboxed tasks (``wasm``, ``native``): who runs, who may fetch the module, and the
arbiter's decision by re-execution. Pure: facts in, a typed verdict out; the adapter
(``protocols/task/runner.py``) fetches, runs and acts.

The arbiter's decision (:func:`rerun_verdict`), for a task whose terms leave the dispute to
re-execution (``arbitration = "rerun"``):

* no party served the program the task names within :data:`MODULE_DEADLINE_S` of the arbiter's
  first ask (``module_wait_verdict``) -> everything to the seller (``module_withheld``): the burden
  of producing it lies with the creator, who published it, keeps it until the task closes and is
  the party that rejected the result (or let its review time out); a creator whose rejection is
  right has every reason to serve it, so one that does not forfeits the dispute;
* the arbiter could not re-run it otherwise (the module or limits are refused by the arbiter's
  sandbox, the wall clock killed its run) -> ``escalate``: a person decides;
* the re-run's output has the sha256 and size the seller signed, and (``wasm``) the same fuel,
  outcome and exit code as its signed usage -> everything to the seller (``rerun_matches``);
  the program failing (a trap, a limit) is still the program the buyer named, faithfully run;
* otherwise -> everything back to the buyer (``output_differs`` / ``usage_differs``);
* but a ``native`` program whose re-run differs from the claim is run a second time, and when the
  arbiter's own two runs (the second on another random stream) differ the program is not
  reproducible (its output depends on randomness or the clock): re-execution proves nothing either
  way -> ``escalate`` (``not_reproducible``), so an honest seller of a non-deterministic program is
  never refunded away by a re-run.

``native`` runs are compared on output hash, size, outcome and exit code only: CPU time is not
deterministic across machines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from protocols.machines.verdict import Refusal
from runtime.errors import ErrorCode

# How long the arbiter of a disputed sandboxed task keeps asking the parties for its program before
# the creator is held to have withheld it (``module_wait_verdict``), and how often it asks again.
MODULE_DEADLINE_S = 300.0
MODULE_RETRY_S = 10.0


def _refuse(code: ErrorCode, reason: str, message: str) -> Refusal:
    return Refusal(code, reason, message)


@dataclass(frozen=True)
class RunFacts:
    """The awarded seller, before it runs a task: does it run this kind, within its caps, by itself?"""

    kind: str
    accepted: bool  # the kind is in this node's [sandbox] kinds
    automatic: bool  # [sandbox] auto_run (seller) or auto_arbitrate (arbiter)
    within_caps: bool  # the task's limits are within this node's caps
    module_size_ok: bool


def run_verdict(f: RunFacts) -> Refusal | None:
    if not f.automatic:
        return _refuse(ErrorCode.CONFLICT, "not_automatic", "this node runs sandboxed tasks only when asked")
    if not f.accepted:
        return _refuse(ErrorCode.FORBIDDEN, "kind_not_accepted", f"this node does not run {f.kind} tasks")
    if not f.module_size_ok:
        return _refuse(ErrorCode.INVALID_ARGUMENT, "module_too_large", "the module is larger than this node takes")
    if not f.within_caps:
        return _refuse(ErrorCode.FORBIDDEN, "limits_too_high", "the task's limits exceed this node's caps")
    return None


def module_request_verdict(
    remote: str,
    creator: str,
    awarded_bidder: str | None,
    arbiter: str,
    held: str | None,
    wanted: str,
    panel: tuple[str, ...] = (),
) -> Refusal | None:
    """A task's module is served to its awarded seller and its arbiter (or its panel's members), by
    whoever holds it."""
    if remote not in (creator, arbiter, *panel) and remote != awarded_bidder:
        return _refuse(
            ErrorCode.FORBIDDEN, "not_a_party", "only the task's awarded seller and arbiter fetch its module"
        )
    if held is None or held != wanted:
        return _refuse(ErrorCode.NOT_FOUND, "module_unknown", "this node does not hold that module")
    return None


def module_wait_verdict(waited_s: float, deadline_s: float) -> Literal["ask_again", "withheld"]:
    """The arbiter got no program from either party ``waited_s`` after its first ask: ask again, or,
    past the deadline, hold the creator to have withheld it (``rerun_refusal = "module_withheld"``)."""
    return "withheld" if waited_s >= deadline_s else "ask_again"


@dataclass(frozen=True)
class Usage:
    fuel_used: int
    outcome: str
    exit_code: int | None


@dataclass(frozen=True)
class RerunFacts:
    kind: str
    price: int
    claimed_sha256: str  # the seller's signed result
    claimed_size: int
    claimed_usage: Usage | None  # signed with it
    rerun_sha256: str | None  # None: the arbiter could not re-run
    rerun_size: int = 0
    rerun_usage: Usage | None = None
    rerun_refusal: str | None = None  # the sandbox's stable reason (or module_withheld), when it could not re-run
    rerun_reproducible: bool = True  # False: the arbiter's second run of a native program differed from its first


@dataclass(frozen=True)
class RerunVerdict:
    action: Literal["resolve", "escalate"]
    to_bidder: int
    reason: str


def rerun_verdict(f: RerunFacts) -> RerunVerdict:
    if f.rerun_refusal == "module_withheld":  # the creator's burden, unmet by the deadline
        return RerunVerdict("resolve", f.price, "module_withheld")
    if f.rerun_sha256 is None or f.rerun_usage is None:
        return RerunVerdict("escalate", 0, f.rerun_refusal or "rerun_unavailable")
    if not f.rerun_reproducible:
        return RerunVerdict("escalate", 0, "not_reproducible")
    if (f.rerun_sha256, f.rerun_size) != (f.claimed_sha256, f.claimed_size):
        return RerunVerdict("resolve", 0, "output_differs")
    claimed, rerun = f.claimed_usage, f.rerun_usage
    if claimed is not None:
        same = (claimed.outcome, claimed.exit_code) == (rerun.outcome, rerun.exit_code)
        if f.kind == "wasm":
            same = same and claimed.fuel_used == rerun.fuel_used
        if not same:
            return RerunVerdict("resolve", 0, "usage_differs")
    return RerunVerdict("resolve", f.price, "rerun_matches")
