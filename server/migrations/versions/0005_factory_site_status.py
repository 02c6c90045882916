"""Factories report per site whether they are feeding it and why not: keep it for the status page.

Revision ID: 0005
Revises: srvlogic2
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "srvlogic2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("factories", sa.Column("site_status", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("factories", "site_status")
