"""Schema migrations of the case ledger, run from code: no alembic.ini is needed.

A new migration: write it by hand following versions/0002_*.py, or let alembic draft one
from the models with `command.revision(alembic_config(connection), message, autogenerate=True)`
on a database at head.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

SCRIPT_LOCATION = Path(__file__).parent


def alembic_config(connection: Connection) -> Config:
    """An alembic Config that runs this package's migrations on an open connection."""
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory(str(SCRIPT_LOCATION)).get_current_head()
    assert head is not None, "the migrations folder has no revisions"
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at, or None for a database without the ledger."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Bring the schema to `revision` inside the caller's transaction."""
    command.upgrade(alembic_config(connection), revision)
