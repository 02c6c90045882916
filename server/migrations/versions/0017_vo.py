"""The virtual organisation of a job (PanDA's ``VO``), beside its working group; both given at
submission and checked against the submitter's token groups (server/groups.py).

Revision ID: 0017_vo
Revises: 0016_quotas
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017_vo"
down_revision = "0016_quotas"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("jobs", "jobs_archive"):
        op.add_column(table, sa.Column("vo", sa.String(64)))


def downgrade() -> None:
    for table in ("jobs", "jobs_archive"):
        op.drop_column(table, "vo")
