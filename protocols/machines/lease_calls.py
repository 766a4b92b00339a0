"""The rules both sides of a lease count with: what a call may cost (``plan_call``), what a consumer
accepts of an end frame (``end_frame_verdict``, and ``proof_meter_verdict`` when it carries verified
inference's proof) and of a receipt (``receipt_claim_verdict``, with
``receipt_tolerance`` for the calls it left: ``left_calls`` says for how long), what a call cut
before its end frame is billed (``aborted_call_units``), and the consumer's view of a held lease
(``lease_fits``, ``lease_outlives``).

Pure, like every module of ``protocols.machines``: facts in, a typed verdict or a number out. The
provider's session (``protocols.machines.lease``) and the consumer's machine
(``protocols.machines.lease_consumer``) both use these, so both sides compute the same numbers;
``protocols.machines.lease`` re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from protocols.machines.verdict import Refusal, enforce
from runtime.errors import ClawnodeError, ErrorCode, Reason

if TYPE_CHECKING:
    from runtime.verify.evidence import CallProof

OVER_BUDGET_MESSAGE = "the lease budget would be exceeded"


# Refusals after which a consumer keeps its lease: it serves again by itself (a countersignature
# resumes a pause, metered calls free a busy budget, the minute passes); the disk heals.
_LEASE_OUTLIVES = frozenset({Reason.PAUSED, Reason.BUDGET_BUSY, Reason.RATE_LIMIT, Reason.DISK_FULL})


def lease_outlives(code: ErrorCode, reason: str | None) -> bool:
    """Consumer side: whether a lease refused with ``code``/``reason`` is worth keeping (a router keeps
    it rather than locking a fresh one on chain), or is spent: ``ended``, ``expired``, ``over_budget``,
    ``request_limit``, a lease the provider does not know. A refusal that names no reason (an older
    peer) is judged by its code as before: only ``E_CONFLICT``, ``E_EXPIRED``,
    ``E_INSUFFICIENT_FUNDS`` and ``E_FORBIDDEN`` spend it."""
    if reason in _SPENT:
        return False
    return reason in _LEASE_OUTLIVES or code not in _SPENDS_LEASE


# Refusals after which the lease serves nothing more (``request_limit``: its request count is used
# up, whatever the code it travels with).
_SPENT = frozenset({Reason.ENDED, Reason.EXPIRED, Reason.OVER_BUDGET, Reason.REQUEST_LIMIT, Reason.UNKNOWN_LEASE})


_SPENDS_LEASE = frozenset({ErrorCode.EXPIRED, ErrorCode.CONFLICT, ErrorCode.INSUFFICIENT_FUNDS, ErrorCode.FORBIDDEN})


# What a consumer that leaves a call without the provider's last frame (a stall, a cut connection,
# a reset) may be short of the provider's count: the chunks written after its last read and before
# the cut, a few frames on any link (a chunk is at least one token). An honest consumer that leaves
# asks the provider to stop and drains to its end frame, so its count is exact; this covers the rest.
ABORTED_CALL_TOLERANCE_UNITS = 16


def receipt_tolerance(aborted_calls: int, aborted_prompt_units: int = 0) -> int:
    """Consumer side: the units a receipt may exceed the consumer's own count by, for the calls it left
    without the provider's end or error frame (everything else it counted exactly): per call, what
    was in flight (:data:`ABORTED_CALL_TOLERANCE_UNITS`), and the prompts the provider may have
    decoded before the cut (``aborted_prompt_units``: the sum of their :func:`prompt_units_estimate`)."""
    if aborted_calls < 0 or aborted_prompt_units < 0:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "aborted_calls and aborted_prompt_units must be >= 0")
    return aborted_calls * ABORTED_CALL_TOLERANCE_UNITS + aborted_prompt_units


def receipt_claim_verdict(
    receipt_units: int,
    receipt_amount: int,
    seen_units: int,
    price_per_unit: int,
    tolerance_units: int = 0,
) -> Refusal | None:
    """Consumer side: whether a receipt may be countersigned: not over what the consumer counted
    (``seen_units``, plus ``tolerance_units`` for counting differences both sides accept, e.g. a call
    left in flight), and priced at units times price."""
    if min(receipt_units, receipt_amount, seen_units, price_per_unit, tolerance_units) < 0:
        return Refusal(ErrorCode.INVALID_ARGUMENT, "receipt_negative", "receipt figures must be >= 0")
    if receipt_units > seen_units + tolerance_units:
        return Refusal(ErrorCode.CONFLICT, "receipt_over_count", "the receipt claims more units than were delivered")
    if receipt_amount != receipt_units * price_per_unit:
        return Refusal(ErrorCode.CONFLICT, "receipt_mispriced", "the receipt amount does not equal units times price")
    return None


def check_receipt_claim(
    receipt_units: int,
    receipt_amount: int,
    seen_units: int,
    price_per_unit: int,
    tolerance_units: int = 0,
) -> None:
    """:func:`receipt_claim_verdict`, raised."""
    enforce(receipt_claim_verdict(receipt_units, receipt_amount, seen_units, price_per_unit, tolerance_units))


# -- calls: what a call may cost, and what the consumer accepts ------------------------------------

# The most completion tokens a call without ``max_tokens`` may produce (the engine's own default).
DEFAULT_COMPLETION_CAP = 256
# Tokens a chat template may add around the text (BOS, role markers, a default system prompt of a
# few dozen tokens, an end-of-generation token the engine counts but never streams), and per string.
PROMPT_OVERHEAD_UNITS = 64
PER_STRING_OVERHEAD_UNITS = 8
UNLIMITED_UNITS = 2**62
END_FRAME_INFLATED = "the end frame claims more units than were delivered"


# The most choices (``n``) a request may ask for; the engine refuses more.
MAX_CHOICES = 8


def completion_choices(body: Any) -> int:
    """How many completions a body asks for (``n``): each may run to ``max_tokens``, and every one is
    metered. 1 for anything but an integer from 1 to :data:`MAX_CHOICES` (the engine refuses those)."""
    n = body.get("n") if isinstance(body, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CHOICES else 1


class CallPlan(NamedTuple):
    reserve: int  # units held for the call until it is metered
    max_tokens: int  # the completion bound the engine is told


def declared_max_tokens(body: dict[str, Any]) -> int | None:
    """A body's ``max_tokens``: None when absent; anything but a positive integer is refused."""
    value = body.get("max_tokens")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "body.max_tokens must be a positive integer")
    return value


