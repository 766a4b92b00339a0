"""The generic table: construction checks, refusal order, and a random walk over every real table."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.machines import lease, task
from protocols.machines.table import Machine, Transition
from runtime.errors import ClawnodeError, ErrorCode

ALL_MACHINES: list[Machine[Any, Any]] = [lease.LEASE_MACHINE, *task.MACHINES]
ALL_ROLES = sorted(lease.LEASE_ROLES | task.TASK_ROLES | {"stranger"})


def _t(source: str, event: str, target: str, *actors: str) -> Transition[str, str]:
    return Transition(source, event, target, frozenset(actors))


def _code(exc: pytest.ExceptionInfo[ClawnodeError]) -> ErrorCode:
    return exc.value.code


def test_duplicate_source_event_is_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Machine("m", [_t("a", "go", "b", "x"), _t("a", "go", "c", "x")], initial="a", terminal=["c"])


def test_terminal_state_may_not_have_outgoing_rows() -> None:
    with pytest.raises(ValueError, match="terminal"):
        Machine("m", [_t("a", "go", "b", "x"), _t("b", "back", "a", "x")], initial="a", terminal=["b"])


def test_row_needs_an_actor() -> None:
    with pytest.raises(ValueError, match="no actors"):
        Machine("m", [_t("a", "go", "b")], initial="a", terminal=["b"])


def _toy() -> Machine[str, str]:
    return Machine(
        "toy",
        [_t("a", "go", "b", "alice"), _t("b", "go", "c", "bob"), _t("b", "stop", "c", "alice", "bob")],
        initial="a",
        terminal=["c"],
    )


def test_queries() -> None:
    m = _toy()
    assert m.states == {"a", "b", "c"}
    assert m.events == {"go", "stop"}
    assert m.allowed_events("b") == {"go", "stop"}
    assert m.allowed_events("c") == frozenset()
    assert m.actors_for("go") == {"alice", "bob"}
    assert m.is_terminal("c") and not m.is_terminal("a")
    assert m.lookup("a", "stop") is None
    assert m.next_state("a", "go", "alice") == "b"


@pytest.mark.parametrize(
    ("state", "event", "actor", "code"),
    [
        ("a", "stop", "carol", ErrorCode.FORBIDDEN),  # never allowed anywhere beats "not in table"
        ("a", "stop", "alice", ErrorCode.CONFLICT),  # allowed elsewhere, not from here
        ("c", "go", "bob", ErrorCode.CONFLICT),  # terminal
        ("a", "go", "bob", ErrorCode.FORBIDDEN),  # row exists but lists someone else
        ("a", "fly", "alice", ErrorCode.CONFLICT),  # unknown event
        ("z", "go", "alice", ErrorCode.INVALID_ARGUMENT),  # unknown state
    ],
)
def test_refusal_order(state: str, event: str, actor: str, code: ErrorCode) -> None:
    with pytest.raises(ClawnodeError) as exc:
        _toy().next_state(state, event, actor)
    assert _code(exc) == code


def _expected(m: Machine[Any, Any], state: str, event: str, actor: str) -> str | ErrorCode:
    """An independent reading of the rows: the target, or the refusal code."""
    rows = m.transitions
    if not any(r.event == event for r in rows):
        return ErrorCode.CONFLICT
    if not any(r.event == event and actor in r.actors for r in rows):
        return ErrorCode.FORBIDDEN
    matches = [r for r in rows if r.source == state and r.event == event]
    if not matches:
        return ErrorCode.CONFLICT
    if actor not in matches[0].actors:
        return ErrorCode.FORBIDDEN
    return matches[0].target


def test_tables_are_sane() -> None:
    for m in ALL_MACHINES:
        assert m.initial in m.states
        assert m.terminal <= m.states
        for row in m.transitions:
            assert row.actors <= lease.LEASE_ROLES | task.TASK_ROLES
        # every state is reachable from the initial one
        seen, todo = {m.initial}, [m.initial]
        while todo:
            s = todo.pop()
            for r in m.transitions:
                if r.source == s and r.target not in seen:
                    seen.add(r.target)
                    todo.append(r.target)
        assert seen == m.states, m.name


@settings(max_examples=150, deadline=None)
@given(
    machine=st.sampled_from(ALL_MACHINES),
    steps=st.lists(st.tuples(st.integers(0, 30), st.sampled_from(ALL_ROLES)), max_size=25),
)
def test_random_walk_matches_table(machine: Machine[Any, Any], steps: list[tuple[int, str]]) -> None:
    events = [*sorted(machine.events), "bogus"]
    state = machine.initial
    for index, actor in steps:
        event = events[index % len(events)]
        expected = _expected(machine, state, event, actor)
        try:
            new = machine.next_state(state, event, actor)
        except ClawnodeError as exc:
            assert exc.code == expected, (machine.name, state, event, actor)
            continue
        assert new == expected
        assert machine.lookup(state, event) is not None
        assert not machine.is_terminal(state)
        state = new
