"""The dispatch indexes hold activated jobs only (PostgreSQL, SQLite: partial indexes).

Every later state change of a job (sent, running, holding, finished) used to add an entry to
both dispatch indexes; now they only ever hold the queue. MariaDB has no partial indexes and
keeps the full ones.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_INDEXES = {
    "ix_jobs_dispatch_order": ["site", "status", sa.text("current_priority DESC"), "panda_id"],
    "ix_jobs_share_dispatch": ["site", "status", "share", sa.text("current_priority DESC"),
                               "panda_id"],
}


def _recreate(partial: bool) -> None:
    if op.get_bind().dialect.name not in ("postgresql", "sqlite"):
        return
    where = sa.text("status = 'activated'") if partial else None
    for name, cols in _INDEXES.items():
        op.drop_index(name, table_name="jobs")
        op.create_index(name, "jobs", cols, postgresql_where=where, sqlite_where=where)


def upgrade() -> None:
    _recreate(partial=True)


def downgrade() -> None:
    _recreate(partial=False)
