"""Schema migrations of the case ledger, run from code: no alembic.ini is needed.

A new migration: write it by hand following versions/0002_*.py (or let alembic draft one
with `command.revision(alembic_config(connection), message, autogenerate=True)` on a
database at head), then set HEAD_REVISION to its revision id.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, inspect, text

from mqi.ledger.engine import LedgerError

SCRIPT_LOCATION = Path(__file__).parent
# The newest revision in versions/ (a test checks that alembic agrees). Knowing it here
# lets every start see that the schema is current without importing alembic (0.1 s).
HEAD_REVISION = "0003"
VERSION_TABLE = "alembic_version"


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at, or None for a database without the ledger."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    return connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Bring the schema to `revision` inside the caller's transaction."""
    from alembic import command  # only when the schema is behind: see HEAD_REVISION
    from alembic.util import CommandError

    try:
        command.upgrade(alembic_config(connection), revision)
    except CommandError as error:
        # Typically a database written by a newer mqi, whose revision we do not know.
        raise LedgerError(
            f"cannot migrate the ledger schema from revision {current_revision(connection)} "
            f"to {revision}: {error} (is this mqi older than the one that wrote the ledger?)"
        ) from None


def alembic_config(connection: Connection):  # -> alembic.config.Config
    """An alembic Config that runs this package's migrations on an open connection."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.attributes["connection"] = connection
    return config
