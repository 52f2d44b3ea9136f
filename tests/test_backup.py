"""`mqi db backup`: consistent copies of live SQLite ledgers, pg_dump archives of PostgreSQL ones."""

from __future__ import annotations

import multiprocessing
import os
import secrets
import shutil
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import make_url, text
from typer.testing import CliRunner

from mqi.backup import BackupError, backup_ledger, pg_dump_command
import mqi.cli.ops  # noqa: F401  (registers `mqi db backup`)
from mqi.cli import app
from mqi.ledger import CaseState, Ledger
from tests.support.databases import postgres_server_url, sqlite_url

SPAWN = multiprocessing.get_context("spawn")
WRITERS = 4
CANARY_PASSWORD = "canary-Pw-" + secrets.token_hex(4)


def _write_cases(url: str, worker: int, stop) -> None:
    """Register cases and move every other one on, each write its own transaction, until stopped."""
    with Ledger.open(url) as ledger:
        number = 0
        while not stop.is_set():
            case, _ = ledger.register_case(f"/inbox/worker{worker}-case{number}", actor=f"w{worker}")
            if number % 2:
                ledger.transition(case.id, CaseState.CANCELLED, actor=f"w{worker}", message="test")
            number += 1


def _case_count(database: Path) -> int:
    # A generous wait: four writers keep the database busy on a loaded machine.
    with sqlite3.connect(database, timeout=60) as connection:
        return connection.execute("SELECT count(*) FROM cases").fetchone()[0]


def _assert_consistent_ledger(copy: Path) -> int:
    """Every case's state is the target of its latest event; the copy opens as a ledger."""
    with sqlite3.connect(copy) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        mismatched = connection.execute(
            """SELECT count(*) FROM cases c WHERE c.state IS NOT (
                   SELECT e.to_state FROM case_events e WHERE e.case_id = c.id
                   ORDER BY e.id DESC LIMIT 1)"""
        ).fetchone()[0]
        assert mismatched == 0
    with Ledger.open(f"sqlite:///{copy}", migrate=False) as ledger:
        return len(ledger.list_cases())


@pytest.fixture
def sqlite_ledger(tmp_path) -> str:
    url = sqlite_url(tmp_path)
    with Ledger.open(url) as ledger:
        ledger.register_case(tmp_path / "inbox" / "first")
    return url


def test_backup_while_four_processes_write_is_consistent(tmp_path):
    url = sqlite_url(tmp_path)
    database = Path(make_url(url).database)
    Ledger.open(url).close()
    stop = SPAWN.Event()
    writers = [SPAWN.Process(target=_write_cases, args=(url, n, stop)) for n in range(WRITERS)]
    for writer in writers:
        writer.start()
    try:
        deadline = time.monotonic() + 60
        while _case_count(database) < 40:
            assert time.monotonic() < deadline, "the writers did not get going"
            time.sleep(0.1)
        reports = []
        for number in range(3):
            # Each backup after the first waits for the writers to have moved on since the last.
            while reports and _case_count(database) <= reports[-1][1].cases:
                assert time.monotonic() < deadline + 60, "the writers stopped writing"
                time.sleep(0.1)
            before = _case_count(database)
            reports.append((before, backup_ledger(url, tmp_path / f"copy{number}.db")))
            assert all(writer.is_alive() for writer in writers)
    finally:
        stop.set()
        for writer in writers:
            writer.join(30)
    assert [writer.exitcode for writer in writers] == [0] * WRITERS
    final = _case_count(database)
    for before, report in reports:
        assert before <= report.cases <= final
        assert _assert_consistent_ledger(report.path) == report.cases
        assert stat.S_IMODE(report.path.stat().st_mode) == 0o600
    assert reports[-1][1].cases > reports[0][0], "the writers were not writing during the backups"
    assert not list(tmp_path.glob(".*partial")), "a temporary file was left behind"


def test_backup_is_a_single_self_contained_file(sqlite_ledger, tmp_path):
    report = backup_ledger(sqlite_ledger, tmp_path / "copy.db")
    moved = tmp_path / "elsewhere" / "moved.db"
    moved.parent.mkdir()
    shutil.move(report.path, moved)
    assert not (tmp_path / "copy.db-wal").exists()
    assert _assert_consistent_ledger(moved) == 1
    with Ledger.open(sqlite_ledger) as ledger:
        assert report.revision == ledger.schema_revision()


def test_existing_file_is_kept_unless_forced(sqlite_ledger, tmp_path):
    target = tmp_path / "copy.db"
    target.write_text("an older backup")
    with pytest.raises(BackupError, match="already exists.*--force"):
        backup_ledger(sqlite_ledger, target)
    assert target.read_text() == "an older backup"
    assert backup_ledger(sqlite_ledger, target, force=True).cases == 1
    assert _assert_consistent_ledger(target) == 1


def _other_database(folder: Path) -> None:
    with sqlite3.connect(folder / "ledger.db") as connection:
        connection.execute("CREATE TABLE notes (text)")


