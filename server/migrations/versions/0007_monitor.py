"""The monitor: indexes for its time windows, the jobs' working group, and the operations
tables (incidents, alarms, the operations history).

Why the indexes: every monitor view selects jobs by ``modification_time`` (the time window) or
by ``status`` (active jobs whatever the window; the dashboard's and history's counts per site
and state), and must stay index-backed with a million rows (docs/monitor.md).

Revision ID: 0007_monitor
Revises: 0006
Create Date: 2026-11-24
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_monitor"
down_revision = "0006"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts():
    from sqlalchemy.dialects import mysql
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    for table in ("jobs", "jobs_archive"):
        op.add_column(table, sa.Column("working_group", sa.String(64), nullable=True))
    op.create_index("ix_jobs_modified", "jobs", ["modification_time"])
    op.create_index("ix_jobs_status_modified", "jobs", ["status", "modification_time", "site"])
    op.create_index("ix_jobs_archive_modified", "jobs_archive", ["modification_time"])
    op.create_index("ix_files_task", "files", ["task_id"])
    op.create_index("ix_pilots_updated", "pilots", ["updated"])
    op.create_table(
        "incidents",
        sa.Column("row_id", Id, primary_key=True, autoincrement=True),
        sa.Column("time", _ts(), nullable=False),
        sa.Column("component", sa.String(128), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("site", sa.String(128)),
        sa.Column("panda_id", sa.BigInteger()),
        sa.Column("host", sa.String(255)),
        sa.Column("suppressed", sa.Integer(), nullable=False),
    )
    op.create_index("ix_incidents_time", "incidents", ["time"])
    op.create_index("ix_incidents_component_time", "incidents", ["component", "time"])
    op.create_table(
        "alarms",
        sa.Column("alarm_id", Id, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("open_key", sa.String(255)),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("title", sa.String(255), nullable=False),
        sa.Column("message", sa.Text()),
        sa.Column("site", sa.String(128)),
        sa.Column("raised_by", sa.String(255)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("first_raised", _ts(), nullable=False),
        sa.Column("last_raised", _ts(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("acknowledged_by", sa.String(255)),
        sa.Column("acknowledged_at", _ts()),
        sa.Column("cleared_at", _ts()),
        sa.Column("notified_at", _ts()),
        sa.UniqueConstraint("open_key", name="uq_alarm_open_key"),
    )
    op.create_index("ix_alarms_state", "alarms", ["state", "last_raised"])
    op.create_table(
        "ops_snapshots",
        sa.Column("row_id", Id, primary_key=True, autoincrement=True),
        sa.Column("time", _ts(), nullable=False),
        sa.Column("site", sa.String(128), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("n_jobs", sa.Integer(), nullable=False),
        sa.UniqueConstraint("time", "site", "status", name="uq_ops_snapshot"),
    )


def downgrade() -> None:
    op.drop_table("ops_snapshots")
    op.drop_index("ix_alarms_state", table_name="alarms")
    op.drop_table("alarms")
    op.drop_index("ix_incidents_component_time", table_name="incidents")
    op.drop_index("ix_incidents_time", table_name="incidents")
    op.drop_table("incidents")
    op.drop_index("ix_pilots_updated", table_name="pilots")
    op.drop_index("ix_files_task", table_name="files")
    op.drop_index("ix_jobs_archive_modified", table_name="jobs_archive")
    op.drop_index("ix_jobs_status_modified", table_name="jobs")
    op.drop_index("ix_jobs_modified", table_name="jobs")
    for table in ("jobs", "jobs_archive"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("working_group")
