"""Debug mode (issue 16): the view a job's pilot is asked for, and the latest it sent.

Revision ID: 0015_debug
Revises: 0014_notifications
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015_debug"
down_revision = "0014_notifications"
branch_labels = None
depends_on = None

_TABLES = ("jobs", "jobs_archive")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("debug_request", sa.String(300)))
            batch.add_column(sa.Column("debug_view", sa.Text()))


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("debug_view")
            batch.drop_column("debug_request")
