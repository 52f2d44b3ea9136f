"""The case ledger: the record of truth for every case, its attempts and its history.

Every write is one transaction; a state change and the event recording it commit together.
Writers that lose a race for a lock (SQLite busy, PostgreSQL deadlock) run again from the
start, so callers never see "database is locked".
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from mqi.ledger import migrations
from mqi.ledger.engine import (
    MIGRATION_LOCK_KEY,
    LedgerError,
    create_ledger_engine,
    is_retryable,
    parse_url,
    safe_url,
    writer_engine,
)
from mqi.timefmt import utc_now
from mqi.ledger.models import AttemptRow, CaseRow, EventRow, GpuGroupRow, as_utc
from mqi.ledger.records import Attempt, Case, CaseOverview, Event, GpuGroup
from mqi.ledger.states import (
    FINISHED_STATES,
    SLOT_STATES,
    AttemptResult,
    CaseState,
    FailureCategory,
    check_transition,
)

T = TypeVar("T")
Clock = Callable[[], datetime]
PathLike = str | bytes | os.PathLike[str] | os.PathLike[bytes]

UID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lower case
UID_LENGTH = 12
_UID_PATTERN = re.compile(f"[{UID_ALPHABET}]{{{UID_LENGTH}}}")
_WRITE_ATTEMPTS = 8
# Where a write transaction notes the GPU groups whose slot count it changed (session.info).
SLOTS_CHANGED = "mqi_slots_changed"
# Attempt fields a caller may fill in after submission (e.g. the task id pueue gave back).
UPDATABLE_ATTEMPT_FIELDS = {
    "task_id": "pueue_task_id",
    "label": "pueue_label",
    "remote_dir": "remote_dir",
    "flow_run_id": "flow_run_id",
    "submitted_at": "submitted_at",
    "started_at": "started_at",
}


class CaseNotFound(LedgerError):
    """No case matches an id, uid or folder."""


class AttemptNotFound(LedgerError):
    """No attempt has this id."""


class CaseMovedOn(LedgerError):
    """A step's check-and-set found the case no longer where the step expected it (a cancel,
    or another run moved it on): the step did nothing."""


class CaseFinished(LedgerError):
    """The case is completed, failed or cancelled: there is nothing to cancel."""


def new_uid() -> str:
    return "".join(secrets.choice(UID_ALPHABET) for _ in range(UID_LENGTH))


def folder_key(source: PathLike) -> str:
    """The text under which a case folder is stored: absolute, normalized, any bytes kept."""
    return os.path.abspath(os.fsdecode(source))


def display_text(text: str) -> str:
    """Text safe to show and store as a name: undecodable bytes become U+FFFD."""
    return os.fsencode(text).decode("utf-8", errors="replace")


class Ledger:
    """Cases, attempts, events and GPU groups in one SQL database (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, *, clock: Clock = utc_now):
        self._engine = engine
        self._writer = writer_engine(engine)
        self._clock = clock
        #: called with (case, from_state, attempt_id) after each committed transition
        self.transition_listeners: list[Callable[[Case, CaseState, int | None], None]] = []
        #: called with (host, group) after a commit that took or gave back a slot of that group
        self.slot_listeners: list[Callable[[str, str], None]] = []

    @classmethod
    def open(cls, url: str, *, clock: Clock = utc_now, migrate: bool = True) -> Ledger:
        """Connect to the ledger at `url` and bring its schema up to date."""
        parsed = parse_url(url)
        ledger = cls(create_ledger_engine(parsed), clock=clock)
        try:
            # Many processes opening a new SQLite file at once may see it locked while one
            # of them switches it to WAL: that is a lost race, run again like a write.
            _retrying(ledger.upgrade if migrate else ledger.schema_revision)
        except DBAPIError as error:
            ledger.close()
            raise LedgerError(
                f"cannot open the case ledger at {safe_url(parsed)}: {error.orig}"
            ) from None
        return ledger

    def _now(self) -> datetime:
        return as_utc(self._clock())

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({safe_url(self._engine.url)})"

    # -- schema ---------------------------------------------------------------------

    def schema_revision(self) -> str | None:
        with self._engine.connect() as connection:
            return migrations.current_revision(connection)

    def upgrade(self, revision: str = "head") -> str | None:
        """Migrate the schema to `revision`; one process at a time does it."""
        head = migrations.HEAD_REVISION
        if revision in ("head", head) and self.schema_revision() == head:
            return head

        def migrate() -> str | None:
            with self._writer.begin() as connection:  # SQLite: holds the write lock
                if connection.dialect.name == "postgresql":
                    connection.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
                migrations.upgrade(connection, revision)
                return migrations.current_revision(connection)

        return _retrying(migrate)

    # -- sessions -------------------------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with Session(self._engine) as session, session.begin():
            yield session

    def _write(self, work: Callable[[Session], T]) -> T:
        """Run `work` in one write transaction, again from the start if it lost a lock race."""

        changed: list[tuple[str, str]] = []

        def transaction() -> T:
            changed.clear()
            with Session(self._writer) as session, session.begin():
                result = work(session)
                changed.extend(session.info.get(SLOTS_CHANGED, []))
                return result

        result = _retrying(transaction)
        self._slots_changed(changed)  # after the commit: only what is recorded
        return result

    # -- cases ----------------------------------------------------------------------

    def register_case(
        self,
        source: PathLike,
        name: str | None = None,
        actor: str = "scan",
        *,
        pinned_host: str | None = None,
        pinned_group: str | None = None,
    ) -> tuple[Case, bool]:
        """The case for folder `source`, registering it as pending if new; True if it was new.

        Two processes registering the same folder at once get the same case.
        """
        key = folder_key(source)
        case_name = display_text(name if name is not None else os.path.basename(key))

        def insert(session: Session) -> tuple[Case, bool]:
            existing = session.scalar(select(CaseRow).where(CaseRow.source == key))
            if existing is not None:
                return Case.from_row(existing), False
            now = self._now()
            row = CaseRow(
                uid=new_uid(),
                source=key,
                name=case_name,
                state=CaseState.PENDING,
                progress=0,
                created_at=now,
                updated_at=now,
                pinned_host=pinned_host,
                pinned_group=pinned_group,
            )
            session.add(row)
            session.flush()
            session.add(
                _event(
                    row.id, now, None, CaseState.PENDING, actor, f"registered {display_text(key)}"
                )
            )
            return Case.from_row(row), True

        try:
            return self._write(insert)
        except IntegrityError:
            # Another process inserted the same folder between our read and our insert
            # (PostgreSQL; SQLite writers are serialized). A uid clash would also land
            # here; both are settled by running once more.
            return self._write(insert)

    def find_case(self, ref: str | int) -> Case:
        """The case named by an id, a uid or its folder path."""
        text = str(ref).strip()
        with self._reading() as session:
            row = None
            if text.isdigit():
                row = session.get(CaseRow, int(text))
            if row is None and _UID_PATTERN.fullmatch(text):
                row = session.scalar(select(CaseRow).where(CaseRow.uid == text))
            if row is None and text:
                row = session.scalar(select(CaseRow).where(CaseRow.source == folder_key(text)))
            if row is None:
                raise CaseNotFound(f"no case has the id, uid or folder {text!r}")
            return Case.from_row(row)

    def get_case(self, case_id: int) -> Case:
        with self._reading() as session:
            return Case.from_row(_case_row(session, case_id))

    def list_cases(self, state: CaseState | str | None = None) -> list[Case]:
        """All cases by id, or those in one state."""
        return self.cases_in_states(CaseState if state is None else [state])

    def sources(self) -> set[str]:
        """The folder of every case (as `folder_key` writes it): one column, not whole cases."""
        with self._reading() as session:
            return set(session.scalars(select(CaseRow.source)))

    def cases_in_states(self, states: Iterable[CaseState | str]) -> list[Case]:
        wanted = [CaseState(s).value for s in states]
        with self._reading() as session:
            rows = session.scalars(
                select(CaseRow).where(CaseRow.state.in_(wanted)).order_by(CaseRow.id)
            )
            return [Case.from_row(row) for row in rows]

    def overview(self, state: CaseState | str | None = None) -> list[CaseOverview]:
        """Cases by id, each with where its latest attempt ran: one query, only the columns shown."""
        cases, attempts = CaseRow.__table__, AttemptRow.__table__
        latest = (select(attempts.c.case_id, func.max(attempts.c.number).label("number"))
                  .group_by(attempts.c.case_id).subquery())
        query = (
            select(cases.c.id, cases.c.uid, cases.c.name, cases.c.state, cases.c.progress, cases.c.created_at,
                   cases.c.updated_at, attempts.c.host, attempts.c.pueue_group, attempts.c.pueue_task_id)
            .select_from(cases.outerjoin(latest, latest.c.case_id == cases.c.id).outerjoin(
                attempts, (attempts.c.case_id == latest.c.case_id) & (attempts.c.number == latest.c.number)))
            .order_by(cases.c.id)
        )
        if state is not None:
            query = query.where(cases.c.state == CaseState(state).value)
        states = {s.value: s for s in CaseState}
        with self._reading() as session:
            return [CaseOverview(r[0], r[1], r[2], states[r[3]], *r[4:]) for r in session.execute(query)]

    def transition(
        self,
        case_id: int,
        to_state: CaseState | str,
        *,
        actor: str,
        message: str = "",
        attempt_id: int | None = None,
        failure_category: FailureCategory | str | None = None,
        failure_message: str | None = None,
        results_path: PathLike | None = None,
        only_from: Iterable[CaseState] | None = None,
        finish: AttemptResult | str | None = None,
        exit_code: int | None = None,
    ) -> Case | None:
        """Move a case to `to_state` and record the event, in one transaction.

        Raises IllegalTransition (and changes nothing) when the state machine forbids the
        move. `only_from` makes it a check-and-set: when the case is in none of those states
        (a cancel, another run moved it on) nothing changes and None is returned. `finish`
        ends the live attempt (`attempt_id`, else the case's live one) with that result in
        the same transaction. Moving to `failed` needs a failure category; `cancelled`
        implies one. A case that comes to rest (pending, completed, failed, cancelled) must
        have no live attempt; a case leaving the states that hold a GPU slot gives its slot
        back in the same transaction.
        """
        target = CaseState(to_state)
        category = _failure_category_for(target, failure_category)
        expected = None if only_from is None else frozenset(CaseState(s) for s in only_from)

        def move(session: Session) -> tuple[Case, CaseState, int | None] | None:
            row = _case_row(session, case_id, for_update=True)
            source = CaseState(row.state)
            if expected is not None and source not in expected:
                return None
            check_transition(case_id, source, target)
            attempt = _attempt_row_of_case(session, attempt_id, case_id) if attempt_id is not None else None
            if finish is not None:
                attempt = attempt or _live_attempt_row(session, case_id)
                if attempt is not None:
                    _finish(attempt, AttemptResult(finish), exit_code, self._now())
            note = _event_message(message, failure_category, failure_message)
            self._move(session, row, target, actor, note, attempt.id if attempt else attempt_id,
                       category=category, failure_message=failure_message, results_path=results_path)
            return Case.from_row(row), source, attempt.id if attempt else attempt_id

        moved = self._write(move)
        if moved is None:
            return None
        self._announce(*moved)
        return moved[0]

    def _move(self, session: Session, row: CaseRow, target: CaseState, actor: str, note: str,
              attempt_id: int | None, *, category: FailureCategory | None = None,
              failure_message: str | None = None, results_path: PathLike | None = None) -> None:
        """The state change itself, inside the caller's transaction (the row is locked)."""
        source = CaseState(row.state)
        check_transition(row.id, source, target)
        if target is CaseState.PENDING or target in FINISHED_STATES:
            _require_no_live_attempt(session, row.id, f"moving the case to {target}")
        released = []
        if target not in SLOT_STATES:
            for holder in session.scalars(select(AttemptRow).where(AttemptRow.case_id == row.id,
                                                                   AttemptRow.holds_slot)):
                holder.holds_slot = False
                released.append((holder.host, holder.pueue_group))
        now = self._now()
        row.state = target
        row.updated_at = now
        # Only a failed or cancelled case carries a failure; the event keeps old ones.
        keeps_failure = target in (CaseState.FAILED, CaseState.CANCELLED)
        row.failure_category = category if keeps_failure else None
        row.failure_message = failure_message if keeps_failure else None
        if target is CaseState.COMPLETED:
            row.progress = 100
        elif target is CaseState.PENDING:
            row.progress = 0
            row.cancel_requested_at = None  # a retry starts afresh
        if results_path is not None:
            row.results_path = os.fsdecode(results_path)
        session.add(_event(row.id, now, source, target, actor, note, attempt_id))
        session.info.setdefault(SLOTS_CHANGED, []).extend(released)

    def _announce(self, case: Case, source: CaseState, attempt_id: int | None) -> None:
        for listener in self.transition_listeners:  # after the commit: only what is recorded
            listener(case, source, attempt_id)

    def _slots_changed(self, groups: Iterable[tuple[str, str]]) -> None:
        for host, group in set(groups):
            for listener in self.slot_listeners:
                listener(host, group)

    # -- the steps of a run, each one check-and-set ------------------------------------

    def request_cancel(self, case_id: int, *, actor: str, reason: str) -> tuple[Case, Attempt | None]:
        """Record a cancel before anything is killed; the case and what is left to kill.

        A case with no live attempt, or whose task is already over (downloading), is
        cancelled at once. One whose task may be on a host moves to `killing` and keeps its
        slot: (case, attempt) is returned, and the attempt's task must be killed and the
        kill confirmed (`confirm_kill`). Raises CaseFinished for a finished case.
        """

        def cancel(session: Session) -> tuple[Case, CaseState, Attempt | None]:
            row = _case_row(session, case_id, for_update=True)
            source = CaseState(row.state)
            if source in FINISHED_STATES:
                raise CaseFinished(f"case {row.name} is already {source}")
            now = self._now()
            if row.cancel_requested_at is None:
                row.cancel_requested_at = now
            live = _live_attempt_row(session, case_id)
            if live is None or source is CaseState.DOWNLOADING:
                if live is not None:
                    _finish(live, AttemptResult.CANCELLED, None, now)
                self._move(session, row, CaseState.CANCELLED, actor, reason, live.id if live else None,
                           category=FailureCategory.CANCELLED)
                return Case.from_row(row), source, None
            if source is not CaseState.KILLING:
                self._move(session, row, CaseState.KILLING, actor, reason, live.id)
            return Case.from_row(row), source, Attempt.from_row(live)

        case, source, attempt = self._write(cancel)
        if case.state is not source:
            self._announce(case, source, attempt.id if attempt else None)
        return case, attempt

    def confirm_kill(self, case_id: int, attempt_id: int, *, actor: str, message: str) -> Case | None:
        """The attempt's task is confirmed gone: it ends, its slot is given back, and the case
        is cancelled (a cancel was asked for) or failed by its timeout. None when the case had
        already moved on (another killer confirmed first)."""

        def confirm(session: Session) -> tuple[Case, CaseState] | None:
            row = _case_row(session, case_id, for_update=True)
            if row.state != CaseState.KILLING:
                return None
            attempt = _attempt_row_of_case(session, attempt_id, case_id)
            cancelled = row.cancel_requested_at is not None
            result = AttemptResult.CANCELLED if cancelled else AttemptResult.TIMEOUT
            _finish(attempt, result, None, self._now())
            if cancelled:
                self._move(session, row, CaseState.CANCELLED, actor, message, attempt_id,
                           category=FailureCategory.CANCELLED)
            else:
                self._move(session, row, CaseState.FAILED, actor, _event_message(message, FailureCategory.TIMEOUT,
                           message), attempt_id, category=FailureCategory.TIMEOUT, failure_message=message)
            return Case.from_row(row), CaseState.KILLING

        confirmed = self._write(confirm)
        if confirmed is None:
            return None
        self._announce(*confirmed, attempt_id)
        return confirmed[0]

    def take_slot(self, case_id: int, *, host: str, group: str, capacity: int,
                  label_of: Callable[[int], str], remote_dir: str, flow_run_id: str | None = None) -> Attempt | None:
        """Admit an uploaded case to one slot of a GPU group: its new attempt, holding the slot.

        One transaction checks that the case is still `uploading` with no cancel asked for
        (else CaseMovedOn) and that the group has a free slot (else None), and writes the
        attempt. Holders of one group are counted under a lock on the group's row, so two
        processes never both take its last slot. `label_of(number)` names the attempt's task.
        """

        def admit(session: Session) -> Attempt | None:
            _gpu_group_row(session, host, group)  # locked: one admission to this group at a time
            row = _case_row(session, case_id, for_update=True)
            if row.state != CaseState.UPLOADING or row.cancel_requested_at is not None:
                raise CaseMovedOn(f"case {row.name} is {row.state}, no longer waiting for a GPU slot")
            _require_no_live_attempt(session, case_id, "taking a GPU slot")
            held = session.scalar(select(func.count()).select_from(AttemptRow).where(
                AttemptRow.holds_slot, AttemptRow.host == host, AttemptRow.pueue_group == group))
            if held >= capacity:
                return None
            number = (session.scalar(select(func.max(AttemptRow.number)).where(AttemptRow.case_id == case_id))
                      or 0) + 1
            attempt = AttemptRow(case_id=case_id, number=number, host=host, pueue_group=group,
                                 pueue_label=label_of(number), remote_dir=remote_dir,
                                 flow_run_id=None if flow_run_id is None else str(flow_run_id),
                                 submitted_at=self._now(), holds_slot=True)
            session.add(attempt)
            session.flush()
            session.info.setdefault(SLOTS_CHANGED, []).append((host, group))
            return Attempt.from_row(attempt)

        try:
            return self._write(admit)
        except IntegrityError:  # another process made the group's row first: it is there now
            return self._write(admit)

    def record_submission(self, attempt_id: int, task_id: int, *, actor: str, message: str) -> Case:
        """The task of a live attempt is in the queue: its id is kept and the case is `queued`.

        The id is kept whatever happened meanwhile, so a kill can find the task; a case that
        was cancelled in the meantime raises CaseMovedOn after the commit (the caller kills
        the task it has just added). A resumed submission of a case already queued is a no-op.
        """

        def record(session: Session) -> tuple[Case, CaseState]:
            attempt = _attempt_row(session, attempt_id)
            row = _case_row(session, attempt.case_id, for_update=True)
            source = CaseState(row.state)
            if attempt.result is None and attempt.pueue_task_id is None:
                attempt.pueue_task_id = task_id
            if source is CaseState.UPLOADING and attempt.result is None:
                self._move(session, row, CaseState.QUEUED, actor, message, attempt_id)
            return Case.from_row(row), source

        case, source = self._write(record)
        if case.state is not source:
            self._announce(case, source, attempt_id)
        elif case.state not in (CaseState.QUEUED, CaseState.RUNNING):
            raise CaseMovedOn(f"case {case.name} is {case.state}: its task {task_id} must not run")
        return case

    def slot_holders(self) -> dict[tuple[str, str], int]:
        """GPU slots held now, per (host, group): the truth Prefect's limits are repaired from."""
        query = (select(AttemptRow.host, AttemptRow.pueue_group, func.count()).where(AttemptRow.holds_slot)
                 .group_by(AttemptRow.host, AttemptRow.pueue_group))
        with self._reading() as session:
            return {(host, group): count for host, group, count in session.execute(query)}

    def set_progress(self, case_id: int, percent: int) -> Case:
        if not 0 <= percent <= 100:
            raise ValueError(f"progress must be between 0 and 100, not {percent}")

        def store(session: Session) -> Case:
            row = _case_row(session, case_id, for_update=True)
            if row.progress != percent:
                row.progress = int(percent)
                row.updated_at = self._now()
            return Case.from_row(row)

        return self._write(store)

    def pin_case(self, case_id: int, host: str | None, group: str | None = None) -> Case:
        """Make a case run only on `host` (and `group`, if given); None unpins it."""

        def store(session: Session) -> Case:
            row = _case_row(session, case_id, for_update=True)
            row.pinned_host, row.pinned_group = host, group
            row.updated_at = self._now()
            return Case.from_row(row)

        return self._write(store)

    def events(self, case_id: int) -> list[Event]:
        """The audit trail of a case, oldest first."""
        with self._reading() as session:
            _case_row(session, case_id)
            rows = session.scalars(
                select(EventRow).where(EventRow.case_id == case_id).order_by(EventRow.id)
            )
            return [Event.from_row(row) for row in rows]

    # -- attempts -------------------------------------------------------------------

    def start_attempt(
        self,
        case_id: int,
        *,
        host: str,
        group: str,
        label: str,
        remote_dir: str,
        flow_run_id: str | None = None,
        task_id: int | None = None,
    ) -> Attempt:
        """Record a new submission of a case; it gets the next number (1, 2, ...)."""

        def insert(session: Session) -> Attempt:
            _case_row(session, case_id, for_update=True)
            _require_no_live_attempt(session, case_id, "starting a new one")
            last = session.scalar(
                select(func.max(AttemptRow.number)).where(AttemptRow.case_id == case_id)
            )
            row = AttemptRow(
                case_id=case_id,
                number=(last or 0) + 1,
                host=host,
                pueue_group=group,
                pueue_label=label,
                pueue_task_id=task_id,
                remote_dir=remote_dir,
                flow_run_id=None if flow_run_id is None else str(flow_run_id),
                submitted_at=self._now(),
            )
            session.add(row)
            session.flush()
            return Attempt.from_row(row)

        return self._write(insert)

    def update_attempt(self, attempt_id: int, **fields: object) -> Attempt:
        """Fill in fields of a live attempt: task_id, label, remote_dir, flow_run_id,
        submitted_at, started_at. A recorded task id or label is never cleared."""
        unknown = set(fields) - set(UPDATABLE_ATTEMPT_FIELDS)
        if unknown:
            raise TypeError(
                f"update_attempt cannot set {sorted(unknown)}; "
                f"it sets {sorted(UPDATABLE_ATTEMPT_FIELDS)}"
            )
        for name in ("task_id", "label"):
            if name in fields and fields[name] is None:
                raise LedgerError(f"attempt {attempt_id}: {name} may not be cleared once recorded")

        def store(session: Session) -> Attempt:
            row = _attempt_row(session, attempt_id)
            if row.result is not None:
                raise LedgerError(
                    f"attempt {attempt_id} is finished ({row.result}); its record is final"
                )
            for name, value in fields.items():
                setattr(row, UPDATABLE_ATTEMPT_FIELDS[name], _attempt_value(name, value))
            return Attempt.from_row(row)

        return self._write(store)

    def finish_attempt(
        self,
        attempt_id: int,
        result: AttemptResult | str,
        *,
        exit_code: int | None = None,
        ended_at: datetime | None = None,
    ) -> Attempt:
        """Record how an attempt ended. Host, group and task id stay as they were.

        Finishing again with the same result is a no-op (a retried task may repeat it);
        with a different result it is an error.
        """
        outcome = AttemptResult(result)

        def store(session: Session) -> Attempt:
            row = _attempt_row(session, attempt_id)
            if row.result is not None:
                if row.result == outcome:
                    return Attempt.from_row(row)
                raise LedgerError(
                    f"attempt {attempt_id} already ended as {row.result}, not {outcome}"
                )
            _finish(row, outcome, exit_code, self._now() if ended_at is None else as_utc(ended_at))
            return Attempt.from_row(row)

        return self._write(store)

    def live_attempt(self, case_id: int) -> Attempt | None:
        """The attempt of this case that has not ended, if any (there is at most one)."""
        with self._reading() as session:
            row = _live_attempt_row(session, case_id)
            return None if row is None else Attempt.from_row(row)

    def attempts(self, case_id: int) -> list[Attempt]:
        """All attempts of a case, first one first."""
        with self._reading() as session:
            _case_row(session, case_id)
            rows = session.scalars(
                select(AttemptRow).where(AttemptRow.case_id == case_id).order_by(AttemptRow.number)
            )
            return [Attempt.from_row(row) for row in rows]

    def attempt_by_label(self, label: str) -> Attempt | None:
        """The attempt whose task carries this label, if this ledger has one."""
        with self._reading() as session:
            row = session.scalar(select(AttemptRow).where(AttemptRow.pueue_label == label))
            return None if row is None else Attempt.from_row(row)

    def get_attempt(self, attempt_id: int) -> Attempt:
        with self._reading() as session:
            return Attempt.from_row(_attempt_row(session, attempt_id))

    # -- GPU groups -----------------------------------------------------------------

    def sync_gpu_groups(
        self, groups: Iterable[tuple[str, str, int, Sequence[str | int]]]
    ) -> list[GpuGroup]:
        """Make the table match the configured (host, group, slots, devices) list.

        Groups no longer configured stay in the table, marked inactive, because old
        attempts name them. Returns every group, active ones first.
        """
        wanted = {
            (host, group): (slots, [str(d) for d in devices])
            for host, group, slots, devices in groups
        }

        def store(session: Session) -> list[GpuGroup]:
            now = self._now()
            rows = {(r.host, r.pueue_group): r for r in session.scalars(select(GpuGroupRow))}
            for key, (slots, devices) in wanted.items():
                row = rows.get(key)
                if row is None:
                    row = GpuGroupRow(host=key[0], pueue_group=key[1], updated_at=now)
                    session.add(row)
                    rows[key] = row
                if (row.slots, row.devices, row.active) != (slots, devices, True):
                    row.slots, row.devices, row.active, row.updated_at = slots, devices, True, now
            for key, row in rows.items():
                if key not in wanted and row.active:
                    row.active, row.updated_at = False, now
            session.flush()
            return _sorted_groups(rows.values())

        return self._write(store)

    def gpu_groups(self, *, include_inactive: bool = False) -> list[GpuGroup]:
        with self._reading() as session:
            query = select(GpuGroupRow)
            if not include_inactive:
                query = query.where(GpuGroupRow.active.is_(True))
            return _sorted_groups(session.scalars(query))


