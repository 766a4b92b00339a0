"""Table-driven finite state machines with no I/O.

Modelled on h11's ``_state.py``: every legal move of a machine is one row of
data (a :class:`Transition`), and :meth:`Machine.next_state` is the only place
where a row is looked up and applied.  Keeping the rules as data means the
tests can enumerate them, the docs can print them, and no code path can sneak
a transition past the table.

Order of refusals (shared by every machine):

1. the actor may never perform this event, in any state  -> ``E_FORBIDDEN``
2. the ``(state, event)`` pair is not in the table         -> ``E_CONFLICT``
3. the row exists but does not list this actor             -> ``E_FORBIDDEN``

Events the machine does not know at all are a ``E_CONFLICT`` (nobody may do
them, but the honest answer is "not a thing this machine does", not "you are
not allowed").  Guards (conditions on data, not on states) belong to the
callers; they run after :meth:`Machine.check` and before
:meth:`Machine.next_state`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from runtime.errors import ClawnodeError, ErrorCode

S = TypeVar("S", bound=str)
E = TypeVar("E", bound=str)


@dataclass(frozen=True)
class Transition(Generic[S, E]):
    """One legal move: ``event`` by one of ``actors`` takes ``source`` to ``target``."""

    source: S
    event: E
    target: S
    actors: frozenset[str]


class Machine(Generic[S, E]):
    """An immutable transition table plus the one function that applies it.

    The constructor validates the table so that a typo in a module-level
    table fails at import time, not in production: no duplicate
    ``(source, event)`` rows (the machine must be deterministic), no rows
    leaving a terminal state, every row has at least one actor, and the
    initial state is known.
    """

    def __init__(
        self,
        name: str,
        transitions: Iterable[Transition[S, E]],
        initial: S,
        terminal: Iterable[S],
    ) -> None:
        self.name = name
        self.initial: S = initial
        self.terminal: frozenset[S] = frozenset(terminal)
        rows: dict[tuple[str, str], Transition[S, E]] = {}
        actors_by_event: dict[str, set[str]] = {}
        states: set[S] = {initial, *self.terminal}
        for t in transitions:
            key = (t.source, t.event)
            if key in rows:
                raise ValueError(f"{name}: duplicate transition {t.source!r} --{t.event}-->")
            if t.source in self.terminal:
                raise ValueError(f"{name}: terminal state {t.source!r} has an outgoing transition")
            if not t.actors:
                raise ValueError(f"{name}: transition {t.source!r} --{t.event}--> has no actors")
            rows[key] = t
            actors_by_event.setdefault(t.event, set()).update(t.actors)
            states.update((t.source, t.target))
        self._rows: Mapping[tuple[str, str], Transition[S, E]] = rows
        self._actors_by_event: Mapping[str, frozenset[str]] = {e: frozenset(a) for e, a in actors_by_event.items()}
        self.states: frozenset[S] = frozenset(states)
        self.events: frozenset[E] = frozenset(t.event for t in rows.values())

    @property
    def transitions(self) -> tuple[Transition[S, E], ...]:
        """All rows, for docs and tests."""
        return tuple(self._rows.values())

    def actors_for(self, event: str) -> frozenset[str]:
        """Everyone who may perform ``event`` in at least one state."""
        return self._actors_by_event.get(event, frozenset())

    def allowed_events(self, state: S) -> frozenset[E]:
        """Events that have a row leaving ``state`` (ignoring who the actor is)."""
        return frozenset(t.event for t in self._rows.values() if t.source == state)

    def is_terminal(self, state: S) -> bool:
        return state in self.terminal

    def lookup(self, state: str, event: str) -> Transition[S, E] | None:
        """The row for ``(state, event)``, or None; never raises."""
        return self._rows.get((state, event))

    def check(self, state: S, event: str, actor: str) -> Transition[S, E]:
        """Return the row ``actor`` would take, or raise the refusal with its code."""
        if state not in self.states:
            raise ClawnodeError(ErrorCode.INVALID_ARGUMENT, f"{self.name}: unknown state {state!r}")
        if event not in self._actors_by_event:
            raise ClawnodeError(ErrorCode.CONFLICT, f"{self.name}: unknown event {event!r}")
        if actor not in self._actors_by_event[event]:
            raise ClawnodeError(ErrorCode.FORBIDDEN, f"{self.name}: {actor!r} may not {event}")
        row = self.lookup(state, event)
        if row is None:
            raise ClawnodeError(ErrorCode.CONFLICT, f"{self.name}: cannot {event} in state {state}")
        if actor not in row.actors:
            raise ClawnodeError(ErrorCode.FORBIDDEN, f"{self.name}: {actor!r} may not {event} in state {state}")
        return row

    def next_state(self, state: S, event: str, actor: str) -> S:
        """The single place where a transition is applied: the new state, or a refusal."""
        return self.check(state, event, actor).target
