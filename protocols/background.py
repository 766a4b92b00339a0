"""Background work of a protocol adapter: one failure costs that piece of work, never the node.

:func:`spawn_guarded` runs one piece of work whose failure is only logged; :class:`Supervisor` runs
a node's long-lived services, restarting one that fails (with backoff) while the others keep going.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from runtime.errors import ClawnodeError

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)


def spawn_guarded(nursery: trio.Nursery | None, log: logging.Logger, fn: Callable[..., Any], *args: Any) -> None:
    """Start ``fn(*args)`` in ``nursery`` (when running); a failure is logged by its stable code only."""

    async def guarded() -> None:
        try:
            await fn(*args)
        except Exception as error:  # noqa: BLE001 - one lease's or task's trouble must not stop the node
            code = error.code if isinstance(error, ClawnodeError) else type(error).__name__
            log.warning("background work %s failed: %s", getattr(fn, "__name__", "?"), code)

    if nursery is not None:
        nursery.start_soon(guarded)


def failure_code(error: BaseException) -> str:
    """A failure in words safe for a log or a metric: the stable code, else the exception's type."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error.code if isinstance(error, ClawnodeError) else type(error).__name__


def next_backoff(
    previous_s: float | None, ran_for_s: float, *, initial_s: float, max_s: float, healthy_s: float
) -> float:
    """How long to wait before restarting a service that failed after running ``ran_for_s`` seconds.

    Doubles from ``initial_s`` up to ``max_s`` while it keeps failing; a service that ran healthy for
    ``healthy_s`` starts over from ``initial_s``.
    """
    if previous_s is None or ran_for_s >= healthy_s:
        return initial_s
    return min(max_s, previous_s * 2)


class _FirstStart:
    """Passes a service's first ``started()`` on to the nursery, and only the first."""

    def __init__(self, outer: TaskStatus[Any]) -> None:
        self._outer = outer
        self.done = False

    def started(self, value: Any = None) -> None:
        if not self.done:
            self.done = True
            self._outer.started(value)


class Supervisor:
    """Runs each of a node's services so that its failure restarts it instead of ending the node.

    ``await nursery.start(supervisor.run, "dht", dht.run)`` behaves like ``nursery.start(dht.run)``:
    it returns once the service reported ready, and a failure before that first ready is raised as
    before (a node that cannot start says so). Afterwards an exception from the service is logged
    (its stable code or type only), counted in :attr:`restarts`, and the service runs again after
    a backoff of ``initial_backoff_s`` doubling up to ``max_backoff_s``; the other services never
    notice. A service that returns is done. Cancellation passes through untouched.
    """

    def __init__(
        self,
        *,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        healthy_after_s: float = 60.0,
    ) -> None:
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.healthy_after_s = healthy_after_s
        self.restarts: Counter[str] = Counter()
        self.last_failure: dict[str, str] = {}

    def names(self) -> list[str]:
        return sorted(self.restarts)

    async def run(
        self,
        name: str,
        service: Callable[..., Awaitable[object]],
        *,
        reports_ready: bool = True,
        task_status: TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``service(task_status=…)`` (or ``service()`` when it does not ``reports_ready``) until it returns."""
        self.restarts[name] += 0  # listed (at 0) from the start, so a rate over it works at once
        first = _FirstStart(task_status)
        if not reports_ready:
            first.started()
        delay: float | None = None
        while True:
            started_at = trio.current_time()
            try:
                await (service(task_status=first) if reports_ready else service())
                return
            except Exception as error:
                if not first.done:
                    raise  # it never came up: the node cannot start, and says why
                code = failure_code(error)
                log.debug("service %s failed", name, exc_info=True)
            ran_for = trio.current_time() - started_at
            delay = next_backoff(
                delay,
                ran_for,
                initial_s=self.initial_backoff_s,
                max_s=self.max_backoff_s,
                healthy_s=self.healthy_after_s,
            )
            self.restarts[name] += 1
            self.last_failure[name] = code
            log.warning("service %s failed (%s); restarting it in %.1f s", name, code, delay)
            await trio.sleep(delay)
