"""The case ledger: cases, their attempts, their audit trail and the GPU groups."""

from mqi.ledger.engine import LedgerError
from mqi.ledger.records import Attempt, Case, CaseOverview, Event, GpuGroup
from mqi.ledger.states import (
    ALLOWED_TRANSITIONS,
    AttemptResult,
    CaseState,
    FailureCategory,
    IllegalTransition,
)
from mqi.ledger.store import AttemptNotFound, CaseNotFound, Ledger

__all__ = [
    "ALLOWED_TRANSITIONS",
    "Attempt",
    "AttemptNotFound",
    "AttemptResult",
    "Case",
    "CaseNotFound",
    "CaseOverview",
    "CaseState",
    "Event",
    "FailureCategory",
    "GpuGroup",
    "IllegalTransition",
    "Ledger",
    "LedgerError",
]
