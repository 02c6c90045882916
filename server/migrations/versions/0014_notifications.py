"""Notifications to users: one row per message a task's ``notify`` asked for (a task's end, a
job's failure), with its delivery state, so that several server processes send each once and a
failed send is retried (server/notifications.py).

Revision ID: 0014_notifications
Revises: 0013_job_holder
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014_notifications"
down_revision = "0013_job_holder"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts():
    from sqlalchemy.dialects import mysql
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "notifications",
        sa.Column("notification_id", Id, primary_key=True, autoincrement=True),
        sa.Column("event_key", sa.String(255), nullable=False),
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("panda_id", sa.BigInteger()),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("target", sa.String(512), nullable=False),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text()),
        sa.Column("created", _ts(), nullable=False),
        sa.Column("sent", _ts()),
        sa.UniqueConstraint("event_key", name="uq_notifications_event_key"),
    )
    op.create_index("ix_notifications_state", "notifications", ["state"])


def downgrade() -> None:
    op.drop_index("ix_notifications_state", table_name="notifications")
    op.drop_table("notifications")