@pytest.mark.parametrize(
    ("make_source", "message"),
    [(lambda folder: None, "cannot open the ledger database"), (_other_database, "not an mqi ledger")],
    ids=["missing", "not-a-ledger"],
)
def test_refuses_what_is_not_a_ledger(tmp_path, make_source, message):
    make_source(tmp_path)
    with pytest.raises(BackupError, match=message):
        backup_ledger(sqlite_url(tmp_path), tmp_path / "copy.db")
    assert not (tmp_path / "copy.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["ledger.db"])


def test_refuses_to_overwrite_the_ledger_itself(sqlite_ledger):
    with pytest.raises(BackupError, match="cannot replace the ledger itself"):
        backup_ledger(sqlite_ledger, Path(make_url(sqlite_ledger).database), force=True)


def test_cli_backup_prints_revision_and_cases(sqlite_ledger, tmp_path, monkeypatch):
    monkeypatch.setenv("MQI_LEDGER__URL", sqlite_ledger)
    monkeypatch.delenv("MQI_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["db", "backup", str(tmp_path / "copy.db")])
    assert result.exit_code == 0, result.output
    assert "schema revision" in result.output and "cases: 1," in result.output
    again = CliRunner().invoke(app, ["db", "backup", str(tmp_path / "copy.db")])
    assert again.exit_code == 1
    assert "already exists" in again.output + str(again.exception)


# -- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def postgres_database(postgres_admin):
    """A database of its own (pg_dump dumps whole databases); yields a URL factory."""
    name = f"mqi_backup_{secrets.token_hex(5)}"
    autocommit = postgres_admin.execution_options(isolation_level="AUTOCOMMIT")
    created = []

    def create(suffix: str = "") -> str:
        database = name + suffix
        with autocommit.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{database}"'))
        created.append(database)
        # Trust authentication ignores the password: it stands for a real one in these tests.
        url = make_url(postgres_server_url()).set(database=database, password=CANARY_PASSWORD)
        return url.render_as_string(hide_password=False)

    yield create
    with autocommit.connect() as connection:
        for database in created:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


@pytest.fixture
def pg_dump_recorder(tmp_path, monkeypatch) -> Path:
    """pg_dump on PATH runs the real one after writing down its arguments and PGPASSWORD."""
    real = shutil.which("pg_dump")
    assert real, "pg_dump is needed (apt install postgresql-client)"
    folder = tmp_path / "bin"
    folder.mkdir()
    record = tmp_path / "pg_dump-call.txt"
    wrapper = folder / "pg_dump"
    wrapper.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\necho "PGPASSWORD=$PGPASSWORD" >> {record}\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return record


def test_postgres_backup_is_restorable(postgres_database, pg_dump_recorder, tmp_path):
    url = postgres_database()
    with Ledger.open(url) as ledger:
        for number in range(5):
            ledger.register_case(f"/inbox/case{number}")
    report = backup_ledger(url, tmp_path / "ledger.dump")
    with Ledger.open(url) as ledger:
        assert (report.cases, report.revision) == (5, ledger.schema_revision())
    assert stat.S_IMODE(report.path.stat().st_mode) == 0o600

    call = pg_dump_recorder.read_text()
    arguments = call.rsplit("PGPASSWORD=", 1)[0]
    assert CANARY_PASSWORD not in arguments
    assert f"PGPASSWORD={CANARY_PASSWORD}" in call

    listing = subprocess.run(["pg_restore", "--list", str(report.path)], capture_output=True, text=True)
    assert listing.returncode == 0 and "TABLE DATA public cases" in listing.stdout
    restored_url = postgres_database("_restored")
    target = pg_dump_command(make_url(restored_url), report.path)[-1]  # --dbname=, no password
    restore = subprocess.run(
        ["pg_restore", "--no-owner", target, str(report.path)],
        capture_output=True,
        text=True,
    )
    assert restore.returncode == 0, restore.stderr
    with Ledger.open(restored_url, migrate=False) as restored:
        assert sorted(c.source for c in restored.list_cases()) == [f"/inbox/case{n}" for n in range(5)]


def test_postgres_backup_without_pg_dump_names_the_command(postgres_database, tmp_path, monkeypatch):
    url = postgres_database()
    Ledger.open(url).close()
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_dump here
    with pytest.raises(BackupError) as raised:
        backup_ledger(url, tmp_path / "ledger.dump")
    message = str(raised.value)
    assert "apt install postgresql-client" in message
    assert "pg_dump --format=custom" in message and "ledger.dump" in message
    assert CANARY_PASSWORD not in message


def test_postgres_backup_of_an_unreachable_server_hides_the_password(tmp_path):
    url = f"postgresql://mqi:{CANARY_PASSWORD}@127.0.0.1:1/ledger"
    with pytest.raises(BackupError) as raised:
        backup_ledger(url, tmp_path / "ledger.dump")
    assert "cannot read the ledger" in str(raised.value)
    assert CANARY_PASSWORD not in str(raised.value)
    assert not list(tmp_path.iterdir())