def _retrying(transaction: Callable[[], T]) -> T:
    """Run a whole transaction; run it again, after a jittered pause, if it lost a lock race."""
    for attempt in range(1, _WRITE_ATTEMPTS + 1):
        try:
            return transaction()
        except DBAPIError as error:
            if attempt == _WRITE_ATTEMPTS or not is_retryable(error):
                raise
            time.sleep(0.05 * 2**attempt * (0.5 + secrets.randbelow(100) / 100))
    raise AssertionError("unreachable")


def _finish(row: AttemptRow, result: AttemptResult, exit_code: int | None, at: datetime) -> None:
    """An attempt ends: its result is final and it holds no GPU slot any more."""
    row.result = result
    row.exit_code = exit_code
    row.ended_at = at
    if row.holds_slot:
        row.holds_slot = False
        session = Session.object_session(row)
        session.info.setdefault(SLOTS_CHANGED, []).append((row.host, row.pueue_group))


def _gpu_group_row(session: Session, host: str, group: str) -> GpuGroupRow:
    """The group's row, locked; made on first use (a group may be configured after the ledger)."""
    query = select(GpuGroupRow).where(GpuGroupRow.host == host, GpuGroupRow.pueue_group == group)
    row = session.scalar(query.with_for_update())
    if row is None:
        session.add(GpuGroupRow(host=host, pueue_group=group, slots=0, devices=[], active=True,
                                updated_at=utc_now()))
        session.flush()  # two first admissions at once: the loser's unique-key error runs it again
        row = session.scalar(query.with_for_update())
    return row