def prompt_units_estimate(body: Any) -> int:
    """An upper bound on the units a body's input can count: one per UTF-8 byte of every string (a
    token is at least one byte) and one per integer (a token id), plus template overhead, plus what
    the engine writes around them (a tool list and its instructions, the wrappers of earlier calls and
    tool results: ``rendering_bytes_bound``)."""
    from runtime.inference.tools import rendering_bytes_bound  # the engine's own bound, kept beside its rendering

    def walk(value: Any) -> int:
        if isinstance(value, str):
            return len(value.encode()) + PER_STRING_OVERHEAD_UNITS
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, list | tuple):
            return sum(walk(v) for v in value)
        if isinstance(value, int) and not isinstance(value, bool):
            return 1  # a token id (a prompt or an embedding input as token ids) is one token
        return 0

    return walk(body) + PROMPT_OVERHEAD_UNITS + rendering_bytes_bound(body)


def plan_call(body: dict[str, Any], units_left: int) -> CallPlan:
    """How many units to reserve for a call, and the completion bound to hand the engine.

    A declared ``max_tokens`` must fit what is left (else ``E_INSUFFICIENT_FUNDS``); without one the
    completion is capped at ``DEFAULT_COMPLETION_CAP`` or what is left. With ``n`` choices each may run to
    the bound, so ``n`` times it is reserved (and must fit). The prompt's estimate is
    reserved as far as the budget allows beyond the completion: a call that counts more than its
    reservation is billed its reservation (the provider's loss, never the consumer's).
    """
    if units_left < 0:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "units_left must be >= 0")
    declared = declared_max_tokens(body)
    choices = completion_choices(body)
    if declared is not None:
        if declared * choices > units_left:
            raise ClawnodeError(ErrorCode.INSUFFICIENT_FUNDS, OVER_BUDGET_MESSAGE, Reason.OVER_BUDGET)
        completion = declared
    else:
        completion = min(DEFAULT_COMPLETION_CAP, units_left // choices)
        if completion < 1:
            raise ClawnodeError(ErrorCode.INSUFFICIENT_FUNDS, OVER_BUDGET_MESSAGE, Reason.OVER_BUDGET)
    completions = completion * choices
    reserve = completions + min(prompt_units_estimate(body), units_left - completions)
    return CallPlan(reserve=reserve, max_tokens=completion)


def completion_units_bound(body: dict[str, Any]) -> int:
    """Consumer side: the most completion units a provider may reserve for ``body``: its ``max_tokens``
    (``DEFAULT_COMPLETION_CAP`` when it declares none, or one the provider would refuse) for each choice."""
    try:
        declared = declared_max_tokens(body)
    except ClawnodeError:
        declared = None
    return (declared or DEFAULT_COMPLETION_CAP) * completion_choices(body)


def call_units_needed(body: dict[str, Any]) -> int:
    """Consumer side: the most units a provider may reserve for ``body`` (``plan_call``'s reservation
    when the budget is no object): its completion bound and its prompt's estimate."""
    return completion_units_bound(body) + prompt_units_estimate(body)


@dataclass(frozen=True)
class LeaseFit:
    ok: bool
    reason: str  # "fits" | "budget" | "time"


def lease_fits(
    *,
    budget: int,
    price_per_unit: int,
    used_units: int,
    reserved_units: int,
    need_units: int,
    expires_at: float,
    now: float,
    renew_before_s: float,
) -> LeaseFit:
    """Consumer side: whether a held lease can carry one more call of ``need_units`` now, by time (it
    must not expire within ``renew_before_s``) and by budget (what is left beside the units used and
    those reserved by calls in flight, as ``LeaseSession.units_left`` counts on the provider)."""
    if expires_at - now < renew_before_s:
        return LeaseFit(False, "time")
    if price_per_unit > 0:
        units_left = budget // price_per_unit - used_units - reserved_units
        if units_left < need_units:
            return LeaseFit(False, "budget")
    return LeaseFit(True, "fits")


def aborted_call_units(reserved: int, streamed_tokens: int, prompt_tokens: int = 0) -> int:
    """Provider side: what a cut call is billed (its consumer left it, by a cancel or a reset, before
    its end frame, or the end frame could not be written): the tokens of the chunks written
    (``chunk_tokens`` each, as the consumer counts them) and the prompt tokens the engine had decoded
    by the cut (0 when it had not begun: a call cut before its first chunk does not get its prefill
    for nothing), within its reservation. The consumer accepts it within what it received and its
    prompt's estimate (``end_frame_verdict``; ``receipt_tolerance`` when no end frame came)."""
    if reserved < 0 or streamed_tokens < 0 or prompt_tokens < 0:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "units must be >= 0")
    return min(streamed_tokens + prompt_tokens, reserved)


