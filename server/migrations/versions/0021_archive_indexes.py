"""The archive's ``archived_at`` indexes only where something reads them: SQLite.

Why: every archived row paid an entry in ``ix_jobs_archive_archived``, ``ix_files_archive_archived``
and ``ix_history_archive_archived`` (3 of the 20 index entries a job with 3 files and 1 history
row writes into the archive, ~12 % of the archiver's WAL) and no query used them on PostgreSQL
or MariaDB: there the tables are partitioned by month of ``archived_at``, retention drops whole
partitions, and the readers look archived rows up by PandaID, task or time of modification.
SQLite has no partitions: its retention deletes by ``archived_at`` and keeps the indexes.

Revision ID: 0021_archive_indexes
Revises: 0020_archive_tiers
Create Date: 2026-12-04
"""
from __future__ import annotations

from alembic import op

revision = "0021_archive_indexes"
down_revision = "0020_archive_tiers"
branch_labels = None
depends_on = None

INDEXES = {"jobs_archive": "ix_jobs_archive_archived",
           "files_archive": "ix_files_archive_archived",
           "job_history_archive": "ix_history_archive_archived"}


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, name in INDEXES.items():
        op.drop_index(name, table_name=table)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, name in INDEXES.items():
        op.create_index(name, table, ["archived_at"])
