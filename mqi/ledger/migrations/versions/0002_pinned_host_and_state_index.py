"""Cases may be pinned to a host and group; cases are found by state through an index.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.add_column(sa.Column("pinned_host", sa.String(255), nullable=True))
        batch.add_column(sa.Column("pinned_group", sa.String(255), nullable=True))
    # The orchestrator asks "which cases are pending/running?" on every poll.
    op.create_index("ix_cases_state", "cases", ["state"])


def downgrade() -> None:
    op.drop_index("ix_cases_state", table_name="cases")
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("pinned_group")
        batch.drop_column("pinned_host")
