"""The words the ledger and the market machines share: task states, task roles, and which state moves exist.

One source of truth, held here as plain data. The ledger stores these names and checks each stored
move against :data:`TASK_MOVES` in the transaction that writes it; the task machine
(``protocols/machines/task_model.py``) takes its state names and roles from this module and asserts at
import time that its table makes exactly these moves, adding only who may make each and by which event.

Why a leaf module rather than handing the machine's table to the ledger (dependency injection): the
names must live in ``runtime/`` anyway, since the schema's CHECK constraints and its migrations spell
them in SQL, and ``runtime/`` may not import ``protocols/``. With the moves here too, every way of
opening a ledger (the daemon, the CLI, scripts, benches, tests) checks against the same table, and
none can forget to pass it in. The machine adds events and actors on top; it cannot add or drop a move
without this module changing with it (its import fails).

The lease side still speaks its own words in the ledger (``open/ended/disputed/closed``); moving it to
the lease machine's (``lease_…``) is the next step of the same change.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final, Literal

from runtime.ledger import errors


class TaskState(StrEnum):
    OPEN = "task_open"
    AWARDED = "task_awarded"
    CLOSED = "task_closed"
    CANCELLED = "task_cancelled"
    EXPIRED = "task_expired"


# Our side of a task, as the ledger stores it and the task machine names the actor.
CREATOR: Final = "creator"
BIDDER: Final = "bidder"
TaskRole = Literal["creator", "bidder"]
TASK_ROLES: frozenset[str] = frozenset({CREATOR, BIDDER})

# The task moves that change the state (a move to the same state, like a bid on an open task, changes
# nothing the ledger stores). Anything else is refused at write time.
TASK_MOVES: Mapping[str, frozenset[str]] = {
    TaskState.OPEN: frozenset({TaskState.AWARDED, TaskState.CANCELLED, TaskState.EXPIRED}),
    TaskState.AWARDED: frozenset({TaskState.CLOSED}),
}


def check_task_move(current: str, to: str) -> None:
    """Refuse a task move not in :data:`TASK_MOVES` (``E_CONFLICT``, reason ``bad_transition``)."""
    if to not in TASK_MOVES.get(current, frozenset()):
        raise errors.conflict("bad_transition", f"a task cannot go from {current} to {to}")
