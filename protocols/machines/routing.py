"""The router's choice among the providers of one capability (issue 19), a pure function of fetched facts.

:func:`rank_candidates` takes, per provider, what the router knows as plain data (:class:`Candidate`:
its price, its live load as its capability protocol last answered it, this node's verification
standing of it, the measured latency, its health) and returns the order to try them in:

1. never a provider with ``standing`` 0 (it failed one of this node's verification checks);
2. by tier: one with a free slot (``running`` < ``parallel``) first, then one that would queue the
   request (``queued`` < ``max_queue``), then a full one (every slot taken and the queue full) or one
   whose busy refusal's hint still runs, and last one that failed its recent calls or checks: a full
   provider is asked only when no other with room is left to try;
3. within a tier: cheaper first, then less loaded (running and queued against ``parallel`` +
   ``max_queue``), then faster, then the better verification standing, then the peer id (a stable
   order).

The live load is the provider's own, unsigned word; the router adds the calls it started on that
provider since the answer was taken (``since_report``), counts no fewer than its own calls in flight
there, and believes no more slots or queue than the signed record states. Without a live load (none fetched, or too
old) the router's own calls in flight are the estimate, against the capacity the signed record
states (``parallel``, ``max_queue``; one at a time where it states none, and never "full" then).
"""

from __future__ import annotations

from dataclasses import dataclass

# A provider's numbers are a stranger's: anything past this is not a load this node believes.
MAX_LOAD_FIGURE = 1_000_000

ROOM, QUEUE, FULL, UNHEALTHY = 0, 1, 2, 3


@dataclass(frozen=True)
class LiveLoad:
    """A model's load as its provider answered it: ``running`` sequences of ``parallel`` slots,
    ``queued`` requests of ``max_queue``."""

    running: int
    parallel: int
    queued: int
    max_queue: int

    @classmethod
    def parse(cls, data: object) -> LiveLoad | None:
        """The load in a provider's answer (``RecordReply.load[capability]``), or None when it is not
        one: missing or negative figures, no slot at all, past :data:`MAX_LOAD_FIGURE`."""
        if not isinstance(data, dict):
            return None
        figures: list[int] = []
        for key in ("running", "parallel", "queued", "max_queue"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOAD_FIGURE:
                return None
            figures.append(value)
        running, parallel, queued, max_queue = figures
        if parallel < 1:
            return None
        return cls(running, parallel, queued, max_queue)


@dataclass(frozen=True)
class Candidate:
    peer_id: str
    price_per_unit: int
    latency_s: float  # measured (EWMA of calls and health checks), else discovery's round trip
    standing: float = 0.5  # protocols.machines.verify.standing; 0.5 for a provider never checked
    load: LiveLoad | None = None  # the provider's live answer, None when unknown or too old
    since_report: int = 0  # this node's calls started on it since ``load`` was taken
    in_flight: int = 0  # this node's calls in flight on it (the estimate when ``load`` is None)
    parallel: int = 0  # the capacity its signed record states (0: it states none)
    max_queue: int = 0
    healthy: bool = True  # fewer consecutive failures than the router's failover threshold
    busy: bool = False  # a busy refusal's retry-after hint still runs


def effective_load(candidate: Candidate) -> tuple[int, int, int, int] | None:
    """(running, parallel, queued, max_queue) as the router counts them, or None when nothing states a
    capacity (no live load, no capacity in the record)."""
    if candidate.load is not None:
        load = candidate.load
        # A stranger's word, checked against what this node knows: never fewer requests than this
        # node's own calls in flight on it, never more room than its signed record states (a provider
        # answering "idle, 1000 slots" every second would otherwise draw every request before others).
        total = max(load.running + load.queued + max(0, candidate.since_report), max(0, candidate.in_flight))
        parallel, max_queue = load.parallel, load.max_queue
        if candidate.parallel >= 1:
            parallel, max_queue = min(parallel, candidate.parallel), min(max_queue, max(0, candidate.max_queue))
    elif candidate.parallel >= 1:
        total = max(0, candidate.in_flight)
        parallel, max_queue = candidate.parallel, max(0, candidate.max_queue)
    else:
        return None
    running = min(total, parallel)
    return running, parallel, total - running, max_queue


def tier(candidate: Candidate) -> int:
    """:data:`ROOM`, :data:`QUEUE`, :data:`FULL` or :data:`UNHEALTHY` (see the module's docstring)."""
    if not candidate.healthy:
        return UNHEALTHY
    if candidate.busy:
        return FULL
    counted = effective_load(candidate)
    if counted is None:
        return ROOM if candidate.in_flight <= 0 else QUEUE
    running, parallel, queued, max_queue = counted
    if running < parallel:
        return ROOM
    return QUEUE if queued < max_queue else FULL


def utilisation(candidate: Candidate) -> float:
    """Requests running and waiting against what the provider takes at once (0 idle, 1 full)."""
    counted = effective_load(candidate)
    if counted is None:
        return float(max(0, candidate.in_flight))
    running, parallel, queued, max_queue = counted
    return (running + queued) / (parallel + max_queue)


def rank_candidates(candidates: list[Candidate]) -> list[str]:
    """The peer ids to try, in order; a provider with standing 0 is left out."""

    def key(candidate: Candidate) -> tuple[int, int, float, float, float, str]:
        return (
            tier(candidate),
            candidate.price_per_unit,
            utilisation(candidate),
            candidate.latency_s,
            -candidate.standing,
            candidate.peer_id,
        )

    return [candidate.peer_id for candidate in sorted(candidates, key=key) if candidate.standing > 0]
