"""Backups of a live case ledger that never stop `mqi run`.

SQLite: SQLite's online backup API copies a consistent snapshot while writers go on (in WAL
mode they are not even blocked). The copy is written to a hidden temporary file beside the
destination, checked (`PRAGMA integrity_check`, same schema revision as the ledger), and only
then renamed into place: a backup file that exists is always whole.

PostgreSQL: `pg_dump --format=custom`, restorable with `pg_restore`. The dump reads an
exported snapshot, so the revision and case count reported are exactly those in the dump.
The password goes to pg_dump in its environment (PGPASSWORD), never on its command line.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlparse
from urllib.request import pathname2url

from sqlalchemy import URL, Connection, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from mqi.errors import MqiError
from mqi.ledger.engine import SQLITE_BUSY_TIMEOUT_MS, parse_url, safe_url

BACKUP_MODE = 0o600  # the ledger names patients' case folders
REVISION_QUERY = "SELECT version_num FROM alembic_version"
CASES_QUERY = "SELECT count(*) FROM cases"


class BackupError(MqiError):
    """A backup could not be made, or the copy failed its check."""


@dataclass(frozen=True)
class BackupReport:
    path: Path
    revision: str
    cases: int
    size_bytes: int


def backup_ledger(url: str, destination: Path, *, force: bool = False) -> BackupReport:
    """Copy the live ledger at `url` to `destination` (a file, mode 0600), then check the copy.

    Refuses to replace an existing `destination` unless `force`.
    """
    parsed = parse_url(url)
    destination = Path(os.path.abspath(destination))
    _check_destination(destination, force)
    if parsed.get_backend_name() == "sqlite":
        return _backup_sqlite(sqlite_file(parsed), destination)
    return _backup_postgres(parsed, destination)


def sqlite_file(url: URL) -> Path:
    """The absolute path of a SQLite ledger's database file (plain path or file: URI)."""
    database = url.database or ""
    if database.startswith("file:"):
        database = unquote(urlparse(database).path)
    return Path(os.path.abspath(database))


def _check_destination(destination: Path, force: bool) -> None:
    if destination.is_dir():
        raise BackupError(f"{destination} is a folder; give the backup file's name")
    if destination.exists() and not force:
        raise BackupError(f"{destination} already exists; choose a new name or add --force to replace it")
    if not destination.parent.is_dir():
        raise BackupError(f"the folder {destination.parent} does not exist")


@contextmanager
def _staged(destination: Path) -> Iterator[Path]:
    """A new empty file (mode 0600) beside `destination`, renamed onto it if the block succeeds."""
    handle, staging = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent
    )
    os.fchmod(handle, BACKUP_MODE)  # mkstemp's default too; said here because it matters
    os.close(handle)
    staging_path = Path(staging)
    try:
        yield staging_path
        _fsync(staging_path)
        os.replace(staging_path, destination)
        _fsync(destination.parent)  # the rename itself survives a power cut
    finally:
        staging_path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# -- SQLite ------------------------------------------------------------------------------


def _backup_sqlite(source_path: Path, destination: Path) -> BackupReport:
    if source_path == destination:
        raise BackupError("the backup cannot replace the ledger itself; give another file name")
    with _sqlite_source(source_path) as source, _staged(destination) as staging:
        expected_revision = _ledger_revision(source, source_path)
        copy = sqlite3.connect(staging)
        try:
            source.backup(copy)  # all pages in one step: one consistent snapshot
            # A single self-contained file: no -wal or -shm needed to read the backup.
            copy.execute("PRAGMA journal_mode = DELETE")
            revision, cases = _verify_sqlite_copy(copy, expected_revision)
        finally:
            copy.close()
    return BackupReport(destination, revision, cases, destination.stat().st_size)


