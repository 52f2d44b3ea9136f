"""What the ledger hands out: frozen snapshots, safe to keep after the session closed."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple, TypeVar

from sqlalchemy import Row

from mqi.ledger.models import AttemptRow, CaseRow, EventRow, GpuGroupRow
from mqi.ledger.states import AttemptResult, CaseState, FailureCategory


@dataclass(frozen=True)
class Case:
    id: int
    uid: str  # 12 lowercase base32 characters, safe in remote paths and pueue labels
    source: str  # absolute folder path, as os.fsdecode gives it
    name: str
    state: CaseState
    progress: int  # 0 to 100
    created_at: datetime
    updated_at: datetime
    failure_category: FailureCategory | None
    failure_message: str | None
    results_path: str | None
    pinned_host: str | None
    pinned_group: str | None
    cancel_requested_at: datetime | None  # a cancel was asked for: no step may go on

    @property
    def folder(self) -> Path:
        return Path(self.source)

    @classmethod
    def from_row(cls, row: CaseRow | Row) -> Case:
        """From an ORM row, or a plain result row of the cases table (faster in bulk)."""
        return cls(
            id=row.id,
            uid=row.uid,
            source=row.source,
            name=row.name,
            state=CaseState(row.state),
            progress=row.progress,
            created_at=row.created_at,
            updated_at=row.updated_at,
            failure_category=_optional(FailureCategory, row.failure_category),
            failure_message=row.failure_message,
            results_path=row.results_path,
            pinned_host=row.pinned_host,
            pinned_group=row.pinned_group,
            cancel_requested_at=row.cancel_requested_at,
        )


@dataclass(frozen=True)
class Attempt:
    id: int
    case_id: int
    number: int  # 1, 2, ... within the case
    host: str
    group: str  # pueue group
    task_id: int | None  # pueue task id, once pueue accepted the task
    label: str  # pueue label
    remote_dir: str
    flow_run_id: str | None
    submitted_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    exit_code: int | None
    result: AttemptResult | None  # None while the attempt is live
    holds_slot: bool  # one slot of its GPU group, until its task is finished or killed

    @property
    def live(self) -> bool:
        return self.result is None

    @classmethod
    def from_row(cls, row: AttemptRow | Row) -> Attempt:
        """From an ORM row, or a plain result row of the attempts table."""
        return cls(
            id=row.id,
            case_id=row.case_id,
            number=row.number,
            host=row.host,
            group=row.pueue_group,
            task_id=row.pueue_task_id,
            label=row.pueue_label,
            remote_dir=row.remote_dir,
            flow_run_id=row.flow_run_id,
            submitted_at=row.submitted_at,
            started_at=row.started_at,
            ended_at=row.ended_at,
            exit_code=row.exit_code,
            result=_optional(AttemptResult, row.result),
            holds_slot=row.holds_slot,
        )


@dataclass(frozen=True)
class Event:
    """One line of a case's audit trail: a state change, who made it and why."""

    id: int
    case_id: int
    at: datetime
    from_state: CaseState | None  # None for the registration of the case
    to_state: CaseState
    attempt_id: int | None
    actor: str
    message: str

    @classmethod
    def from_row(cls, row: EventRow) -> Event:
        return cls(
            id=row.id,
            case_id=row.case_id,
            at=row.at,
            from_state=_optional(CaseState, row.from_state),
            to_state=CaseState(row.to_state),
            attempt_id=row.attempt_id,
            actor=row.actor,
            message=row.message,
        )


@dataclass(frozen=True)
class GpuGroup:
    host: str
    group: str
    slots: int
    devices: tuple[str, ...]
    active: bool  # False once the group was removed from the configuration
    updated_at: datetime

    @classmethod
    def from_row(cls, row: GpuGroupRow) -> GpuGroup:
        return cls(
            host=row.host,
            group=row.pueue_group,
            slots=row.slots,
            devices=tuple(row.devices),
            active=row.active,
            updated_at=row.updated_at,
        )


class CaseOverview(NamedTuple):
    """One line of `mqi status`: a case and where its latest attempt ran (None before the
    first submission). A tuple of the columns shown, not whole records: 10,000 of them are
    read in well under a second."""

    id: int
    uid: str
    name: str
    state: CaseState
    progress: int
    created_at: datetime
    updated_at: datetime
    host: str | None
    group: str | None
    task_id: int | None


E = TypeVar("E", bound=enum.Enum)


def _optional(enum_type: type[E], value: str | None) -> E | None:
    return None if value is None else enum_type(value)