def _attempt_value(name: str, value: object) -> object:
    if value is None:
        return None
    if name in ("submitted_at", "started_at"):
        return as_utc(value)  # type: ignore[arg-type]
    if name == "flow_run_id":
        return str(value)  # Prefect hands out UUID objects
    return value


def _sorted_groups(rows: Iterable[GpuGroupRow]) -> list[GpuGroup]:
    groups = [GpuGroup.from_row(row) for row in rows]
    return sorted(groups, key=lambda g: (not g.active, g.host, g.group))


def _case_row(session: Session, case_id: int, *, for_update: bool = False) -> CaseRow:
    row = session.get(CaseRow, case_id, with_for_update=for_update or None)
    if row is None:
        raise CaseNotFound(f"no case has the id {case_id}")
    return row


def _attempt_row(session: Session, attempt_id: int) -> AttemptRow:
    row = session.get(AttemptRow, attempt_id, with_for_update=True)
    if row is None:
        raise AttemptNotFound(f"no attempt has the id {attempt_id}")
    return row


def _attempt_row_of_case(session: Session, attempt_id: int, case_id: int) -> AttemptRow:
    row = _attempt_row(session, attempt_id)
    if row.case_id != case_id:
        raise LedgerError(f"attempt {attempt_id} belongs to case {row.case_id}, not case {case_id}")
    return row