def chunk_tokens(data: dict[str, Any]) -> int:
    """Tokens a streamed chunk carries as the consumer counts them: its ``tokens`` field, else one."""
    tokens = data.get("tokens")
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
        return tokens
    return 1


def generation_body(body: dict[str, Any]) -> bool:
    """Whether a call's body asks for generated text: a chat (``messages``) or a completion (``prompt``),
    as the chat service reads it; an embeddings body (``input``) is not."""
    return body.get("messages") is not None or body.get("prompt") is not None


def reply_tokens(body: dict[str, Any], data: dict[str, Any]) -> int:
    """Consumer side: the tokens a streamed chunk adds to the reply its spot check covers, given this
    side's own request ``body``. For a generation body every chunk's (``chunk_tokens``), text or not: each
    is paid, and a provider that streamed chunks with tokens and no text was paid for a reply its caller
    never saw, and, the check seeing no reply, never checked (an honest engine sends ``text``, possibly
    empty, on every chunk of a reply, in every release). For any other body only a chunk with text adds
    its tokens (an embeddings chunk carries vectors, not a reply to check)."""
    if generation_body(body) or isinstance(data.get("text"), str):
        return chunk_tokens(data)
    return 0


def end_frame_verdict(claimed_units: int, tokens_received: int, body: dict[str, Any]) -> Refusal | None:
    """Consumer side: whether a call's end frame may be counted: its units within what was delivered and
    asked, i.e. the tokens received plus the prompt's estimate, and ``max_tokens`` (``DEFAULT_COMPLETION_CAP``
    when the request declared none) plus that estimate: a chunk's ``tokens`` is the provider's word, and
    one chunk claiming 100,000 tokens was otherwise paid in full on a request without ``max_tokens``."""
    if claimed_units < 0 or tokens_received < 0:
        return Refusal(ErrorCode.INVALID_ARGUMENT, "units_negative", "units must be >= 0")
    # The provider reserves at most the completion bound for the call (``plan_call``) and bills within it.
    bound = min(tokens_received, completion_units_bound(body)) + prompt_units_estimate(body)
    if claimed_units > bound:
        return Refusal(ErrorCode.CONFLICT, "end_frame_inflated", END_FRAME_INFLATED)
    return None


class ProvedCounts(NamedTuple):
    """The token counts a call's proof states (``runtime.verify.evidence.CallProof``): the prompt and
    completion tokens its body signs, and how many token ids it lists."""

    prompt_tokens: int
    completion_tokens: int
    token_ids: int


