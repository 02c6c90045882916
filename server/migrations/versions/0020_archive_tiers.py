"""The archive tier: jobs_archive gets ``archived_at`` and siblings for files and history
(files_archive, job_history_archive); on PostgreSQL the three are partitioned by month of
``archived_at`` (declarative), on MariaDB by RANGE month partitions, on SQLite plain tables.

The existing jobs_archive is rebuilt with its rows (``archived_at`` := their ``state_changed``),
and the files and history of already archived jobs move over. Downgrade moves everything back.

Revision ID: 0020_archive_tiers
Revises: 0019_data_owners
Create Date: 2026-12-04
"""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

from server import archivetiers

revision = "0020_archive_tiers"
down_revision = "0019_data_owners"
branch_labels = None
depends_on = None

_KEYS = {"jobs_archive": "panda_id", "files_archive": "row_id",
         "job_history_archive": "row_id"}
_LIVE = {"files_archive": "files", "job_history_archive": "job_history"}
_INDEXES = {"files_archive": [("ix_files_archive_panda", ["panda_id"]),
                              ("ix_files_archive_task", ["task_id"])],
            "job_history_archive": [("ix_history_archive_panda", ["panda_id"])]}
_ARCHIVED_INDEX = {"jobs_archive": "ix_jobs_archive_archived",
                   "files_archive": "ix_files_archive_archived",
                   "job_history_archive": "ix_history_archive_archived"}


def _columns(bind, table: str) -> list[sa.Column]:
    return [sa.Column(c["name"], c["type"], nullable=c["nullable"])
            for c in sa.inspect(bind).get_columns(table)]


def _names(bind, table: str) -> list[str]:
    return [c["name"] for c in sa.inspect(bind).get_columns(table)]


def _create_archive(bind, name: str, like: str, months: list[dt.date]) -> None:
    """Create ``name`` with the columns of ``like`` plus ``archived_at`` and the primary key
    (key, archived_at), partitioned by month where the database can."""
    key, dialect = _KEYS[name], bind.dialect.name
    if dialect == "postgresql":
        op.execute(f"CREATE TABLE {name} (LIKE {like} INCLUDING DEFAULTS INCLUDING CONSTRAINTS, "
                   f"archived_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, "
                   f"CONSTRAINT {name}_pkey PRIMARY KEY ({key}, archived_at)) "
                   f"PARTITION BY RANGE (archived_at)")
        for month in months:
            archivetiers.create_month(bind, name, month)
    elif dialect in ("mysql", "mariadb"):
        op.execute(f"CREATE TABLE {name} LIKE {like}")
        for ix in sa.inspect(bind).get_indexes(name):    # LIKE copied them: made again below
            op.execute(f"ALTER TABLE {name} DROP INDEX {ix['name']}")
        op.execute(f"ALTER TABLE {name} MODIFY {key} BIGINT NOT NULL, "
                   f"ADD COLUMN archived_at DATETIME(6) NOT NULL, DROP PRIMARY KEY, "
                   f"ADD PRIMARY KEY ({key}, archived_at)")
        op.execute(f"ALTER TABLE {name} {archivetiers.mariadb_partition_clause(months)}")
    else:
        cols = [c for c in _columns(bind, like)]
        for c in cols:
            c.primary_key = c.name == key
            c.autoincrement = False
        op.create_table(name, *cols, sa.Column("archived_at", sa.DateTime(), primary_key=True,
                                               nullable=False))


def _months(bind) -> list[dt.date]:
    """The months the old archive spans, up to next month (contiguous: MariaDB needs that)."""
    oldest = bind.execute(sa.text("SELECT MIN(state_changed) FROM jobs_archive")).scalar()
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    if isinstance(oldest, str):
        oldest = dt.datetime.fromisoformat(oldest)
    first = archivetiers.month_start(min(oldest or now, now))
    last = archivetiers.add_months(archivetiers.month_start(now), 1)
    months, m = [], first
    while m <= last:
        months.append(m)
        m = archivetiers.add_months(m, 1)
    return months


