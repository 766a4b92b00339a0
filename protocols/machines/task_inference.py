"""The rules of ``inference`` tasks: a prompt batch run on a served model (by name and GGUF sha256).
Pure: facts in, a typed verdict out; the adapter (``protocols/task/inference.py``) looks up the
model, runs the batch in the engine's worker thread, submits, and re-runs as the arbiter.

* :func:`inference_run_verdict`: does this node (the awarded seller, or the arbiter re-running it)
  run the batch by itself? It must accept the kind, run by itself, hold a model of that name whose
  file has the named sha256 (when the task names one), and the batch must be within the bounds.
* :func:`busy_retry_verdict`: a prompt the model refused because its queue is full (``E_RATE_LIMITED``
  ``busy``) is asked again after the refusal's ``retry_after_s`` (at least :data:`BUSY_MIN_WAIT_S`),
  until :data:`BUSY_DEADLINE_S` has passed since the batch started; any other failure stands.
  A busy model is a moment's load, not a reason to leave a task unrun or a dispute to a person.
* :func:`inference_rerun_verdict`: the arbiter's decision. At temperature 0 the engine is greedy,
  so the same model file gives the same text: the re-run's outputs hash equal to the seller's
  signed result -> everything to the seller; differing -> everything back to the buyer. A batch
  sampled above temperature 0, a task that names no model file (the seller may have run another
  file of that name), a model the arbiter does not hold, or a run that failed prove nothing either
  way -> ``escalate`` (a person decides as for any other task).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.machines.task_run import RerunVerdict
from protocols.machines.verdict import Refusal
from runtime.errors import ErrorCode

MAX_PROMPTS = 16  # prompts in one batch
MAX_BATCH_BYTES = 16 * 1024  # their UTF-8 bytes together
MAX_TOKENS = 512  # generated per prompt


BUSY_DEADLINE_S = 300.0  # how long a batch waits, in all, on a model whose queue is full
BUSY_MIN_WAIT_S = 0.05  # the shortest wait before asking a busy model again


@dataclass(frozen=True)
class BusyFacts:
    busy: bool  # the failure is the model's full queue (E_RATE_LIMITED busy)
    waited_s: float  # since the batch started
    retry_after_s: float | None  # the refusal's hint


def busy_retry_verdict(f: BusyFacts, deadline_s: float = BUSY_DEADLINE_S) -> float | None:
    """Seconds to wait before asking the model again, or None: the failure stands."""
    if not f.busy:
        return None
    wait = max(BUSY_MIN_WAIT_S, 1.0 if f.retry_after_s is None else f.retry_after_s)
    if f.waited_s + wait > deadline_s:
        return None
    return wait


@dataclass(frozen=True)
class InferenceRunFacts:
    accepted: bool  # "inference" is in this node's [sandbox] kinds
    automatic: bool  # [sandbox] auto_run (seller) or auto_arbitrate (arbiter)
    model: str
    loaded_sha256: str | None  # None: no model of that name is loaded here
    wanted_sha256: str  # "" when the task names none
    prompts: int
    batch_bytes: int
    max_tokens: int


def inference_run_verdict(f: InferenceRunFacts) -> Refusal | None:
    if not f.automatic:
        return Refusal(ErrorCode.CONFLICT, "not_automatic", "this node runs tasks only when asked")
    if not f.accepted:
        return Refusal(ErrorCode.FORBIDDEN, "kind_not_accepted", "this node does not run inference tasks")
    if not 1 <= f.prompts <= MAX_PROMPTS or f.batch_bytes > MAX_BATCH_BYTES:
        return Refusal(ErrorCode.INVALID_ARGUMENT, "batch_too_large", "the prompt batch is outside the bounds")
    if not 1 <= f.max_tokens <= MAX_TOKENS:
        return Refusal(ErrorCode.INVALID_ARGUMENT, "max_tokens_out_of_range", "max_tokens is outside the bounds")
    if f.loaded_sha256 is None:
        return Refusal(ErrorCode.NOT_FOUND, "model_not_loaded", f"this node serves no model named {f.model}")
    if f.wanted_sha256 and f.loaded_sha256 != f.wanted_sha256:
        return Refusal(ErrorCode.NOT_FOUND, "model_file_differs", "this node's model is another file")
    return None


@dataclass(frozen=True)
class InferenceRerunFacts:
    price: int
    temperature: float
    claimed_sha256: str  # the seller's signed result (the outputs' canonical JSON)
    rerun_sha256: str | None  # None: the arbiter could not re-run
    rerun_refusal: str | None = None
    model_named: bool = True  # the task names the model file's sha256 (else the seller's may be another file)


def inference_rerun_verdict(f: InferenceRerunFacts) -> RerunVerdict:
    if f.temperature != 0.0:
        return RerunVerdict("escalate", 0, "not_deterministic")
    if not f.model_named:
        return RerunVerdict("escalate", 0, "model_file_unnamed")
    if f.rerun_sha256 is None:
        return RerunVerdict("escalate", 0, f.rerun_refusal or "rerun_unavailable")
    if f.rerun_sha256 != f.claimed_sha256:
        return RerunVerdict("resolve", 0, "output_differs")
    return RerunVerdict("resolve", f.price, "rerun_matches")
