"""Database engines for the ledger: SQLite tuned for many writers, or PostgreSQL by URL."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from mqi.errors import MqiError

SQLITE_BUSY_TIMEOUT_MS = 30_000
# The key of the PostgreSQL advisory lock that lets one process at a time migrate.
MIGRATION_LOCK_KEY = 0x6D7169  # "mqi"
# Execution option naming how a SQLite transaction starts; writers take the write lock
# up front ("IMMEDIATE") so that two of them never deadlock upgrading a read lock.
SQLITE_BEGIN_OPTION = "mqi_sqlite_begin"
# The driver plain postgresql:// means (see parse_url) comes with this extra.
POSTGRES_DRIVER = "psycopg"
POSTGRES_INSTALL_HINT = "pip install 'mqi-communicator[postgres]'"


class LedgerError(MqiError):
    """The ledger refused an operation or could not be reached."""


def parse_url(url: str) -> URL:
    """The SQLAlchemy URL for `url`; plain postgresql:// means the psycopg 3 driver.

    Checked without connecting: the database is supported and its driver known,
    synchronous and installed, so that `mqi config check` names a wrong URL.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise LedgerError(
            "the ledger URL is not a database URL; expected sqlite:///path/to/ledger.db "
            "or postgresql://user@host/dbname"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise LedgerError(
            f"the ledger supports SQLite and PostgreSQL, not {parsed.get_backend_name()!r} "
            f"({safe_url(parsed)})"
        )
    _require_driver(parsed)
    return parsed


def _require_driver(url: URL) -> None:
    driver = url.get_driver_name()
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise LedgerError(
            f"unknown {url.get_backend_name()} driver {driver!r} in the ledger URL ({safe_url(url)}); "
            f"leave it out (postgresql://user@host/dbname uses {POSTGRES_DRIVER}, sqlite:///path its built-in one)"
        ) from None
    if dialect.is_async:
        raise LedgerError(f"the ledger needs a synchronous driver, not {driver!r} ({safe_url(url)})")
    try:
        dialect.import_dbapi()
    except ImportError as error:
        install = POSTGRES_INSTALL_HINT if driver == POSTGRES_DRIVER else f"install {error.name or driver!r}"
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LedgerError(
            f"the ledger URL {safe_url(url)} needs the database driver {driver!r}, which cannot be "
            f"loaded ({reason}): {install}"
        ) from None


def safe_url(url: URL) -> str:
    """The URL as text with any password hidden, fit for messages and logs."""
    return url.render_as_string(hide_password=True)


def create_ledger_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return create_engine(url, pool_pre_ping=True)


def _sqlite_engine(url: URL) -> Engine:
    if url.database in (None, "", ":memory:"):
        raise LedgerError(
            "an in-memory SQLite ledger would lose every case when mqi stops; "
            "give a file, e.g. sqlite:///./mqi.db"
        )
    if not url.database.startswith("file:"):
        _create_private(Path(url.database))
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def configure_connection(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        # We issue BEGIN ourselves (below); the driver's own implicit BEGIN would not let
        # us choose IMMEDIATE, nor include DDL in the transaction.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def begin(connection) -> None:  # noqa: ANN001 (sqlalchemy Connection)
        mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _create_private(database: Path) -> None:
    """Create a new SQLite file readable by its owner only: the ledger names patients' cases.
    SQLite gives its -wal and -shm files the same mode. An existing file is left as it is."""
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # e.g. a file where a folder of the path should be
        raise LedgerError(
            f"cannot create the folder of the SQLite ledger {database}: {error.strerror or error}"
        ) from None
    try:
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def writer_engine(engine: Engine) -> Engine:
    """The same engine (same pool), starting its SQLite transactions as writers."""
    return engine.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})


_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
_POSTGRES_RETRYABLE = {"40001", "40P01"}  # serialization failure, deadlock detected


def is_retryable(error: DBAPIError) -> bool:
    """True when the transaction lost a race for a lock and may simply be run again."""
    original = error.orig
    if isinstance(original, sqlite3.OperationalError):
        # extended codes such as SQLITE_BUSY_SNAPSHOT carry the primary code in the low byte
        return original.sqlite_errorcode & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    return getattr(original, "sqlstate", None) in _POSTGRES_RETRYABLE
