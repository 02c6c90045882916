"""The event service: a job's role (PanDA's ``eventService`` column: 1 a consumer of its task's
event ranges, 2 the merge job) and, per event range, the output file the pilot stored for it.

Revision ID: 0008_event_service
Revises: 0007_monitor
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_event_service"
down_revision = "0007_monitor"
branch_labels = None
depends_on = None

_RANGE_COLUMNS = (("out_lfn", sa.String(255)), ("out_fsize", sa.BigInteger()),
                  ("out_checksum", sa.String(64)), ("out_endpoint", sa.String(128)))


def upgrade() -> None:
    for table in ("jobs", "jobs_archive"):
        op.add_column(table, sa.Column("event_service", sa.SmallInteger(), nullable=True))
    for name, type_ in _RANGE_COLUMNS:
        op.add_column("event_ranges", sa.Column(name, type_, nullable=True))
    op.create_index("ix_event_ranges_holder", "event_ranges", ["panda_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_event_ranges_holder", table_name="event_ranges")
    with op.batch_alter_table("event_ranges") as batch:
        for name, _ in _RANGE_COLUMNS:
            batch.drop_column(name)
    for table in ("jobs", "jobs_archive"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("event_service")
