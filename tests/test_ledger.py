"""The case ledger on SQLite and PostgreSQL: cases, attempts, events, GPU groups."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from mqi.errors import MqiError
from mqi.ledger import (
    AttemptResult,
    CaseNotFound,
    CaseState,
    FailureCategory,
    IllegalTransition,
    Ledger,
    LedgerError,
)

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


class FakeClock:
    """Advances one second on every reading, so every recorded time is distinct and known."""

    def __init__(self, start: datetime = T0):
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked(ledger_url, clock):
    with Ledger.open(ledger_url, clock=clock) as opened:
        yield opened


def run_to_completion(ledger: Ledger, case_id: int, *, host: str, group: str, task_id: int):
    """Take a pending case through one successful attempt, as the orchestrator would."""
    attempt = ledger.start_attempt(
        case_id, host=host, group=group, label=f"mqi-{case_id}", remote_dir=f"/scratch/{case_id}"
    )
    ledger.transition(case_id, CaseState.UPLOADING, actor="flow", attempt_id=attempt.id)
    ledger.update_attempt(attempt.id, task_id=task_id)
    ledger.transition(case_id, CaseState.QUEUED, actor="flow", attempt_id=attempt.id)
    ledger.transition(case_id, CaseState.RUNNING, actor="flow", attempt_id=attempt.id)
    ledger.finish_attempt(attempt.id, AttemptResult.SUCCESS, exit_code=0)
    ledger.transition(case_id, CaseState.DOWNLOADING, actor="flow", attempt_id=attempt.id)
    ledger.transition(case_id, CaseState.COMPLETED, actor="flow", attempt_id=attempt.id)
    return attempt


# -- registering and finding cases ---------------------------------------------------


def test_sources_are_the_folders_of_every_case_whatever_its_state(ledger, tmp_path):
    first, _ = ledger.register_case(tmp_path / "inbox" / "a")
    second, _ = ledger.register_case(tmp_path / "inbox" / "b")
    ledger.transition(second.id, CaseState.CANCELLED, actor="cli")

    assert ledger.sources() == {str(tmp_path / "inbox" / "a"), str(tmp_path / "inbox" / "b")}


def test_register_creates_a_pending_case_once(clocked, tmp_path):
    folder = tmp_path / "inbox" / "patient_001"

    case, created = clocked.register_case(folder, actor="scan")
    again, created_again = clocked.register_case(folder, actor="scan")

    assert created and not created_again
    assert again.id == case.id and again.uid == case.uid
    assert re.fullmatch(r"[a-z2-7]{12}", case.uid)
    assert case.source == str(folder) and case.name == "patient_001"
    assert case.state is CaseState.PENDING and case.progress == 0
    assert case.created_at == case.updated_at == T0 + timedelta(seconds=1)
    [event] = clocked.events(case.id)
    assert (event.from_state, event.to_state, event.actor) == (None, CaseState.PENDING, "scan")


def test_a_relative_folder_is_stored_absolute(ledger, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    case, _ = ledger.register_case(Path("inbox/../inbox/case_a"))
    assert case.source == str(tmp_path / "inbox" / "case_a")
    assert ledger.register_case(tmp_path / "inbox" / "case_a")[0].id == case.id


def test_folder_names_with_any_bytes_round_trip(ledger, tmp_path):
    base = os.fsencode(tmp_path)
    undecodable = base + b"/case\xff\xfe"
    backslash_lookalike = base + b"/case\\xff\\xfe"  # the text a naive escaping would produce

    odd, _ = ledger.register_case(undecodable)
    lookalike, _ = ledger.register_case(backslash_lookalike)

    assert odd.id != lookalike.id
    assert os.fsencode(ledger.get_case(odd.id).source) == undecodable
    assert os.fsencode(ledger.get_case(lookalike.id).source) == backslash_lookalike
    assert ledger.find_case(os.fsdecode(undecodable)).id == odd.id
    assert odd.name == "case\ufffd\ufffd"  # shown with replacement characters
    assert ledger.register_case(Path(os.fsdecode(undecodable)))[1] is False


def test_find_case_by_id_uid_or_folder(ledger, tmp_path):
    case, _ = ledger.register_case(tmp_path / "c1")
    ledger.register_case(tmp_path / "c2")

    assert ledger.find_case(str(case.id)).id == case.id
    assert ledger.find_case(case.id).id == case.id
    assert ledger.find_case(case.uid).id == case.id
    assert ledger.find_case(str(tmp_path / "c1")).id == case.id


def test_an_unknown_case_is_a_clear_error(ledger, tmp_path):
    ledger.register_case(tmp_path / "c1")
    with pytest.raises(CaseNotFound, match="no case has the id, uid or folder '999'") as caught:
        ledger.find_case("999")
    assert isinstance(caught.value, MqiError)
    with pytest.raises(CaseNotFound):
        ledger.find_case("abcdefghijkl")
    with pytest.raises(CaseNotFound):
        ledger.transition(999, CaseState.UPLOADING, actor="t")


def test_list_and_filter_cases_by_state(ledger, tmp_path):
    first, _ = ledger.register_case(tmp_path / "a")
    second, _ = ledger.register_case(tmp_path / "b")
    ledger.transition(second.id, CaseState.CANCELLED, actor="operator")

    assert [c.id for c in ledger.list_cases()] == [first.id, second.id]
    assert [c.id for c in ledger.list_cases("cancelled")] == [second.id]
    assert [c.id for c in ledger.cases_in_states([CaseState.PENDING, CaseState.RUNNING])] == [
        first.id
    ]


# -- state changes and their events --------------------------------------------------


def test_a_successful_case_leaves_a_complete_trail(clocked, tmp_path):
    case, _ = clocked.register_case(tmp_path / "c")
    attempt = run_to_completion(clocked, case.id, host="gpu1", group="g0", task_id=17)

    done = clocked.get_case(case.id)
    assert done.state is CaseState.COMPLETED and done.progress == 100
    trail = [(e.from_state, e.to_state, e.attempt_id) for e in clocked.events(case.id)]
    assert trail == [
        (None, "pending", None),
        ("pending", "uploading", attempt.id),
        ("uploading", "queued", attempt.id),
        ("queued", "running", attempt.id),
        ("running", "downloading", attempt.id),
        ("downloading", "completed", attempt.id),
    ]
    times = [e.at for e in clocked.events(case.id)]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)


def test_an_illegal_transition_raises_and_changes_nothing(clocked, tmp_path):
    case, _ = clocked.register_case(tmp_path / "c")
    with pytest.raises(IllegalTransition, match="cannot move from pending to completed") as caught:
        clocked.transition(case.id, CaseState.COMPLETED, actor="flow")
    assert isinstance(caught.value, MqiError)
    assert "allowed from pending: cancelled, failed, uploading" in str(caught.value)
    assert clocked.get_case(case.id) == case
    assert len(clocked.events(case.id)) == 1


def test_the_event_is_written_in_the_same_transaction_as_the_change(ledger, tmp_path):
    case, _ = ledger.register_case(tmp_path / "c")
    # An event the database refuses (actor is NOT NULL) must take the state change with it.
    with pytest.raises(IntegrityError):
        ledger.transition(case.id, CaseState.UPLOADING, actor=None)  # type: ignore[arg-type]
    assert ledger.get_case(case.id).state is CaseState.PENDING
    assert len(ledger.events(case.id)) == 1


def test_failure_needs_a_category_and_is_recorded(ledger, tmp_path):
    case, _ = ledger.register_case(tmp_path / "c")
    with pytest.raises(LedgerError, match="needs a failure_category"):
        ledger.transition(case.id, CaseState.FAILED, actor="flow")

    failed = ledger.transition(
        case.id,
        CaseState.FAILED,
        actor="flow",
        message="validation",
        failure_category=FailureCategory.INPUT,
        failure_message="no RTPLAN file",
    )

    assert failed.failure_category is FailureCategory.INPUT
    assert failed.failure_message == "no RTPLAN file"
    assert ledger.events(case.id)[-1].message == "validation | input: no RTPLAN file"


def test_cancel_implies_its_category_and_retry_clears_the_failure(ledger, tmp_path):
    case, _ = ledger.register_case(tmp_path / "c")
    cancelled = ledger.transition(case.id, CaseState.CANCELLED, actor="operator")
    assert cancelled.failure_category is FailureCategory.CANCELLED

    retried = ledger.transition(case.id, CaseState.PENDING, actor="operator", message="retry")
    assert retried.state is CaseState.PENDING
    assert retried.failure_category is None and retried.failure_message is None


def test_a_case_with_a_live_attempt_cannot_come_to_rest(ledger, tmp_path):
    case, _ = ledger.register_case(tmp_path / "c")
    attempt = ledger.start_attempt(case.id, host="h", group="g", label="l", remote_dir="/r")
    ledger.transition(case.id, CaseState.UPLOADING, actor="flow", attempt_id=attempt.id)

    with pytest.raises(LedgerError, match="still has live attempt #1"):
        ledger.transition(
            case.id, CaseState.FAILED, actor="flow", failure_category=FailureCategory.TRANSIENT
        )
    assert ledger.get_case(case.id).state is CaseState.UPLOADING

    ledger.finish_attempt(attempt.id, AttemptResult.FAILED)
    failed = ledger.transition(
        case.id, CaseState.FAILED, actor="flow", failure_category=FailureCategory.TRANSIENT
    )
    assert failed.state is CaseState.FAILED


def test_an_attempt_of_another_case_is_refused(ledger, tmp_path):
    first, _ = ledger.register_case(tmp_path / "a")
    second, _ = ledger.register_case(tmp_path / "b")
    other = ledger.start_attempt(second.id, host="h", group="g", label="l", remote_dir="/r")
    with pytest.raises(LedgerError, match=f"belongs to case {second.id}"):
        ledger.transition(first.id, CaseState.UPLOADING, actor="flow", attempt_id=other.id)
    assert ledger.get_case(first.id).state is CaseState.PENDING


def test_progress_is_bounded_and_reset_on_retry(ledger, tmp_path):
    case, _ = ledger.register_case(tmp_path / "c")
    assert ledger.set_progress(case.id, 42).progress == 42
    with pytest.raises(ValueError, match="between 0 and 100"):
        ledger.set_progress(case.id, 101)
    ledger.transition(case.id, CaseState.CANCELLED, actor="op")
    assert ledger.transition(case.id, CaseState.PENDING, actor="op").progress == 0


# -- attempts --------------------------------------------------------------------------


def test_a_finished_case_keeps_host_group_and_task_also_after_a_retry(ledger, tmp_path):
    case, _ = ledger.register_case(tmp_path / "c")
    first = run_to_completion(ledger, case.id, host="gpu1", group="g0", task_id=17)

    [done] = ledger.attempts(case.id)
    assert (done.host, done.group, done.task_id, done.result) == ("gpu1", "g0", 17, "success")
    assert done.label == first.label and done.exit_code == 0 and done.ended_at is not None

    ledger.transition(case.id, CaseState.PENDING, actor="operator", message="retry")
    run_to_completion(ledger, case.id, host="gpu2", group="g1", task_id=3)

    old, new = ledger.attempts(case.id)
    assert (old.number, old.host, old.group, old.task_id) == (1, "gpu1", "g0", 17)
    assert old == done
    assert (new.number, new.host, new.group, new.task_id) == (2, "gpu2", "g1", 3)
    [overview] = ledger.overview()
    assert (overview.host, overview.group, overview.task_id) == ("gpu2", "g1", 3)


def test_one_live_attempt_at_a_time(ledger, tmp_path):
    case, _ = ledger.register_case(tmp_path / "c")
    first = ledger.start_attempt(case.id, host="h", group="g", label="l1", remote_dir="/r")
    assert ledger.live_attempt(case.id) == first
    with pytest.raises(LedgerError, match="still has live attempt"):
        ledger.start_attempt(case.id, host="h", group="g", label="l2", remote_dir="/r")

    ledger.finish_attempt(first.id, AttemptResult.LOST)
    assert ledger.live_attempt(case.id) is None
    second = ledger.start_attempt(case.id, host="h", group="g", label="l2", remote_dir="/r")
    assert (first.number, second.number) == (1, 2)


def test_update_attempt_fills_in_but_never_erases(clocked, tmp_path, clock):
    case, _ = clocked.register_case(tmp_path / "c")
    attempt = clocked.start_attempt(
        case.id, host="h", group="g", label="l", remote_dir="/r", flow_run_id="run-1"
    )
    started = datetime(2025, 3, 1, 18, 30, tzinfo=timezone(timedelta(hours=9)))

    updated = clocked.update_attempt(attempt.id, task_id=5, started_at=started)
    assert updated.task_id == 5 and updated.started_at == started
    assert updated.started_at.tzinfo == UTC and updated.submitted_at == T0 + timedelta(seconds=2)

    with pytest.raises(LedgerError, match="task_id may not be cleared"):
        clocked.update_attempt(attempt.id, task_id=None)
    with pytest.raises(TypeError, match=r"cannot set \['host'\]"):
        clocked.update_attempt(attempt.id, host="elsewhere")

    clocked.finish_attempt(attempt.id, "killed", exit_code=137)
    with pytest.raises(LedgerError, match="is finished"):
        clocked.update_attempt(attempt.id, remote_dir="/other")
    assert clocked.get_attempt(attempt.id).task_id == 5


def test_finishing_twice_is_idempotent_but_not_contradictory(ledger, tmp_path):
    case, _ = ledger.register_case(tmp_path / "c")
    attempt = ledger.start_attempt(case.id, host="h", group="g", label="l", remote_dir="/r")
    ended = datetime(2025, 3, 2, tzinfo=UTC)
    first = ledger.finish_attempt(attempt.id, AttemptResult.TIMEOUT, ended_at=ended)

    assert ledger.finish_attempt(attempt.id, AttemptResult.TIMEOUT) == first
    assert first.ended_at == ended
    with pytest.raises(LedgerError, match="already ended as timeout"):
        ledger.finish_attempt(attempt.id, AttemptResult.SUCCESS)


def test_naive_times_are_refused(ledger, tmp_path):
    case, _ = ledger.register_case(tmp_path / "c")
    attempt = ledger.start_attempt(case.id, host="h", group="g", label="l", remote_dir="/r")
    with pytest.raises(ValueError, match="naive datetime"):
        ledger.finish_attempt(attempt.id, "failed", ended_at=datetime(2025, 1, 1))
    assert ledger.live_attempt(case.id) is not None


def test_overview_joins_each_case_to_its_latest_attempt(ledger, tmp_path):
    idle, _ = ledger.register_case(tmp_path / "idle")
    busy, _ = ledger.register_case(tmp_path / "busy")
    for number in range(3):
        attempt = ledger.start_attempt(
            busy.id, host=f"h{number}", group="g", label="l", remote_dir="/r"
        )
        ledger.finish_attempt(attempt.id, AttemptResult.LOST)

    by_case = {o.id: o for o in ledger.overview()}
    assert (by_case[idle.id].host, by_case[idle.id].group, by_case[idle.id].task_id) == (None, None, None)
    assert by_case[busy.id].host == "h2"  # the third attempt's
    assert by_case[busy.id][:5] == (busy.id, busy.uid, busy.name, CaseState.PENDING, 0)
    assert [o.id for o in ledger.overview(CaseState.PENDING)] == [idle.id, busy.id]


# -- GPU groups ----------------------------------------------------------------------


def test_sync_gpu_groups_upserts_and_marks_removed_ones(ledger):
    ledger.sync_gpu_groups([("gpu1", "g0", 1, [0]), ("gpu1", "g1", 2, ["1", "2"])])
    synced = ledger.sync_gpu_groups([("gpu1", "g1", 3, [1, 2, 3]), ("gpu2", "g0", 1, ["0"])])

    summary = [(g.host, g.group, g.slots, g.devices, g.active) for g in synced]
    assert summary == [
        ("gpu1", "g1", 3, ("1", "2", "3"), True),
        ("gpu2", "g0", 1, ("0",), True),
        ("gpu1", "g0", 1, ("0",), False),
    ]
    assert [(g.host, g.group) for g in ledger.gpu_groups()] == [("gpu1", "g1"), ("gpu2", "g0")]
    assert len(ledger.gpu_groups(include_inactive=True)) == 3

    ledger.sync_gpu_groups([("gpu1", "g0", 1, [0])])
    assert [(g.host, g.group) for g in ledger.gpu_groups()] == [("gpu1", "g0")]


# -- opening ---------------------------------------------------------------------------


def test_plain_postgresql_urls_use_psycopg_3():
    from mqi.ledger.engine import parse_url

    assert parse_url("postgresql://u:pw@db/mqi").drivername == "postgresql+psycopg"
    assert parse_url("postgres://u@db/mqi").drivername == "postgresql+psycopg"
    with pytest.raises(LedgerError, match="supports SQLite and PostgreSQL, not 'mysql'"):
        parse_url("mysql://u:secret@db/x")
    with pytest.raises(LedgerError, match="not a database URL"):
        parse_url("not a url")
    with pytest.raises(LedgerError, match="in-memory SQLite ledger would lose every case"):
        Ledger.open("sqlite://")


def test_an_unreachable_server_is_named_without_its_password():
    with pytest.raises(LedgerError, match="cannot open the case ledger") as caught:
        Ledger.open("postgresql://mqi:hunter2@127.0.0.1:1/mqi?connect_timeout=2")
    assert "hunter2" not in str(caught.value) and "127.0.0.1" in str(caught.value)
    assert "***" in str(caught.value)


def test_sqlite_is_set_up_for_many_writers(tmp_path):
    url = f"sqlite:///{tmp_path}/sub/dir/ledger.db"  # missing folders are created
    with Ledger.open(url) as opened, opened.engine.connect() as connection:

        def pragma(name: str):
            return connection.execute(text(f"PRAGMA {name}")).scalar()

        assert pragma("journal_mode") == "wal"
        assert pragma("foreign_keys") == 1
        assert pragma("busy_timeout") >= 10_000
