"""Fair admission to a model: a bounded queue served round-robin between borrowers.

A model serves ``slots`` requests at once; at most ``max_queue`` more wait. The waiting requests are
kept per borrower (a lease on a provider, set by the lease's serving code with :func:`borrowing`;
``""`` for this node's own requests) and admitted in turn, one per borrower, so one heavy consumer
cannot starve the others: its requests queue behind each other, not in front of everyone's.

When the queue is full, a newcomer whose borrower holds fewer waiting places than the heaviest one
takes the heaviest borrower's newest place (that request is refused instead); otherwise the newcomer
is refused. A refusal is ``E_RATE_LIMITED`` with reason ``busy`` and ``retry_after_s``: about one
request's service time (a moving average of how long a request held its slot) over the slots, the
time until the queue moves by one place (0.05 to 60 s; HTTP's ``Retry-After`` rounds it up to whole
seconds).
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import trio

from runtime.errors import ClawnodeError, ErrorCode, Reason

_BORROWER: ContextVar[str] = ContextVar("clawnode_borrower", default="")
HOLD_EWMA_ALPHA = 0.3
MIN_RETRY_AFTER_S = 0.05  # a fast model frees a place in milliseconds (HTTP Retry-After rounds up to 1 s)
MAX_RETRY_AFTER_S = 60.0


def current_borrower() -> str:
    """Who the request running in this task is for (``""``: this node itself)."""
    return _BORROWER.get()


@contextlib.contextmanager
def borrowing(borrower: str) -> Iterator[None]:
    """Requests made inside this block (and in tasks it starts) queue as ``borrower``'s."""
    token = _BORROWER.set(borrower)
    try:
        yield
    finally:
        _BORROWER.reset(token)


@dataclass(eq=False)
class _Waiter:
    borrower: str
    event: trio.Event = field(default_factory=trio.Event)
    granted: bool = False
    refused: bool = False


class FairAdmission:
    """``await acquire()`` a slot (queued fairly, or refused when full); ``release()`` it."""

    def __init__(self, name: str, *, slots: int = 1, max_queue: int = 8) -> None:
        self.name = name
        self.slots = max(1, slots)
        self.max_queue = max(0, max_queue)
        self.active = 0
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()  # the rotation: next borrower first
        self._waiting = 0
        self._granted_at: dict[int, float] = {}
        self._tickets = itertools.count()
        self.hold_ewma_s: float | None = None
        self.refused = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    def retry_after_s(self) -> float:
        """The hint a refusal carries: about one request's service time over the slots (when the queue
        moves by one place), 1 s before any request has been timed."""
        hold = self.hold_ewma_s if self.hold_ewma_s is not None else 1.0
        return round(min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, hold / self.slots)), 3)

    def _busy(self) -> ClawnodeError:
        self.refused += 1
        return ClawnodeError(
            ErrorCode.RATE_LIMITED,
            f"model {self.name} is busy ({self._waiting} requests waiting); retry after {self.retry_after_s():g} s",
            Reason.BUSY,
            retry_after_s=self.retry_after_s(),
        )

    async def acquire(self, borrower: str | None = None) -> int:
        """A slot for ``borrower`` (default: :func:`current_borrower`); returns a ticket for ``release``."""
        who = current_borrower() if borrower is None else borrower
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.active < self.slots and self._waiting == 0:
            ticket = self._grant_now()  # granted before yielding: no other task can take the slot too
            await trio.lowlevel.cancel_shielded_checkpoint()
            return ticket
        if self._waiting >= self.max_queue and not self._displace(who):
            raise self._busy()
        waiter = _Waiter(who)
        self._queues.setdefault(who, deque()).append(waiter)
        self._waiting += 1
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self._release_slot()  # granted as it was cancelled: hand the slot on
            elif not waiter.refused:
                self._remove(waiter)
            raise
        if waiter.refused:
            raise self._busy()
        return self._start()

    def _grant_now(self) -> int:
        self.active += 1
        return self._start()

    def _start(self) -> int:
        ticket = next(self._tickets)
        self._granted_at[ticket] = trio.current_time()
        return ticket

    def release(self, ticket: int) -> None:
        granted = self._granted_at.pop(ticket, None)
        if granted is not None:
            held = trio.current_time() - granted
            self.hold_ewma_s = (
                held if self.hold_ewma_s is None else HOLD_EWMA_ALPHA * held + (1 - HOLD_EWMA_ALPHA) * self.hold_ewma_s
            )
        self._release_slot()

    def _release_slot(self) -> None:
        self.active -= 1
        while self.active < self.slots and self._queues:
            borrower, queue = next(iter(self._queues.items()))
            waiter = queue.popleft()
            del self._queues[borrower]
            if queue:
                self._queues[borrower] = queue  # to the back of the rotation
            self._waiting -= 1
            waiter.granted = True
            self.active += 1
            waiter.event.set()

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.borrower)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self._waiting -= 1
            if not queue:
                del self._queues[waiter.borrower]

    def _displace(self, newcomer: str) -> bool:
        """A full queue: the heaviest other borrower's newest place goes to ``newcomer`` when it holds
        more places than the newcomer would after taking it."""
        mine = len(self._queues.get(newcomer, ()))
        heaviest = max(self._queues, key=lambda b: len(self._queues[b]), default=None)
        if heaviest is None or heaviest == newcomer or len(self._queues[heaviest]) <= mine + 1:
            return False
        waiter = self._queues[heaviest].pop()
        if not self._queues[heaviest]:
            del self._queues[heaviest]
        self._waiting -= 1
        waiter.refused = True
        waiter.event.set()
        return True