def _sqlite_never_reuse_ids(bind, table: str, key: str, archive: str, archive_key: str) -> None:
    """SQLite gives a new row max(rowid)+1 unless the key is AUTOINCREMENT: once the newest
    jobs moved to the archive, new jobs (files, history rows) would get their ids. Rebuild
    ``table`` with AUTOINCREMENT (same columns, same index statements) and start its sequence
    after every id ever given, archived ones included."""
    sql = bind.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND "
                               f"name = '{table}'").scalar()
    if "AUTOINCREMENT" in sql.upper():
        return
    # its indexes and triggers (0018_job_counts counts jobs by triggers) are made again as were
    indexes = bind.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type IN ('index', "
                                   f"'trigger') AND tbl_name = '{table}' AND sql IS NOT NULL "
                                   "ORDER BY type").scalars().all()
    head, sep, tail = sql.partition(f"{key} INTEGER NOT NULL")
    body, pk_sep, rest = tail.rpartition(f"PRIMARY KEY ({key})")
    if not sep or not pk_sep:
        raise RuntimeError(f"{table} table of an unexpected shape: " + sql[:200])
    new_sql = (head.replace(f"CREATE TABLE {table}", f"CREATE TABLE {table}_rebuilt", 1)
               + f"{key} INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT"
               + body.rstrip().rstrip(",") + rest)
    op.execute(new_sql)
    op.execute(f"INSERT INTO {table}_rebuilt SELECT * FROM {table}")
    op.execute(f"DROP TABLE {table}")
    op.execute(f"ALTER TABLE {table}_rebuilt RENAME TO {table}")
    for statement in indexes:
        op.execute(statement)
    op.execute(f"DELETE FROM sqlite_sequence WHERE name = '{table}'")
    op.execute(f"INSERT INTO sqlite_sequence (name, seq) SELECT '{table}', MAX(m) FROM ("
               f"SELECT COALESCE(MAX({key}), 0) AS m FROM {table} UNION ALL "
               f"SELECT COALESCE(MAX({archive_key}), 0) FROM {archive})")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        _sqlite_never_reuse_ids(bind, "jobs", "panda_id", "jobs_archive", "panda_id")
        # the history and files of archived jobs are still in the live tables here
        _sqlite_never_reuse_ids(bind, "files", "row_id", "files", "row_id")
        _sqlite_never_reuse_ids(bind, "job_history", "row_id", "job_history", "row_id")
    months = _months(bind)
    old_indexes = sa.inspect(bind).get_indexes("jobs_archive")
    for ix in old_indexes:
        op.drop_index(ix["name"], table_name="jobs_archive")
    op.rename_table("jobs_archive", "jobs_archive_old")
    if bind.dialect.name == "postgresql":
        op.execute("ALTER TABLE jobs_archive_old RENAME CONSTRAINT jobs_archive_pkey "
                   "TO jobs_archive_old_pkey")
    _create_archive(bind, "jobs_archive", "jobs_archive_old", months)
    _create_archive(bind, "files_archive", "files", months)
    _create_archive(bind, "job_history_archive", "job_history", months)
    for ix in old_indexes:
        op.create_index(ix["name"], "jobs_archive", ix["column_names"])
    for name, indexes in _INDEXES.items():
        for ix_name, cols in indexes:
            op.create_index(ix_name, name, cols)
    for name, ix_name in _ARCHIVED_INDEX.items():
        op.create_index(ix_name, name, ["archived_at"])

    cols = ", ".join(_names(bind, "jobs_archive_old"))
    op.execute(f"INSERT INTO jobs_archive ({cols}, archived_at) "
               f"SELECT {cols}, state_changed FROM jobs_archive_old")
    op.drop_table("jobs_archive_old")
    for name, live in _LIVE.items():
        cols = ", ".join(f"l.{c}" for c in _names(bind, live))
        op.execute(f"INSERT INTO {name} ({cols.replace('l.', '')}, archived_at) "
                   f"SELECT {cols}, a.archived_at FROM {live} l "
                   f"JOIN jobs_archive a ON a.panda_id = l.panda_id")
        op.execute(f"DELETE FROM {live} WHERE panda_id IN (SELECT panda_id FROM jobs_archive)")


def downgrade() -> None:
    bind = op.get_bind()
    for name, live in _LIVE.items():
        cols = ", ".join(_names(bind, live))
        op.execute(f"INSERT INTO {live} ({cols}) SELECT {cols} FROM {name}")
        op.drop_table(name)
    names = [n for n in _names(bind, "jobs_archive") if n != "archived_at"]
    indexes = [ix for ix in sa.inspect(bind).get_indexes("jobs_archive")
               if ix["name"] != _ARCHIVED_INDEX["jobs_archive"]]
    for ix in sa.inspect(bind).get_indexes("jobs_archive"):
        op.drop_index(ix["name"], table_name="jobs_archive")
    op.rename_table("jobs_archive", "jobs_archive_new")
    if bind.dialect.name == "postgresql":
        op.execute("ALTER TABLE jobs_archive_new RENAME CONSTRAINT jobs_archive_pkey "
                   "TO jobs_archive_new_pkey")
    cols = {c.name: c for c in _columns(bind, "jobs_archive_new")}
    table_cols = [cols[n] for n in names]
    for c in table_cols:
        c.primary_key = c.name == "panda_id"
        c.autoincrement = False
    op.create_table("jobs_archive", *table_cols)
    for ix in indexes:
        op.create_index(ix["name"], "jobs_archive", ix["column_names"])
    joined = ", ".join(names)
    op.execute(f"INSERT INTO jobs_archive ({joined}) SELECT {joined} FROM jobs_archive_new")
    op.drop_table("jobs_archive_new")   # on PostgreSQL this drops its partitions too
