"""The case state machine: the table is the documented one, and it has no dead ends."""

from __future__ import annotations

import itertools

import pytest

from mqi.ledger.states import (
    ALLOWED_TRANSITIONS,
    FINISHED_STATES,
    CaseState,
    IllegalTransition,
    check_transition,
)

# The table agreed in the issue, written out independently of the code.
DOCUMENTED = {
    "pending": "uploading failed cancelled",
    "uploading": "queued pending failed cancelled killing",
    "queued": "running downloading pending failed killing cancelled",
    "running": "downloading failed killing pending",
    "killing": "failed cancelled",
    "downloading": "completed failed pending cancelled",
    "completed": "pending",
    "failed": "pending",
    "cancelled": "pending",
}


def test_the_table_is_the_documented_one():
    assert {str(s): {str(t) for t in targets} for s, targets in ALLOWED_TRANSITIONS.items()} == {
        state: set(targets.split()) for state, targets in DOCUMENTED.items()
    }


@pytest.mark.parametrize(
    "source, target", list(itertools.product(CaseState, CaseState)), ids=lambda s: str(s)
)
def test_check_transition_follows_the_table(source, target):
    if target.value in DOCUMENTED[source.value].split():
        check_transition(7, source, target)
    else:
        with pytest.raises(
            IllegalTransition, match=f"case 7 cannot move from {source} to {target}"
        ):
            check_transition(7, source, target)


def reachable(start: CaseState) -> set[CaseState]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in ALLOWED_TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_state_is_reachable_and_every_case_can_finish():
    assert reachable(CaseState.PENDING) == set(CaseState)
    for state in CaseState:
        assert reachable(state) & FINISHED_STATES, f"{state} can never finish"
