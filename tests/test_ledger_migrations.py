"""Ledger migrations: an old database is upgraded with its data intact, and the models
match what the migrations build (on SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Integer, String, Text, column, inspect, table, text

from mqi.ledger import AttemptResult, CaseState, Ledger, LedgerError
from mqi.ledger.migrations import HEAD_REVISION, SCRIPT_LOCATION
from mqi.ledger.models import Base, FolderPath, UTCDateTime

CREATED = datetime(2024, 12, 31, 23, 0, tzinfo=UTC)

# The tables as revision 0001 knew them, so that old data can be written without the models.
cases_v1 = table(
    "cases",
    column("uid", String),
    column("source", FolderPath()),
    column("name", Text),
    column("state", String),
    column("progress", Integer),
    column("created_at", UTCDateTime()),
    column("updated_at", UTCDateTime()),
)
attempts_v1 = table(
    "attempts",
    *(column(name, Integer) for name in ("case_id", "number", "pueue_task_id", "exit_code")),
    *(
        column(name, String)
        for name in ("host", "pueue_group", "pueue_label", "remote_dir", "result")
    ),
    column("submitted_at", UTCDateTime()),
    column("ended_at", UTCDateTime()),
)
events_v1 = table(
    "case_events",
    *(column(name, Integer) for name in ("case_id", "attempt_id")),
    *(column(name, String) for name in ("from_state", "to_state", "actor", "message")),
    column("at", UTCDateTime()),
)


def write_version_1_data(ledger: Ledger) -> None:
    """One finished case; ids are left to the database (1 for each first row), as in real use."""
    with ledger.engine.begin() as connection:
        connection.execute(
            cases_v1.insert(),
            [
                dict(
                    uid="aaaaaaaaaaaa",
                    source="/inbox/old_case",
                    name="old_case",
                    state="completed",
                    progress=100,
                    created_at=CREATED,
                    updated_at=CREATED,
                ),
            ],
        )
        connection.execute(
            attempts_v1.insert(),
            [
                dict(
                    case_id=1,
                    number=1,
                    host="gpu1",
                    pueue_group="g0",
                    pueue_task_id=41,
                    pueue_label="mqi-aaaaaaaaaaaa-1",
                    remote_dir="/scratch/a",
                    result="success",
                    exit_code=0,
                    submitted_at=CREATED,
                    ended_at=CREATED,
                ),
            ],
        )
        connection.execute(
            events_v1.insert(),
            [
                dict(
                    case_id=1,
                    attempt_id=None,
                    from_state=None,
                    to_state="pending",
                    actor="scan",
                    message="registered",
                    at=CREATED,
                ),
                dict(
                    case_id=1,
                    attempt_id=1,
                    from_state="downloading",
                    to_state="completed",
                    actor="flow",
                    message="",
                    at=CREATED,
                ),
            ],
        )


def test_an_old_database_is_upgraded_with_its_data_intact(ledger_url):
    with Ledger.open(ledger_url, migrate=False) as old:
        assert old.upgrade("0001") == "0001"
        write_version_1_data(old)
        assert "pinned_host" not in {c["name"] for c in inspect(old.engine).get_columns("cases")}

    with Ledger.open(ledger_url) as upgraded:
        assert upgraded.schema_revision() == HEAD_REVISION == "0003"
        case = upgraded.find_case("aaaaaaaaaaaa")
        assert (case.id, case.source, case.state, case.created_at) == (
            1,
            "/inbox/old_case",
            CaseState.COMPLETED,
            CREATED,
        )
        assert (case.pinned_host, case.pinned_group) == (None, None)
        [attempt] = upgraded.attempts(1)
        assert (attempt.host, attempt.group, attempt.task_id, attempt.result) == (
            "gpu1",
            "g0",
            41,
            AttemptResult.SUCCESS,
        )
        assert [(e.from_state, e.to_state) for e in upgraded.events(1)] == [
            (None, "pending"),
            ("downloading", "completed"),
        ]
        assert upgraded.pin_case(1, "gpu2", "g1").pinned_host == "gpu2"
        # New rows continue after the old ones.
        new_case, _ = upgraded.register_case("/inbox/new_case")
        assert new_case.id == 2
        indexes = {ix["name"] for ix in inspect(upgraded.engine).get_indexes("cases")}
        assert "ix_cases_state" in indexes
        assert not attempt.holds_slot and case.cancel_requested_at is None  # a finished attempt holds no GPU


def test_attempts_live_at_the_upgrade_keep_their_gpu_slot(ledger_url):
    """Installed while a case ran: its task may be on a GPU, so its attempt holds the slot."""
    with Ledger.open(ledger_url, migrate=False) as old:
        assert old.upgrade("0002") == "0002"
        write_version_1_data(old)
        with old.engine.begin() as connection:
            connection.execute(text("UPDATE attempts SET result = NULL, ended_at = NULL"))
    with Ledger.open(ledger_url) as upgraded:
        assert upgraded.slot_holders() == {("gpu1", "g0"): 1}


def test_the_models_match_the_migrated_schema(ledger):
    with ledger.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_opening_twice_does_not_migrate_again(ledger_url):
    with Ledger.open(ledger_url) as first:
        first.register_case("/inbox/a")
    with Ledger.open(ledger_url) as second:
        assert second.schema_revision() == HEAD_REVISION
        assert [c.source for c in second.list_cases()] == ["/inbox/a"]


def test_the_declared_head_is_the_newest_migration():
    assert ScriptDirectory(str(SCRIPT_LOCATION)).get_current_head() == HEAD_REVISION


def test_a_ledger_from_a_newer_mqi_is_refused_clearly(ledger_url):
    with Ledger.open(ledger_url) as ledger, ledger.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(LedgerError, match="from revision 0099 to head.*older than the one"):
        Ledger.open(ledger_url)
