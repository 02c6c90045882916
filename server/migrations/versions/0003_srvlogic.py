"""Global shares, event ranges, and the data service's error code on jobs.

``global_shares``: the nested share tree (server/shares.py), editable through the API.
``event_ranges``: ranges of events within a file handed to pilots by getEventRanges
(server/eventranges.py). ``jobs.ddm_error_code/diag``: why the data service failed a job.

Revision ID: srvlogic1
Revises: 0002
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "srvlogic1"
down_revision = "0002"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "global_shares",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("parent", sa.String(64), nullable=True),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("updated", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "event_ranges",
        sa.Column("row_id", Id, autoincrement=True, nullable=False),
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("serial", sa.Integer(), nullable=False),
        sa.Column("panda_id", sa.BigInteger(), nullable=True),
        sa.Column("scope", sa.String(255), nullable=False),
        sa.Column("lfn", sa.String(255), nullable=False),
        sa.Column("guid", sa.String(64), nullable=False),
        sa.Column("start_event", sa.BigInteger(), nullable=False),
        sa.Column("last_event", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("cpu_consumption_time", sa.Float(), nullable=True),
        sa.Column("modified", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("row_id"),
    )
    op.create_index("ix_event_ranges_job", "event_ranges", ["task_id", "serial", "status"])
    for table in ("jobs", "jobs_archive"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("ddm_error_code", sa.Integer(), nullable=False,
                                       server_default="0"))
            batch.add_column(sa.Column("ddm_error_diag", sa.Text(), nullable=True))


def downgrade() -> None:
    for table in ("jobs", "jobs_archive"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("ddm_error_diag")
            batch.drop_column("ddm_error_code")
    op.drop_index("ix_event_ranges_job", table_name="event_ranges")
    op.drop_table("event_ranges")
    op.drop_table("global_shares")
