"""One `mqi run` at a time per inbox and per ledger.

Two main jobs on one inbox would register and submit every case twice; two on one ledger
would fight over its cases. So `mqi run` holds two kernel-managed locks while it lives:

- the inbox: an exclusive `flock` on the dot-file `.mqi-run.lock` in the inbox folder (the
  scanner ignores dot-files);
- the ledger: for SQLite, an `flock` on `<database>.mqi-run.lock` beside the database file;
  for PostgreSQL, a session-level advisory lock held by a connection of its own, keyed by the
  ledger's schema (several ledgers may share one database in different schemas). A restart
  of PostgreSQL ends that session and so the lock; `mqi run` is then restarted to regain it.

The kernel (or PostgreSQL, when the connection drops) releases these locks when the holder
dies, even by SIGKILL: a lock file left behind never blocks a new start. The lock files are
never deleted, because deleting a lock file another process has open would let two processes
lock two different files of the same name. While locked, a file holds its holder's details
(JSON) so that a refused start can name it. Descriptors are not inheritable, so processes
that `mqi run` starts (detached case commands, flow runs) never hold the locks.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path

from sqlalchemy import URL, Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from mqi.backup import sqlite_file
from mqi.errors import MqiError
from mqi.ledger.engine import parse_url, safe_url
from mqi.settings import Settings

LOCK_FILE_NAME = ".mqi-run.lock"
LOCK_FILE_MODE = 0o600
# PostgreSQL advisory locks with two int4 keys: (this class, a hash of the ledger's schema).
# The two-key space is apart from the single bigint key the ledger's migrations lock.
RUN_LOCK_CLASS = 0x6D7169  # "mqi"
POSTGRES_APPLICATION_NAME_LIMIT = 63
DETAILS_WAIT_SECONDS = 1.0  # a holder writes its details just after taking the lock

_SCHEMA_KEY = "hashtext(coalesce(current_schema(), ''))"


class AlreadyRunning(MqiError):
    """Another `mqi run` holds the inbox or the ledger."""


class RunLockError(MqiError):
    """The ledger could not be reached to take its lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds the locks: written into the lock files, shown when another start is refused."""

    pid: int
    host: str
    started_at: str  # ISO 8601, UTC
    command: str

    @classmethod
    def this_process(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), datetime.now(UTC).isoformat(), shlex.join(sys.argv))

    def describe(self, zone: tzinfo) -> str:
        since = datetime.fromisoformat(self.started_at).astimezone(zone).isoformat(timespec="seconds")
        return f"pid {self.pid} on host {self.host} since {since}, command {self.command}"

    def application_name(self) -> str:
        """How PostgreSQL lists the lock's connection (pg_stat_activity, at most 63 bytes)."""
        name = f"mqi run pid {self.pid} on {self.host}"
        return name.encode()[:POSTGRES_APPLICATION_NAME_LIMIT].decode(errors="ignore")


@contextmanager
def hold_run_locks(settings: Settings) -> Iterator[None]:
    """Hold the inbox and ledger locks for the block, or raise AlreadyRunning naming the holder."""
    holder = Holder.this_process()
    inbox = settings.inbox.path
    ledger_url = parse_url(settings.ledger.url.get_secret_value())
    with ExitStack() as stack:
        stack.enter_context(_file_lock(inbox / LOCK_FILE_NAME, f"the inbox {inbox}", holder, settings.tz))
        if ledger_url.get_backend_name() == "sqlite":
            database = sqlite_file(ledger_url)
            lock_file = database.with_name(database.name + LOCK_FILE_NAME)
            stack.enter_context(_file_lock(lock_file, f"the ledger {database}", holder, settings.tz))
        else:
            stack.enter_context(_postgres_lock(ledger_url, holder, settings.tz))
        yield


# -- lock files --------------------------------------------------------------------------


@contextmanager
def _file_lock(path: Path, what: str, holder: Holder, zone: tzinfo) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, LOCK_FILE_MODE)  # no O_TRUNC: not ours yet
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(_refusal(_file_holder(descriptor, zone), what)) from None
        _write_details(descriptor, json.dumps(asdict(holder)).encode())
        try:
            yield
        finally:
            _write_details(descriptor, b"")  # details only while held
    finally:
        os.close(descriptor)  # releases the lock


def _write_details(descriptor: int, details: bytes) -> None:
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, details, 0)


def _file_holder(descriptor: int, zone: tzinfo) -> str:
    deadline = time.monotonic() + DETAILS_WAIT_SECONDS
    while True:
        try:
            return Holder(**json.loads(os.pread(descriptor, 64 * 1024, 0))).describe(zone)
        except (ValueError, TypeError):
            if time.monotonic() > deadline:
                return "its details are not recorded"
            time.sleep(0.05)


def _refusal(holder_description: str, what: str) -> str:
    return f"another mqi run ({holder_description}) holds {what}; stop it first"


# -- PostgreSQL --------------------------------------------------------------------------


@contextmanager
def _postgres_lock(url: URL, holder: Holder, zone: tzinfo) -> Iterator[None]:
    engine = create_engine(
        url,
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",  # never idle in a transaction for months
        connect_args={"application_name": holder.application_name()},
    )
    try:
        connection = _locking_connection(engine, url, zone)
        try:
            yield
        finally:
            connection.close()  # ends the session, which releases the lock
    finally:
        engine.dispose()


def _locking_connection(engine: Engine, url: URL, zone: tzinfo) -> Connection:
    """A connection of its own that holds the ledger's run lock."""
    try:
        with ExitStack() as closed_unless_locked:
            connection = closed_unless_locked.enter_context(engine.connect())
            locked = connection.execute(
                text(f"SELECT pg_try_advisory_lock(:lock_class, {_SCHEMA_KEY})"),
                {"lock_class": RUN_LOCK_CLASS},
            ).scalar_one()
            if locked:
                closed_unless_locked.pop_all()
                return connection
            description = _postgres_holder(connection, zone)
    except DBAPIError as error:
        raise RunLockError(f"cannot lock the ledger at {safe_url(url)}: {error.orig}") from None
    raise AlreadyRunning(_refusal(description, f"the ledger {safe_url(url)}"))


def _postgres_holder(connection: Connection, zone: tzinfo) -> str:
    row = connection.execute(
        text(
            f"""SELECT a.application_name, a.client_addr, a.backend_start
                FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                  AND l.classid = CAST(:lock_class AS oid) AND l.objid = CAST({_SCHEMA_KEY} AS oid)"""
        ),
        {"lock_class": RUN_LOCK_CLASS},
    ).first()
    if row is None:
        return "it has just stopped, or its details are not visible to this database user"
    since = row.backend_start.astimezone(zone).isoformat(timespec="seconds")
    return f"{row.application_name}, connected from {row.client_addr or 'a local socket'} since {since}"
