"""The words the ledger and the market machines share: lease and task states, task roles, which moves exist.

One source of truth, held here as plain data. The ledger stores these names and checks each stored
move against :data:`LEASE_MOVES` / :data:`TASK_MOVES` in the transaction that writes it; the lease
machine (``protocols/machines/lease.py``) and the task machine (``protocols/machines/task_model.py``)
take their state names from this module and assert at import time that their tables make exactly these
moves, adding only who may make each and by which event.

Why a leaf module rather than handing the machine's table to the ledger (dependency injection): the
names must live in ``runtime/`` anyway, since the schema's CHECK constraints and its migrations spell
them in SQL, and ``runtime/`` may not import ``protocols/``. With the moves here too, every way of
opening a ledger (the daemon, the CLI, scripts, benches, tests) checks against the same table, and
none can forget to pass it in. The machine adds events and actors on top; it cannot add or drop a move
without this module changing with it (its import fails).

A ledger lease row takes fewer states than the machine: it is written when the lease is granted
(``lease_active``), a pause lives in the provider's session only, and an escrow disputed on chain ends
the lease (the machine's ``freeze``) while the dispute itself is a row of its own. So the ledger's
states are the named subset :data:`LEDGER_LEASE_STATES`, and a move the ledger stores is a move of the
machine between two of them (or through ``lease_ended``, as the machine goes: active, ended, settled).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final, Literal

from runtime.ledger import errors


class LeaseState(StrEnum):
    QUOTED = "lease_quoted"
    ACTIVE = "lease_active"
    PAUSED = "lease_paused"
    ENDED = "lease_ended"
    SETTLED = "lease_settled"


# The lease moves that change the state (renew keeps a lease active).
LEASE_MOVES: Mapping[str, frozenset[str]] = {
    LeaseState.QUOTED: frozenset({LeaseState.ACTIVE, LeaseState.ENDED}),
    LeaseState.ACTIVE: frozenset({LeaseState.PAUSED, LeaseState.ENDED}),
    LeaseState.PAUSED: frozenset({LeaseState.ACTIVE, LeaseState.ENDED}),
    LeaseState.ENDED: frozenset({LeaseState.SETTLED}),
}
# The states a ledger lease row takes (the schema's CHECK spells the same three).
LEDGER_LEASE_STATES: frozenset[str] = frozenset({LeaseState.ACTIVE, LeaseState.ENDED, LeaseState.SETTLED})


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


def check_lease_move(current: str, to: str) -> None:
    """Refuse storing a lease move that is not the machine's between two ledger states (staying put is no
    move). Only a bug gets here, the callers refuse a peer's or a user's request first with their own
    reason: ``E_INTERNAL``, reason ``invariant_lease_transition``, nothing stored."""
    if to not in LEDGER_LEASE_STATES or (to != current and to not in LEASE_MOVES.get(current, frozenset())):
        raise errors.invariant("lease_transition", f"a lease cannot go from {current} to {to}")


def check_task_move(current: str, to: str) -> None:
    """Refuse a task move not in :data:`TASK_MOVES` (``E_CONFLICT``, reason ``bad_transition``)."""
    if to not in TASK_MOVES.get(current, frozenset()):
        raise errors.conflict("bad_transition", f"a task cannot go from {current} to {to}")
