"""What a run does next for a case: one table from the ledger's state to the next step.

Every run of a case, the first or one resumed after a crash, a reboot or a cancel, asks this
module and nothing else. The ledger is the record of truth: each step takes its move there as
a check-and-set before it touches a host, and the table is read again after every step, so a
case cancelled meanwhile goes to its kill (or is done) instead of on to the GPU.

| case state  | live attempt             | next step                                            |
|-------------|--------------------------|------------------------------------------------------|
| pending     | -                        | UPLOAD: place, then send the folder (pending -> uploading) |
| uploading   | none, not sent by this run | UPLOAD: send again (a resumed or broken upload; verified) |
| uploading   | none, sent by this run   | ADMIT: take a GPU slot in the ledger, add the task    |
| uploading   | yes                      | SUBMIT: add the task, or adopt the one with its label |
| queued, running | yes                  | WAIT: poll until the task ends; record how it ended   |
| killing     | yes                      | KILL: kill and confirm; cancelled, or failed (timeout) |
| downloading | yes                      | FETCH: download and verify; completed                 |
| queued ... downloading | none (ended)  | CLOSE: the attempt ended, the case did not move (an older version's half-write) |
| completed, failed, cancelled | -       | DONE                                                  |
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from mqi.ledger.records import Attempt, Case
from mqi.ledger.states import ALLOWED_TRANSITIONS, FINISHED_STATES, AttemptResult, CaseState, FailureCategory
from mqi.site import Placement, Site


class Step(enum.StrEnum):
    UPLOAD = "upload"
    ADMIT = "admit"
    SUBMIT = "submit"
    WAIT = "wait"
    KILL = "kill"
    FETCH = "fetch"
    CLOSE = "close"
    DONE = "done"


_WITH_A_LIVE_ATTEMPT = {
    CaseState.QUEUED: Step.WAIT,
    CaseState.RUNNING: Step.WAIT,
    CaseState.KILLING: Step.KILL,
    CaseState.DOWNLOADING: Step.FETCH,
}


def next_step(state: CaseState, attempt: Attempt | None, uploaded: bool) -> Step:
    """The table above. `uploaded`: this run has sent the case folder to the host."""
    if state in FINISHED_STATES:
        return Step.DONE
    if state is CaseState.PENDING:
        return Step.UPLOAD
    if state is CaseState.UPLOADING:
        if attempt is not None:
            return Step.SUBMIT
        return Step.ADMIT if uploaded else Step.UPLOAD
    return _WITH_A_LIVE_ATTEMPT[state] if attempt is not None else Step.CLOSE


@dataclass
class CaseRun:
    """One run of one case, rebuilt from the ledger at every step: what the run itself knows
    besides the ledger is only where it sent the folder."""

    site: Site
    case_id: int
    host: str | None = None  # pinned by whoever started the run
    group: str | None = None
    uploaded_to: Placement | None = field(default=None)

    @property
    def case(self) -> Case:
        return self.site.ledger.get_case(self.case_id)

    @property
    def attempt(self) -> Attempt | None:
        return self.site.ledger.live_attempt(self.case_id)

    def next_step(self) -> Step:
        case = self.case
        if case.state is CaseState.PENDING:
            self.uploaded_to = None  # back in line (a broken upload, a retry): sent anew
        return next_step(case.state, self.attempt, self.uploaded_to is not None)


# How an attempt that ended left its case, for CLOSE.
_CLOSING = {
    AttemptResult.SUCCESS: (CaseState.COMPLETED, None),
    AttemptResult.CANCELLED: (CaseState.CANCELLED, FailureCategory.CANCELLED),
    AttemptResult.TIMEOUT: (CaseState.FAILED, FailureCategory.TIMEOUT),
    AttemptResult.FAILED: (CaseState.FAILED, FailureCategory.ENGINE),
    AttemptResult.KILLED: (CaseState.FAILED, FailureCategory.INFRASTRUCTURE),
    AttemptResult.LOST: (CaseState.FAILED, FailureCategory.LOST),
}


def close_ended_attempt(site: Site, case: Case, actor: str) -> None:
    """A case left past pending whose last attempt has ended: an older version finished the
    attempt and moved the case in two writes, and crashed between them. The attempt's result
    says where the case was going."""
    attempts = site.ledger.attempts(case.id)
    last = attempts[-1] if attempts else None
    state, category = _CLOSING.get(last.result if last else None, (CaseState.FAILED, FailureCategory.INFRASTRUCTURE))
    note = "the attempt had ended but the case was not moved on (an interrupted write)"
    no_results = state is CaseState.COMPLETED and not case.results_path
    if no_results or state not in ALLOWED_TRANSITIONS[case.state]:
        state, category = CaseState.FAILED, FailureCategory.INFRASTRUCTURE
    site.ledger.transition(case.id, state, actor=actor, attempt_id=last.id if last else None, only_from={case.state},
                           message=note, failure_category=category,
                           failure_message=note if state is CaseState.FAILED else None)