def proved_counts(proof: CallProof | None) -> ProvedCounts | None:
    """The counts of a frame's proof, None when the frame carries none."""
    if proof is None:
        return None
    body = proof.commitment.body
    return ProvedCounts(body.prompt_tokens, body.completion_tokens, len(proof.tokens))


END_FRAME_OVER_PROOF = "end_frame_over_proof"
CHUNKS_OVER_PROOF = "the chunks claim more tokens than the call's proof commits"
UNITS_OVER_PROOF = "the call's frame claims more units than its proof's prompt and completion tokens"


def proof_meter_verdict(claimed_units: int, tokens_received: int, proved: ProvedCounts | None) -> Refusal | None:
    """Consumer side: whether a call's last frame (its end frame, or an error frame billing ``claimed_units``)
    may be counted, held to the proof it carries (``proved``): the chunks' tokens (``tokens_received``,
    what this side pays the reply by, ``chunk_tokens`` each) within the tokens the proof commits (the
    fewer of its signed ``completion_tokens`` and its token ids), and the units claimed within those
    plus the proof's signed ``prompt_tokens``. ``end_frame_verdict`` bounds a frame by the chunks
    received and the prompt's estimate; without this a provider that streamed its real reply with
    each chunk's ``tokens`` inflated (3 a token, say) and a valid proof of the real tokens was paid up
    to ``max_tokens`` plus the estimate for a short reply, checked or not (the check compares the
    proof with the text, which was real).

    An honest provider never trips it: its engine sends each sampled token once with ``tokens: 1``
    (a stop string's tokens too) and the chunks of the commitment alone with ``tokens: 0``, so the
    chunks' tokens are exactly the positions its recorder committed; its end frame bills the engine's
    prompt count (what the proof signs) plus those; a cut call's proof is sent only when it covers
    every token written (``protocols.lease.serving``'s ``_failed_call_proof``) and bills the prompt
    it signs.

    No proof: nothing to hold the frame to (``None``; the spot check's ``no_proof`` is for that). The
    signature is not checked here, nor whether the proof is this call's: that is the verification
    path's business, and this rule only lowers what is paid, never raises it, so a forged proof with
    bigger numbers gains nothing over ``end_frame_verdict``, and one with smaller numbers is the
    provider's own word against its bill (both came on its stream)."""
    if proved is None:
        return None
    committed = max(0, min(proved.completion_tokens, proved.token_ids))
    if tokens_received > committed:
        return Refusal(ErrorCode.CONFLICT, END_FRAME_OVER_PROOF, CHUNKS_OVER_PROOF)
    if claimed_units > max(0, proved.prompt_tokens) + committed:
        return Refusal(ErrorCode.CONFLICT, END_FRAME_OVER_PROOF, UNITS_OVER_PROOF)
    return None


# What a call's chunk frames may carry in all (consumer side): a share per unit the call may be billed
# (a token's text, its bytes and 20 top logprobs fit well within it) and room for an embeddings
# reply's vectors. Without a bound a provider streamed chunks claiming no tokens (free) for the
# whole call timeout, up to 1 MiB a frame, into the consumer's memory.
CALL_BYTES_PER_UNIT = 16 * 1024
CALL_BYTES_SLACK = 64 * 1024 * 1024
STREAM_TOO_LARGE = "the provider streamed more than the call can carry"


def call_bytes_bound(body: dict[str, Any]) -> int:
    """Consumer side: the most bytes a call's chunk frames may carry in all: ``CALL_BYTES_PER_UNIT`` a
    unit the call may be billed (``call_units_needed``, which walks the whole body) and
    ``CALL_BYTES_SLACK``. Taken once a call, not once a frame."""
    return call_units_needed(body) * CALL_BYTES_PER_UNIT + CALL_BYTES_SLACK


def call_bytes_verdict(received_bytes: int, bound: int) -> Refusal | None:
    """Consumer side: whether a call's chunk frames, ``received_bytes`` so far, are within its ``bound``
    (``call_bytes_bound``); past it the provider is at fault (``E_INTERNAL``: a router fails over to
    another)."""
    if received_bytes > bound:
        return Refusal(ErrorCode.INTERNAL, "stream_too_large", STREAM_TOO_LARGE)
    return None


def check_end_frame(claimed_units: int, tokens_received: int, body: dict[str, Any]) -> int:
    """:func:`end_frame_verdict`, raised: the units to count, or ``E_CONFLICT`` for an inflated frame."""
    enforce(end_frame_verdict(claimed_units, tokens_received, body))
    return claimed_units
