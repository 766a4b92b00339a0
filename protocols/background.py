"""Background work of a protocol adapter: one failure costs that piece of work, never the node."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from runtime.errors import ClawnodeError


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
