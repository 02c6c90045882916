"""Data has owners (``server/taskbuffer/owners.py``): scopes with their owner account (or production),
datasets with the account that created them, and an index to find one lfn's catalogue entries
in every dataset (an existing lfn registered with another checksum is refused).

Revision ID: 0019_data_owners
Revises: 0018_job_counts
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019_data_owners"
down_revision = "0018_job_counts"
branch_labels = None
depends_on = None


def _ts():
    from sqlalchemy.dialects import mysql
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "scopes",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("production", sa.Boolean(), nullable=False),
        sa.Column("created", _ts(), nullable=False),
    )
    op.add_column("datasets", sa.Column("owner", sa.String(255), nullable=True))
    op.create_index("ix_dataset_files_lfn", "dataset_files", ["scope", "lfn"])


def downgrade() -> None:
    op.drop_index("ix_dataset_files_lfn", table_name="dataset_files")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("owner")
    op.drop_table("scopes")
