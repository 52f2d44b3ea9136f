"""The case state machine: every state, every allowed move, in one place.

Nothing else decides whether a case may move from one state to another; the ledger asks
`check_transition` before it changes a row, so an illegal move changes nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from mqi.errors import MqiError


class CaseState(enum.StrEnum):
    PENDING = "pending"  # registered, waiting for a GPU slot
    UPLOADING = "uploading"
    QUEUED = "queued"  # submitted to pueue, not started yet
    RUNNING = "running"
    DOWNLOADING = "downloading"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    KILLING = "killing"  # kill requested, not yet confirmed; retried until it is


class FailureCategory(enum.StrEnum):
    INPUT = "input"  # the case folder itself is wrong; a retry will not help
    ENGINE = "engine"  # the dose engine exited non-zero
    TIMEOUT = "timeout"
    TRANSIENT = "transient"  # network or host trouble that may pass
    LOST = "lost"  # the task vanished from the queue
    CANCELLED = "cancelled"
    INFRASTRUCTURE = "infrastructure"  # our own setup (config, credentials, disk)


class AttemptResult(enum.StrEnum):
    SUCCESS = "success"
    FAILED = "failed"
    KILLED = "killed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    LOST = "lost"


S = CaseState
ALLOWED_TRANSITIONS: Mapping[CaseState, frozenset[CaseState]] = {
    S.PENDING: frozenset({S.UPLOADING, S.FAILED, S.CANCELLED}),
    # back to pending: the upload broke off and the case waits for a slot again;
    # killing: cancelled after its slot was taken, while its task may be on its way to pueue
    S.UPLOADING: frozenset({S.QUEUED, S.PENDING, S.FAILED, S.CANCELLED, S.KILLING}),
    # queued -> downloading: the task started and finished between two polls
    S.QUEUED: frozenset({S.RUNNING, S.DOWNLOADING, S.PENDING, S.FAILED, S.KILLING, S.CANCELLED}),
    # running -> pending: the task was lost and the case is submitted again
    S.RUNNING: frozenset({S.DOWNLOADING, S.FAILED, S.KILLING, S.PENDING}),
    S.KILLING: frozenset({S.FAILED, S.CANCELLED}),
    # cancelled: the task is over, the results are not kept
    S.DOWNLOADING: frozenset({S.COMPLETED, S.FAILED, S.PENDING, S.CANCELLED}),
    # a finished case goes back to pending only to be retried, as a new attempt
    S.COMPLETED: frozenset({S.PENDING}),
    S.FAILED: frozenset({S.PENDING}),
    S.CANCELLED: frozenset({S.PENDING}),
}
del S

FINISHED_STATES = frozenset({CaseState.COMPLETED, CaseState.FAILED, CaseState.CANCELLED})
ACTIVE_STATES = frozenset(CaseState) - FINISHED_STATES
# The states in which a case's attempt may hold a GPU slot: admitted (still uploading, its task
# on its way), in pueue, or being killed. Moving to any other state gives the slot back in the
# same transaction.
SLOT_STATES = frozenset({CaseState.UPLOADING, CaseState.QUEUED, CaseState.RUNNING, CaseState.KILLING})


class IllegalTransition(MqiError):
    """A case was asked to move between two states that the state machine does not link."""

    def __init__(self, case_id: int, from_state: CaseState, to_state: CaseState):
        self.case_id = case_id
        self.from_state = from_state
        self.to_state = to_state
        allowed = ", ".join(sorted(ALLOWED_TRANSITIONS[from_state])) or "none"
        super().__init__(
            f"case {case_id} cannot move from {from_state} to {to_state} "
            f"(allowed from {from_state}: {allowed})"
        )


def check_transition(case_id: int, from_state: CaseState, to_state: CaseState) -> None:
    """Raise IllegalTransition unless the table allows from_state -> to_state."""
    if to_state not in ALLOWED_TRANSITIONS[from_state]:
        raise IllegalTransition(case_id, from_state, to_state)