@contextmanager
def _sqlite_source(path: Path) -> Iterator[sqlite3.Connection]:
    # mode=rw: a mistyped path must fail, not create an empty database.
    uri = f"file:{pathname2url(str(path))}?mode=rw"
    try:
        connection = sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
    except sqlite3.OperationalError as error:
        raise BackupError(f"cannot open the ledger database {path}: {error}") from None
    try:
        yield connection
    except sqlite3.DatabaseError as error:
        raise BackupError(f"backup of {path} failed: {error}") from None
    finally:
        connection.close()


def _ledger_revision(connection: sqlite3.Connection, path: Path) -> str:
    try:
        return connection.execute(REVISION_QUERY).fetchone()[0]
    except (sqlite3.OperationalError, TypeError):
        raise BackupError(f"{path} is not an mqi ledger (it has no schema revision)") from None


def _verify_sqlite_copy(copy: sqlite3.Connection, expected_revision: str) -> tuple[str, int]:
    problems = [row[0] for row in copy.execute("PRAGMA integrity_check")]
    if problems != ["ok"]:
        raise BackupError("the copy failed SQLite's integrity check: " + "; ".join(problems[:5]))
    revision = copy.execute(REVISION_QUERY).fetchone()[0]
    if revision != expected_revision:
        raise BackupError(
            f"the copy is at schema revision {revision}, the ledger at {expected_revision}; "
            "was the ledger being upgraded? Try again"
        )
    return revision, copy.execute(CASES_QUERY).fetchone()[0]


# -- PostgreSQL --------------------------------------------------------------------------


def pg_dump_command(url: URL, file: Path) -> list[str]:
    """pg_dump's arguments for the ledger at `url`: everything but the password."""
    without_password = URL.create(
        "postgresql", url.username, None, url.host, url.port, url.database, url.query
    )
    conninfo = without_password.render_as_string(hide_password=False)
    return ["pg_dump", "--format=custom", "--no-password", f"--file={file}", f"--dbname={conninfo}"]


def _backup_postgres(url: URL, destination: Path) -> BackupReport:
    if shutil.which("pg_dump") is None:
        raise BackupError(
            "pg_dump is not installed here (Debian/Ubuntu: apt install postgresql-client). "
            "Back up the PostgreSQL ledger with:\n  PGPASSWORD=... " + shlex.join(pg_dump_command(url, destination))
        )
    engine = create_engine(url, poolclass=NullPool, isolation_level="REPEATABLE READ")
    try:
        with engine.connect() as connection, _staged(destination) as staging:
            # One snapshot for our count and for pg_dump: the report describes the dump exactly.
            snapshot = connection.execute(text("SELECT pg_export_snapshot()")).scalar_one()
            revision = _postgres_revision(connection, url)
            cases = connection.execute(text(CASES_QUERY)).scalar_one()
            _run_client([*pg_dump_command(url, staging), f"--snapshot={snapshot}"], url)
            _run_client(["pg_restore", "--list", str(staging)], url)  # a readable archive
            connection.rollback()
    except DBAPIError as error:
        raise BackupError(f"cannot read the ledger at {safe_url(url)}: {_redacted(str(error.orig), url)}") from None
    finally:
        engine.dispose()
    return BackupReport(destination, revision, cases, destination.stat().st_size)


def _postgres_revision(connection: Connection, url: URL) -> str:
    try:
        return connection.execute(text(REVISION_QUERY)).scalar_one()
    except DBAPIError:
        raise BackupError(f"{safe_url(url)} is not an mqi ledger (it has no schema revision)") from None


def _run_client(command: list[str], url: URL) -> None:
    """Run a PostgreSQL client program; its password comes from the environment."""
    environment = dict(os.environ)
    if url.password:
        environment["PGPASSWORD"] = url.password
    result = subprocess.run(command, env=environment, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise BackupError(
            f"{command[0]} for {safe_url(url)} failed (exit code {result.returncode}): "
            + _redacted(result.stderr.strip(), url)
        )


def _redacted(message: str, url: URL) -> str:
    if not url.password:
        return message
    for form in (url.password, quote(url.password, safe="")):
        message = message.replace(form, "***")
    return message

