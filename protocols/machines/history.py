"""A machine's transition log with a fixed size: the newest entries, never more than ``maxlen``.

A long-running daemon keeps its machines for hours; their history is for diagnosis and tests, the
ledger keeps what matters. ``total`` counts every entry ever appended, so a reader can tell how many
fell off the front.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any, Generic, SupportsIndex, TypeVar, overload

from runtime.errors import ClawnodeError, ErrorCode

T = TypeVar("T")


class History(deque[T], Generic[T]):
    """``deque(maxlen=…)`` that also answers slices (``history[seen:]``) like a list."""

    def __init__(self, maxlen: int, items: Iterable[T] = ()) -> None:  # the limit first, unlike deque
        super().__init__(items, maxlen)
        self.total = len(self)

    def append(self, item: T) -> None:
        super().append(item)
        self.total += 1

    def __reduce__(self) -> tuple[Any, ...]:  # copy, deepcopy and pickle rebuild it with its limit and count
        return (self.__class__, (self.maxlen, list(self)), {"total": self.total})

    def __copy__(self) -> History[T]:
        twin: History[T] = self.__class__(self.maxlen or 0, self)
        twin.total = self.total
        return twin

    @overload  # type: ignore[override]
    def __getitem__(self, index: SupportsIndex) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: SupportsIndex | slice) -> T | list[T]:
        if isinstance(index, slice):
            return list(self)[index]
        return super().__getitem__(index)


K = TypeVar("K")


def finished_to_evict(finished: list[tuple[K, float, bool]], now: float, *, keep: int, keep_s: float) -> list[K]:
    """Which finished entries (leases, tasks) to forget: ``finished`` is ``(id, finished_at, settled)``, oldest first.

    Beyond the newest ``keep`` the oldest go whatever their state (the ledger and the settlement queue
    carry what is left); within them, one goes once ``keep_s`` has passed since it finished and its
    follow-up work is done (``settled``: e.g. the consumer has booked the provider's last claim).
    """
    if keep < 0 or keep_s < 0:
        raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, "retention limits must be >= 0")
    over = max(0, len(finished) - keep)
    out = [entry_id for entry_id, _, _ in finished[:over]]
    out.extend(entry_id for entry_id, at, settled in finished[over:] if settled and now - at >= keep_s)
    return out
