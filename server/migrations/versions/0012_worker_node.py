"""Worker-node information of a job's pilot, as columns the monitor groups by (issue 16 item 6):
CPU model, cores, memory, free memory, load, free disk, pilot version (``panda_core.workernode``).

Revision ID: 0012_worker_node
Revises: 0011_failure_policy
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_worker_node"
down_revision = "0011_failure_policy"
branch_labels = None
depends_on = None

COLUMNS = (("wn_cpu_model", sa.String(128)), ("wn_cores", sa.Integer()),
           ("wn_mem_mb", sa.BigInteger()), ("wn_mem_available_mb", sa.BigInteger()),
           ("wn_load1", sa.Float()), ("wn_disk_free_mb", sa.BigInteger()),
           ("wn_pilot_version", sa.String(128)))


def upgrade() -> None:
    for table in ("jobs", "jobs_archive"):
        for name, type_ in COLUMNS:
            op.add_column(table, sa.Column(name, type_, nullable=True))


def downgrade() -> None:
    for table in ("jobs", "jobs_archive"):
        with op.batch_alter_table(table) as batch:
            for name, _ in COLUMNS:
                batch.drop_column(name)
