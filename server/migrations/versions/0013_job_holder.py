"""A job has one pilot: the SHA-256 of the ``pilotNonce`` its getJob sent, so that updates
from any other pilot are refused (``server/jobholder.py``).

Revision ID: 0013_job_holder
Revises: 0012_worker_node
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_job_holder"
down_revision = "0012_worker_node"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("jobs", "jobs_archive"):
        op.add_column(table, sa.Column("pilot_nonce", sa.String(64), nullable=True))


def downgrade() -> None:
    for table in ("jobs", "jobs_archive"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("pilot_nonce")
