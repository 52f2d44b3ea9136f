"""Alembic environment: always given an open connection by mqi.ledger.migrations."""

from alembic import context

from mqi.ledger.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "run ledger migrations through mqi.ledger.migrations.upgrade or `mqi db upgrade`"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot alter most of a table in place; batch mode copies it instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
