"""Ledger databases for tests: every ledger test runs on SQLite and on PostgreSQL.

`ledger_url` is a fresh, empty database for each test: a SQLite file in the test's temp
folder, or a schema of its own on the PostgreSQL server named by MQI_TEST_POSTGRES_URL.
PostgreSQL tests fail (never skip) when the server cannot be reached.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError

from mqi.ledger import Ledger

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BACKENDS = ["sqlite", "postgresql"]


def postgres_server_url() -> str:
    return os.environ.get("MQI_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'ledger.db'}"


@pytest.fixture(scope="session")
def postgres_admin():
    """An engine on the test PostgreSQL server; fails every PostgreSQL test if unreachable."""
    url = make_url(postgres_server_url())
    engine = create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        problem = None
    except OperationalError as error:
        problem = str(error.orig).strip()
    if problem is not None:
        engine.dispose()
        pytest.fail(
            f"PostgreSQL at {url.render_as_string(hide_password=True)} is unreachable "
            f"({problem}). The ledger tests must run on PostgreSQL too: start it "
            "(`scripts/test` installs and starts one; or `pg_ctlcluster <version> main start`, "
            "database `test`, user postgres, trust auth on 127.0.0.1) or point "
            "MQI_TEST_POSTGRES_URL at another server.",
            pytrace=False,
        )
    yield engine
    engine.dispose()


def _fresh_postgres_schema(admin) -> Iterator[str]:
    """A new schema, dropped afterwards; the URL sets it as the search path."""
    schema = f"mqi_test_{secrets.token_hex(6)}"
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(postgres_server_url()).update_query_dict(
            {"options": f"-csearch_path={schema}"}
        )
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture(params=BACKENDS)
def ledger_url(request, tmp_path) -> Iterator[str]:
    """The URL of a fresh, empty ledger database, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        yield from _fresh_postgres_schema(request.getfixturevalue("postgres_admin"))


@pytest.fixture
def ledger(ledger_url) -> Iterator[Ledger]:
    """An open, migrated ledger on a fresh database (both backends)."""
    with Ledger.open(ledger_url) as opened:
        yield opened
