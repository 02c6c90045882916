"""The spine's schema: tasks, jobs and their archive, files, datasets, replicas, sites, history,
pilots, factories.

A database created by the spine's ``create_schema`` (tables, no ``alembic_version``) is exactly
this revision: ``server.db.upgrade_schema`` stamps it as 0001 before upgrading.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _job_columns(autoincrement: bool) -> list[sa.Column]:
    return [
        sa.Column("panda_id", Id, autoincrement=autoincrement, nullable=False),
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("serial", sa.Integer(), nullable=False),
        sa.Column("attempt_nr", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("site", sa.String(128), nullable=True),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("prod_source_label", sa.String(32), nullable=False),
        sa.Column("share", sa.String(64), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("current_priority", sa.Integer(), nullable=False),
        sa.Column("transformation", sa.Text(), nullable=False),
        sa.Column("job_pars", sa.Text(), nullable=False),
        sa.Column("cores", sa.Integer(), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("walltime_s", sa.Integer(), nullable=False),
        sa.Column("disk_mb", sa.Integer(), nullable=False),
        sa.Column("pilot_version", sa.String(64), nullable=True),
        sa.Column("transfer_type", sa.String(16), nullable=True),
        sa.Column("command", sa.String(64), nullable=True),
        sa.Column("creation_time", sa.DateTime(), nullable=False),
        sa.Column("modification_time", sa.DateTime(), nullable=False),
        sa.Column("state_changed", sa.DateTime(), nullable=False),
        sa.Column("start_time", sa.DateTime(), nullable=True),
        sa.Column("end_time", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_time", sa.DateTime(), nullable=True),
        sa.Column("node", sa.String(255), nullable=True),
        sa.Column("pilot_id", sa.String(512), nullable=True),
        sa.Column("batch_id", sa.String(255), nullable=True),
        sa.Column("pilot_owner", sa.String(255), nullable=True),
        sa.Column("pilot_error_code", sa.Integer(), nullable=False),
        sa.Column("pilot_error_diag", sa.Text(), nullable=True),
        sa.Column("trans_exit_code", sa.Integer(), nullable=True),
        sa.Column("exe_error_code", sa.Integer(), nullable=False),
        sa.Column("exe_error_diag", sa.Text(), nullable=True),
        sa.Column("dispatcher_error_code", sa.Integer(), nullable=False),
        sa.Column("dispatcher_error_diag", sa.Text(), nullable=True),
        sa.Column("task_buffer_error_code", sa.Integer(), nullable=False),
        sa.Column("task_buffer_error_diag", sa.Text(), nullable=True),
        sa.Column("cpu_consumption_time", sa.Float(), nullable=True),
        sa.Column("max_rss", sa.BigInteger(), nullable=True),
        sa.Column("n_events", sa.BigInteger(), nullable=True),
        sa.Column("job_metrics", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("panda_id"),
    ]


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("task_id", Id, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("share", sa.String(64), nullable=False),
        sa.Column("site", sa.String(128), nullable=True),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("error_dialog", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("modified", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("task_id"),
    )
    op.create_index("ix_tasks_owner", "tasks", ["owner"])
    op.create_index("ix_tasks_modified", "tasks", ["modified"])

    op.create_table("jobs", *_job_columns(autoincrement=True))
    op.create_index("ix_jobs_dispatch", "jobs", ["site", "status", "current_priority"])
    op.create_index("ix_jobs_task", "jobs", ["task_id"])
    op.create_index("ix_jobs_status_changed", "jobs", ["status", "state_changed"])
    op.create_table("jobs_archive", *_job_columns(autoincrement=False))
    op.create_index("ix_jobs_archive_task", "jobs_archive", ["task_id"])

    op.create_table(
        "files",
        sa.Column("row_id", Id, autoincrement=True, nullable=False),
        sa.Column("panda_id", sa.BigInteger(), nullable=False),
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(8), nullable=False),
        sa.Column("scope", sa.String(255), nullable=False),
        sa.Column("lfn", sa.String(255), nullable=False),
        sa.Column("dataset", sa.String(255), nullable=False),
        sa.Column("guid", sa.String(64), nullable=True),
        sa.Column("fsize", sa.BigInteger(), nullable=True),
        sa.Column("checksum", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("ddm_endpoint", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("row_id"),
    )
    op.create_index("ix_files_panda", "files", ["panda_id"])

    op.create_table(
        "datasets",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("scope", sa.String(255), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "dataset_files",
        sa.Column("row_id", Id, autoincrement=True, nullable=False),
        sa.Column("dataset", sa.String(255), nullable=False),
        sa.Column("scope", sa.String(255), nullable=False),
        sa.Column("lfn", sa.String(255), nullable=False),
        sa.Column("guid", sa.String(64), nullable=False),
        sa.Column("fsize", sa.BigInteger(), nullable=True),
        sa.Column("checksum", sa.String(64), nullable=True),
        sa.Column("task_id", sa.BigInteger(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("row_id"),
        sa.UniqueConstraint("dataset", "scope", "lfn", name="uq_dataset_file"),
    )
    op.create_table(
        "replicas",
        sa.Column("row_id", Id, autoincrement=True, nullable=False),
        sa.Column("scope", sa.String(255), nullable=False),
        sa.Column("lfn", sa.String(255), nullable=False),
        sa.Column("ddm_endpoint", sa.String(128), nullable=False),
        sa.Column("surl", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("row_id"),
        sa.UniqueConstraint("scope", "lfn", "ddm_endpoint", name="uq_replica"),
    )
    op.create_table(
        "sites",
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "job_history",
        sa.Column("row_id", Id, autoincrement=True, nullable=False),
        sa.Column("panda_id", sa.BigInteger(), nullable=False),
        sa.Column("old_status", sa.String(32), nullable=True),
        sa.Column("new_status", sa.String(32), nullable=False),
        sa.Column("time", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("row_id"),
    )
    op.create_index("ix_history_panda", "job_history", ["panda_id"])
    op.create_table(
        "pilots",
        sa.Column("row_id", Id, autoincrement=True, nullable=False),
        sa.Column("factory", sa.String(255), nullable=False),
        sa.Column("batch_id", sa.String(255), nullable=False),
        sa.Column("site", sa.String(128), nullable=False),
        sa.Column("backend", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("submitted", sa.DateTime(), nullable=True),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("row_id"),
        sa.UniqueConstraint("factory", "batch_id", name="uq_pilot"),
    )
    op.create_table(
        "factories",
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    for table in ("factories", "pilots", "job_history", "sites", "replicas", "dataset_files",
                  "datasets", "files", "jobs_archive", "jobs", "tasks"):
        op.drop_table(table)