def _live_attempt_row(session: Session, case_id: int) -> AttemptRow | None:
    return session.scalar(
        select(AttemptRow).where(AttemptRow.case_id == case_id, AttemptRow.result.is_(None))
    )


def _require_no_live_attempt(session: Session, case_id: int, purpose: str) -> None:
    live = _live_attempt_row(session, case_id)
    if live is not None:
        raise LedgerError(
            f"case {case_id} still has live attempt #{live.number} (id {live.id}) on "
            f"{live.host}/{live.pueue_group}; finish it with finish_attempt before {purpose}"
        )


def _failure_category_for(
    target: CaseState, category: FailureCategory | str | None
) -> FailureCategory | None:
    if category is not None:
        return FailureCategory(category)
    if target is CaseState.CANCELLED:
        return FailureCategory.CANCELLED
    if target is CaseState.FAILED:
        raise LedgerError("a case moved to failed needs a failure_category")
    return None


def _event_message(message: str, category: FailureCategory | str | None, detail: str | None) -> str:
    failure = ": ".join(str(part) for part in (category, detail) if part)
    return " | ".join(part for part in (message, failure) if part)


def _event(
    case_id: int,
    at: datetime,
    from_state: CaseState | None,
    to_state: CaseState,
    actor: str,
    message: str,
    attempt_id: int | None = None,
) -> EventRow:
    return EventRow(
        case_id=case_id,
        at=at,
        from_state=from_state,
        to_state=to_state,
        attempt_id=attempt_id,
        actor=actor,
        message=message,
    )
