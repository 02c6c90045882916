"""Job counters: jobs and cores per (site, share, status), kept by triggers on ``jobs``.

Why: the share ranking (every getJob's dispatch order), the brokerage's site load, ``/`` and
``/metrics`` counted the jobs table with a GROUP BY; at a million rows that is a sequential scan
on the request path (issue 19). Now every INSERT, DELETE and every UPDATE that changes a job's
status, site, share or cores appends its +1/-1 to ``job_count_deltas`` in the same transaction
(database triggers: every writer is covered, the set-based ones and the archiver included), and
``job_counts`` holds the folded sums. Appending, not updating a counter row, is what keeps
dispatchers from queueing behind one hot row; ``taskbuffer.counts.JobCounts`` folds the deltas
in and reads counts plus deltas in one statement (exact at any moment). docs/database.md.

PostgreSQL: statement-level INSERT/DELETE triggers over transition tables (a set-based insert of
a million jobs appends one row per (site, share, status)), a row-level UPDATE trigger whose
WHEN clause skips heartbeats without calling the function. MariaDB and SQLite: row triggers.

Also ``ix_jobs_waiting`` (status, panda_id) over assigned and activated jobs (partial on
PostgreSQL and SQLite; none on MariaDB): the priority recompute walks the queue through it a batch at a time.

Revision ID: 0018_job_counts
Revises: 0017_vo
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018_job_counts"
down_revision = "0017_vo"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_CHANGED = ("OLD.status IS DISTINCT FROM NEW.status OR OLD.site IS DISTINCT FROM NEW.site "
            "OR OLD.share IS DISTINCT FROM NEW.share OR OLD.cores IS DISTINCT FROM NEW.cores")
_INSERT = "INSERT INTO job_count_deltas (site, share, status, n, cores) "

POSTGRES = [
    f"""CREATE FUNCTION panda_job_counts_ins() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  {_INSERT}SELECT COALESCE(site, ''), share, status, count(*), sum(cores)
    FROM new_rows GROUP BY 1, 2, 3;
  RETURN NULL;
END $$""",
    f"""CREATE FUNCTION panda_job_counts_del() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  {_INSERT}SELECT COALESCE(site, ''), share, status, -count(*), -sum(cores)
    FROM old_rows GROUP BY 1, 2, 3;
  RETURN NULL;
END $$""",
    f"""CREATE FUNCTION panda_job_counts_upd() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  {_INSERT}VALUES (COALESCE(OLD.site, ''), OLD.share, OLD.status, -1, -OLD.cores),
                  (COALESCE(NEW.site, ''), NEW.share, NEW.status, 1, NEW.cores);
  RETURN NULL;
END $$""",
    "CREATE TRIGGER jobs_counts_ins AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION panda_job_counts_ins()",
    "CREATE TRIGGER jobs_counts_del AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION panda_job_counts_del()",
    f"CREATE TRIGGER jobs_counts_upd AFTER UPDATE ON jobs FOR EACH ROW WHEN ({_CHANGED}) "
    "EXECUTE FUNCTION panda_job_counts_upd()",
]
POSTGRES_DROP = [
    "DROP TRIGGER IF EXISTS jobs_counts_ins ON jobs",
    "DROP TRIGGER IF EXISTS jobs_counts_del ON jobs",
    "DROP TRIGGER IF EXISTS jobs_counts_upd ON jobs",
    "DROP FUNCTION IF EXISTS panda_job_counts_ins()",
    "DROP FUNCTION IF EXISTS panda_job_counts_del()",
    "DROP FUNCTION IF EXISTS panda_job_counts_upd()",
]

MARIADB = [
    f"CREATE TRIGGER jobs_counts_ins AFTER INSERT ON jobs FOR EACH ROW "
    f"{_INSERT}VALUES (COALESCE(NEW.site, ''), NEW.share, NEW.status, 1, NEW.cores)",
    f"CREATE TRIGGER jobs_counts_del AFTER DELETE ON jobs FOR EACH ROW "
    f"{_INSERT}VALUES (COALESCE(OLD.site, ''), OLD.share, OLD.status, -1, -OLD.cores)",
    f"""CREATE TRIGGER jobs_counts_upd AFTER UPDATE ON jobs FOR EACH ROW
BEGIN
  IF NOT (OLD.status <=> NEW.status AND OLD.site <=> NEW.site AND OLD.share <=> NEW.share
          AND OLD.cores <=> NEW.cores) THEN
    {_INSERT}VALUES (COALESCE(OLD.site, ''), OLD.share, OLD.status, -1, -OLD.cores),
                    (COALESCE(NEW.site, ''), NEW.share, NEW.status, 1, NEW.cores);
  END IF;
END""",
]

SQLITE = [
    f"""CREATE TRIGGER jobs_counts_ins AFTER INSERT ON jobs BEGIN
  {_INSERT}VALUES (COALESCE(NEW.site, ''), NEW.share, NEW.status, 1, NEW.cores);
END""",
    f"""CREATE TRIGGER jobs_counts_del AFTER DELETE ON jobs BEGIN
  {_INSERT}VALUES (COALESCE(OLD.site, ''), OLD.share, OLD.status, -1, -OLD.cores);
END""",
    f"""CREATE TRIGGER jobs_counts_upd AFTER UPDATE OF status, site, share, cores ON jobs
WHEN {_CHANGED.replace("IS DISTINCT FROM", "IS NOT")} BEGIN
  {_INSERT}VALUES (COALESCE(OLD.site, ''), OLD.share, OLD.status, -1, -OLD.cores);
  {_INSERT}VALUES (COALESCE(NEW.site, ''), NEW.share, NEW.status, 1, NEW.cores);
END""",
]

TRIGGERS = ("jobs_counts_ins", "jobs_counts_del", "jobs_counts_upd")

BACKFILL = ("INSERT INTO job_counts (site, share, status, n, cores) "
            "SELECT COALESCE(site, ''), share, status, count(*), COALESCE(sum(cores), 0) "
            "FROM jobs GROUP BY COALESCE(site, ''), share, status")


def upgrade() -> None:
    op.create_table(
        "job_counts",
        sa.Column("site", sa.String(128), primary_key=True),
        sa.Column("share", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(32), primary_key=True),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("cores", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "job_count_deltas",
        sa.Column("row_id", Id, primary_key=True, autoincrement=True),
        sa.Column("site", sa.String(128), nullable=False),
        sa.Column("share", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("cores", sa.BigInteger(), nullable=False),
    )
    name = op.get_bind().dialect.name
    if name == "postgresql":
        # writers wait while the triggers appear and the counts are filled: nothing is missed
        op.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
        statements = POSTGRES
    elif name in ("mysql", "mariadb"):
        statements = MARIADB
    else:
        statements = SQLITE
    for stmt in statements:
        op.execute(stmt)
    op.execute(BACKFILL)
    waiting = sa.text("status IN ('assigned', 'activated')")
    if name in ("postgresql", "sqlite"):     # partial only: see server/db.py
        op.create_index("ix_jobs_waiting", "jobs", ["status", "panda_id"],
                        postgresql_where=waiting, sqlite_where=waiting)


def downgrade() -> None:
    if op.get_bind().dialect.name in ("postgresql", "sqlite"):
        op.drop_index("ix_jobs_waiting", table_name="jobs")
    name = op.get_bind().dialect.name
    if name == "postgresql":
        for stmt in POSTGRES_DROP:
            op.execute(stmt)
    else:
        for trigger in TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    op.drop_table("job_count_deltas")
    op.drop_table("job_counts")
