"""Revoked bearer tokens: one row per revoked ``jti`` until the token would have expired.

Revision ID: 0010_tokens
Revises: 0009_aggregation
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_tokens"
down_revision = "0009_aggregation"
branch_labels = None
depends_on = None


def _ts():
    from sqlalchemy.dialects import mysql
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "revoked_tokens",
        sa.Column("jti", sa.String(255), primary_key=True),
        sa.Column("subject", sa.String(255)),
        sa.Column("expires", _ts(), nullable=False),
        sa.Column("revoked_at", _ts(), nullable=False),
        sa.Column("revoked_by", sa.String(255), nullable=False),
        sa.Column("reason", sa.String(255)),
    )
    op.create_index("ix_revoked_tokens_expires", "revoked_tokens", ["expires"])


def downgrade() -> None:
    op.drop_index("ix_revoked_tokens_expires", "revoked_tokens")
    op.drop_table("revoked_tokens")
