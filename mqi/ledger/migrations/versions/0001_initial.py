"""Initial ledger: cases, attempts, case events, GPU groups.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from mqi.ledger.models import FolderPath, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("uid", sa.String(16), nullable=False),
        sa.Column("source", FolderPath(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("failure_category", sa.String(16), nullable=True),
        sa.Column("failure_message", sa.Text(), nullable=True),
        sa.Column("results_path", FolderPath(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_cases"),
        sa.UniqueConstraint("uid", name="uq_cases_uid"),
        sa.UniqueConstraint("source", name="uq_cases_source"),
    )
    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pueue_group", sa.String(255), nullable=False),
        sa.Column("pueue_task_id", sa.Integer(), nullable=True),
        sa.Column("pueue_label", sa.String(255), nullable=False),
        sa.Column("remote_dir", sa.Text(), nullable=False),
        sa.Column("flow_run_id", sa.String(64), nullable=True),
        sa.Column("submitted_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("ended_at", UTCDateTime(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("result", sa.String(16), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_attempts"),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], name="fk_attempts_case_id_cases"),
        sa.UniqueConstraint("case_id", "number", name="uq_attempts_case_id_number"),
    )
    op.create_table(
        "case_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("case_id", sa.Integer(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("attempt_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_case_events"),
        sa.ForeignKeyConstraint(["case_id"], ["cases.id"], name="fk_case_events_case_id_cases"),
        sa.ForeignKeyConstraint(
            ["attempt_id"], ["attempts.id"], name="fk_case_events_attempt_id_attempts"
        ),
    )
    op.create_index("ix_case_events_case_id_id", "case_events", ["case_id", "id"])
    op.create_table(
        "gpu_groups",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pueue_group", sa.String(255), nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("devices", sa.JSON(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_gpu_groups"),
        sa.UniqueConstraint("host", "pueue_group", name="uq_gpu_groups_host_pueue_group"),
    )


def downgrade() -> None:
    op.drop_table("gpu_groups")
    op.drop_index("ix_case_events_case_id_id", table_name="case_events")
    op.drop_table("case_events")
    op.drop_table("attempts")
    op.drop_table("cases")
