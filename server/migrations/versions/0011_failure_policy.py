"""The failure policy: sites set to ``test`` automatically, and sites a job must not go back to.

``sites.auto_status`` / ``auto_reason`` / ``auto_changed``: a status the server set itself (the
site failed too many jobs for its own reasons), kept apart from the site config's ``status`` so
that ``panda sites sync`` does not erase it. ``jobs.excluded_sites`` (and the archive's): a JSON
list of the sites earlier attempts of the job failed at for the site's reasons; the retry is
brokered elsewhere (server/failurepolicy.py).

Revision ID: 0011_failure_policy
Revises: 0010_tokens
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_failure_policy"
down_revision = "0010_tokens"
branch_labels = None
depends_on = None


def _ts():
    from sqlalchemy.dialects import mysql
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.add_column("sites", sa.Column("auto_status", sa.String(16)))
    op.add_column("sites", sa.Column("auto_reason", sa.Text()))
    op.add_column("sites", sa.Column("auto_changed", _ts()))
    for table in ("jobs", "jobs_archive"):
        op.add_column(table, sa.Column("excluded_sites", sa.Text()))


def downgrade() -> None:
    for table in ("jobs", "jobs_archive"):
        op.drop_column(table, "excluded_sites")
    for col in ("auto_changed", "auto_reason", "auto_status"):
        op.drop_column("sites", col)
