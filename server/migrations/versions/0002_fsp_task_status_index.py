"""Microsecond timestamps on MariaDB; jobs indexed by (task_id, status).

MariaDB's plain DATETIME drops fractions of a second, so history rows written within one second
could not be ordered by time and ages were rounded. The task-status check after each job update
asks "does this task still have a job that is not final?", which (task_id, status) answers from
the index alone.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# table -> (column, nullable) of every timestamp column
TIMESTAMPS = {
    "tasks": [("created", False), ("modified", False)],
    "jobs": [("creation_time", False), ("modification_time", False), ("state_changed", False),
             ("start_time", True), ("end_time", True), ("heartbeat_time", True)],
    "jobs_archive": [("creation_time", False), ("modification_time", False),
                     ("state_changed", False), ("start_time", True), ("end_time", True),
                     ("heartbeat_time", True)],
    "datasets": [("created", False)],
    "dataset_files": [("created", False)],
    "replicas": [("created", False)],
    "sites": [("updated", False)],
    "job_history": [("time", False)],
    "pilots": [("submitted", True), ("updated", False)],
    "factories": [("last_seen", False)],
}


def _set_fsp(fsp: int) -> None:
    if op.get_bind().dialect.name not in ("mysql", "mariadb"):
        return
    old, new = (sa.DateTime(), mysql.DATETIME(fsp=6)) if fsp else (mysql.DATETIME(fsp=6),
                                                                    sa.DateTime())
    for table, columns in TIMESTAMPS.items():
        for column, nullable in columns:
            op.alter_column(table, column, type_=new, existing_type=old,
                            existing_nullable=nullable)


def upgrade() -> None:
    _set_fsp(6)
    op.create_index("ix_jobs_task_status", "jobs", ["task_id", "status"])
    op.drop_index("ix_jobs_task", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_task", "jobs", ["task_id"])
    op.drop_index("ix_jobs_task_status", table_name="jobs")
    _set_fsp(0)
