"""Quotas per user and per group, and the index that counts a user's jobs of the last day.

Revision ID: 0016_quotas
Revises: 0015_debug
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016_quotas"
down_revision = "0015_debug"
branch_labels = None
depends_on = None


def _ts():
    from sqlalchemy.dialects import mysql
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "quotas",
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("max_running", sa.Integer()),
        sa.Column("max_per_day", sa.Integer()),
        sa.Column("updated", _ts(), nullable=False),
    )
    op.create_index("ix_jobs_owner_created", "jobs", ["owner", "creation_time"])
    op.create_index("ix_jobs_archive_owner_created", "jobs_archive", ["owner", "creation_time"])


def downgrade() -> None:
    op.drop_index("ix_jobs_archive_owner_created", table_name="jobs_archive")
    op.drop_index("ix_jobs_owner_created", table_name="jobs")
    op.drop_table("quotas")
