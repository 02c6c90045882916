"""The dispatch index in the dispatch order: (site, status, current_priority DESC, panda_id).

getJob asks for the best activated job of a site, ``ORDER BY current_priority DESC, panda_id``.
With the old (site, status, current_priority) index the database read every activated job of
the site and sorted them on each request; with the order in the index it reads the first
unlocked entry.

Revision ID: 0004
Revises: srvlogic1
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "srvlogic1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_dispatch_order", "jobs",
                    ["site", "status", sa.text("current_priority DESC"), "panda_id"])
    op.drop_index("ix_jobs_dispatch", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_dispatch", "jobs", ["site", "status", "current_priority"])
    op.drop_index("ix_jobs_dispatch_order", table_name="jobs")
