"""The share-aware dispatch index: (site, status, share, current_priority DESC, panda_id).

With several shares waiting at a site, the dispatcher asks for the best job of one share at a
time (server/shares.py, ShareChooser.plan); this index answers each ask with the first entry of
a range instead of a sort of the site's activated jobs.

Revision ID: srvlogic2
Revises: 0004
Create Date: 2026-11-23
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "srvlogic2"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_share_dispatch", "jobs",
                    ["site", "status", "share", sa.text("current_priority DESC"), "panda_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_share_dispatch", table_name="jobs")
