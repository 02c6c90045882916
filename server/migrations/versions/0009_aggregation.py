"""Output aggregation: a job's outputs may go on to its task's destination storage element.

``jobs.destination_se`` (and the archive's) names it; such a job finishes into ``transferring``
and the data service ends it once its outputs are there (server/dataservice.py).

Revision ID: 0009_aggregation
Revises: 0008_event_service
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_aggregation"
down_revision = "0008_event_service"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("jobs", "jobs_archive"):
        op.add_column(table, sa.Column("destination_se", sa.String(255)))


def downgrade() -> None:
    for table in ("jobs", "jobs_archive"):
        op.drop_column(table, "destination_se")
