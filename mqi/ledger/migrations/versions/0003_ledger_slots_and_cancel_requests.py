"""GPU slots and cancel requests are facts in the ledger.

An attempt holds a slot of its GPU group from the moment it is admitted until its task is
finished or killed (`attempts.holds_slot`), written in the same transaction as the state
change that takes or gives it back; Prefect's concurrency limits are repaired from it.
A cancel is recorded on the case (`cases.cancel_requested_at`) before anything is killed,
so every step that would touch a host can refuse it atomically.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (SQLite allows it with a constant default): a batch copy of the table
    # would trip over the events' foreign keys to it.
    op.add_column("attempts", sa.Column("holds_slot", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("cases", sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True))
    # Admission counts the slot holders of one group on every try.
    op.create_index("ix_attempts_holds_slot_host_pueue_group", "attempts", ["holds_slot", "host", "pueue_group"])
    # Attempts that were live when this version was installed hold their slot (their task may be on a GPU).
    op.execute("UPDATE attempts SET holds_slot = true WHERE result IS NULL")


def downgrade() -> None:
    op.drop_index("ix_attempts_holds_slot_host_pueue_group", table_name="attempts")
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("cancel_requested_at")
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("holds_slot")
