"""The one table that decides a run's next step from the ledger (mqi/resume.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from mqi.ledger.records import Attempt
from mqi.ledger.states import AttemptResult, CaseState, FailureCategory
from mqi.resume import Step, close_ended_attempt, next_step

S = CaseState
LIVE = Attempt(id=1, case_id=1, number=1, host="h", group="g", task_id=None, label="mqi-x-a1", remote_dir="/w",
               flow_run_id=None, submitted_at=datetime(2026, 1, 1, tzinfo=UTC), started_at=None, ended_at=None,
               exit_code=None, result=None, holds_slot=True)


@pytest.mark.parametrize(("state", "attempt", "uploaded", "step"), [
    (S.PENDING, None, False, Step.UPLOAD),
    (S.PENDING, None, True, Step.UPLOAD),  # sent back to pending (a broken upload): sent anew
    (S.UPLOADING, None, False, Step.UPLOAD),  # resumed after a crash: sent again, verified
    (S.UPLOADING, None, True, Step.ADMIT),  # sent by this run: wait for a GPU slot
    (S.UPLOADING, LIVE, True, Step.SUBMIT),  # admitted: add the task, or adopt it by label
    (S.UPLOADING, LIVE, False, Step.SUBMIT),
    (S.QUEUED, LIVE, False, Step.WAIT),
    (S.RUNNING, LIVE, False, Step.WAIT),
    (S.KILLING, LIVE, False, Step.KILL),  # a cancel or a timeout: kill and confirm, never wait
    (S.DOWNLOADING, LIVE, False, Step.FETCH),
    (S.QUEUED, None, False, Step.CLOSE),  # the attempt ended but the case was not moved on
    (S.KILLING, None, False, Step.CLOSE),
    (S.DOWNLOADING, None, False, Step.CLOSE),
    (S.COMPLETED, None, False, Step.DONE),
    (S.FAILED, None, False, Step.DONE),
    (S.CANCELLED, None, True, Step.DONE),  # cancelled while it waited: never on to the GPU
])
def test_the_next_step_of_every_state(state, attempt, uploaded, step):
    assert next_step(state, attempt, uploaded) is step


def test_every_active_state_has_a_step():
    for state in CaseState:
        for attempt in (None, LIVE):
            assert isinstance(next_step(state, attempt, uploaded=True), Step)


class _Site:
    def __init__(self, ledger):
        self.ledger = ledger


@pytest.mark.parametrize(("state", "result", "final", "category"), [
    (S.DOWNLOADING, AttemptResult.SUCCESS, S.FAILED, FailureCategory.INFRASTRUCTURE),  # no results recorded
    (S.KILLING, AttemptResult.CANCELLED, S.CANCELLED, FailureCategory.CANCELLED),
    (S.KILLING, AttemptResult.TIMEOUT, S.FAILED, FailureCategory.TIMEOUT),
    (S.RUNNING, AttemptResult.FAILED, S.FAILED, FailureCategory.ENGINE),
])
def test_an_attempt_that_ended_without_its_case_moving_closes_the_case(ledger, state, result, final, category):
    case, _ = ledger.register_case("/inbox/a")
    path = {S.DOWNLOADING: [S.UPLOADING, S.QUEUED, S.DOWNLOADING], S.KILLING: [S.UPLOADING, S.QUEUED, S.KILLING],
            S.RUNNING: [S.UPLOADING, S.QUEUED, S.RUNNING]}[state]
    ledger.transition(case.id, S.UPLOADING, actor="t")
    attempt = ledger.take_slot(case.id, host="h", group="g", capacity=1, label_of=str, remote_dir="/w")
    for step in path[1:]:
        ledger.transition(case.id, step, actor="t")
    ledger.finish_attempt(attempt.id, result)  # an older version's first write; it died before the second

    close_ended_attempt(_Site(ledger), ledger.get_case(case.id), "reconcile")

    closed = ledger.get_case(case.id)
    assert (closed.state, closed.failure_category) == (final, category)
    assert ledger.slot_holders() == {}
