"""The database schema (SQLAlchemy Core tables) and engine creation for SQLite, PostgreSQL, MariaDB.

Core, not the ORM, on purpose: the dispatcher's hot path (pick a job, mark it sent, record
history) costs about 5x less client CPU with Core statements (../shared/notes/measured-limits.md),
and every module here works with plain rows and dicts anyway.
"""
from __future__ import annotations

import logging

from sqlalchemy import (JSON, BigInteger, Column, DateTime, Float, Index, Integer, MetaData,
                        String, Table, Text, UniqueConstraint, create_engine, event)
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

metadata = MetaData()

# BigInteger ids that are still auto-incrementing INTEGER PRIMARY KEY on SQLite
Id = BigInteger().with_variant(Integer(), "sqlite")

tasks = Table(
    "tasks", metadata,
    Column("task_id", Id, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False),
    Column("status", String(32), nullable=False),
    Column("owner", String(255), nullable=False),
    Column("priority", Integer, nullable=False, default=1000),
    Column("share", String(64), nullable=False, default="default"),
    Column("site", String(128)),
    Column("max_attempts", Integer, nullable=False, default=3),
    Column("params", JSON, nullable=False),
    Column("error_dialog", Text),
    Column("created", DateTime, nullable=False),
    Column("modified", DateTime, nullable=False),
    Index("ix_tasks_owner", "owner"),
    Index("ix_tasks_modified", "modified"),
)

# the columns of a job; shared by the live table and its archive
def _job_columns() -> list[Column]:
    return [
        Column("panda_id", Id, primary_key=True, autoincrement=True),
        Column("task_id", BigInteger, nullable=False),
        Column("serial", Integer, nullable=False),         # job number within the task
        Column("attempt_nr", Integer, nullable=False, default=1),
        Column("max_attempts", Integer, nullable=False, default=3),
        Column("parent_id", BigInteger),                  # the job this one retries
        Column("status", String(32), nullable=False),
        Column("site", String(128)),
        Column("owner", String(255), nullable=False),
        Column("prod_source_label", String(32), nullable=False, default="managed"),
        Column("share", String(64), nullable=False, default="default"),
        Column("priority", Integer, nullable=False, default=1000),      # assigned priority
        Column("current_priority", Integer, nullable=False, default=1000),
        Column("transformation", Text, nullable=False),
        Column("job_pars", Text, nullable=False),
        Column("cores", Integer, nullable=False, default=1),
        Column("memory_mb", Integer, nullable=False, default=0),
        Column("walltime_s", Integer, nullable=False, default=0),
        Column("disk_mb", Integer, nullable=False, default=0),
        Column("pilot_version", String(64)),              # required pilot version, if any
        Column("transfer_type", String(16)),              # "direct": read input in place
        Column("command", String(64)),                    # pending command for the pilot
        Column("creation_time", DateTime, nullable=False),
        Column("modification_time", DateTime, nullable=False),
        Column("state_changed", DateTime, nullable=False),
        Column("start_time", DateTime),
        Column("end_time", DateTime),
        Column("heartbeat_time", DateTime),
        Column("node", String(255)),
        Column("pilot_id", String(512)),
        Column("batch_id", String(255)),
        Column("pilot_owner", String(255)),               # identity that took the job
        Column("pilot_error_code", Integer, nullable=False, default=0),
        Column("pilot_error_diag", Text),
        Column("trans_exit_code", Integer),
        Column("exe_error_code", Integer, nullable=False, default=0),
        Column("exe_error_diag", Text),
        Column("dispatcher_error_code", Integer, nullable=False, default=0),
        Column("dispatcher_error_diag", Text),
        Column("task_buffer_error_code", Integer, nullable=False, default=0),
        Column("task_buffer_error_diag", Text),
        Column("cpu_consumption_time", Float),
        Column("max_rss", BigInteger),
        Column("n_events", BigInteger),
        Column("job_metrics", Text),
    ]


jobs = Table(
    "jobs", metadata, *_job_columns(),
    # the dispatcher's query: activated jobs of a site, best first
    Index("ix_jobs_dispatch", "site", "status", "current_priority"),
    Index("ix_jobs_task", "task_id"),
    Index("ix_jobs_status_changed", "status", "state_changed"),
)

jobs_archive = Table(
    "jobs_archive", metadata, *[c._copy() for c in _job_columns()],
    Index("ix_jobs_archive_task", "task_id"),
)
# archived rows keep their ids: no autoincrement there
jobs_archive.c.panda_id.autoincrement = False

files = Table(
    "files", metadata,
    Column("row_id", Id, primary_key=True, autoincrement=True),
    Column("panda_id", BigInteger, nullable=False),
    Column("task_id", BigInteger, nullable=False),
    Column("type", String(8), nullable=False),          # input | output | log
    Column("scope", String(255), nullable=False),
    Column("lfn", String(255), nullable=False),
    Column("dataset", String(255), nullable=False),
    Column("guid", String(64)),
    Column("fsize", BigInteger),
    Column("checksum", String(64)),                    # "ad:xxxxxxxx" or "md5:..."
    Column("status", String(16), nullable=False),      # defined | ready | missing | failed
    Column("ddm_endpoint", String(128)),
    Index("ix_files_panda", "panda_id"),
)

datasets = Table(
    "datasets", metadata,
    Column("name", String(255), primary_key=True),
    Column("scope", String(255), nullable=False),
    Column("created", DateTime, nullable=False),
)

dataset_files = Table(
    "dataset_files", metadata,
    Column("row_id", Id, primary_key=True, autoincrement=True),
    Column("dataset", String(255), nullable=False),
    Column("scope", String(255), nullable=False),
    Column("lfn", String(255), nullable=False),
    Column("guid", String(64), nullable=False),
    Column("fsize", BigInteger),
    Column("checksum", String(64)),
    Column("task_id", BigInteger),                     # the task that consumed it, if any
    Column("created", DateTime, nullable=False),
    UniqueConstraint("dataset", "scope", "lfn", name="uq_dataset_file"),
)

replicas = Table(
    "replicas", metadata,
    Column("row_id", Id, primary_key=True, autoincrement=True),
    Column("scope", String(255), nullable=False),
    Column("lfn", String(255), nullable=False),
    Column("ddm_endpoint", String(128), nullable=False),
    Column("surl", Text),
    Column("created", DateTime, nullable=False),
    UniqueConstraint("scope", "lfn", "ddm_endpoint", name="uq_replica"),
)

sites = Table(
    "sites", metadata,
    Column("name", String(128), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("config", JSON, nullable=False),
    Column("updated", DateTime, nullable=False),
)

job_history = Table(
    "job_history", metadata,
    Column("row_id", Id, primary_key=True, autoincrement=True),
    Column("panda_id", BigInteger, nullable=False),
    Column("old_status", String(32)),
    Column("new_status", String(32), nullable=False),
    Column("time", DateTime, nullable=False),
    Column("actor", String(255)),
    Index("ix_history_panda", "panda_id"),
)

pilots = Table(
    "pilots", metadata,
    Column("row_id", Id, primary_key=True, autoincrement=True),
    Column("factory", String(255), nullable=False),
    Column("batch_id", String(255), nullable=False),
    Column("site", String(128), nullable=False),
    Column("backend", String(64)),
    Column("state", String(16), nullable=False),
    Column("submitted", DateTime),
    Column("updated", DateTime, nullable=False),
    Column("exit_code", Integer),
    UniqueConstraint("factory", "batch_id", name="uq_pilot"),
)

factories = Table(
    "factories", metadata,
    Column("name", String(255), primary_key=True),
    Column("last_seen", DateTime, nullable=False),
    Column("actor", String(255)),
)


def make_engine(url: str, pool_size: int = 10, echo: bool = False) -> Engine:
    """Create an engine with settings that suit a dispatcher on each backend.

    SQLite: WAL and a busy timeout so several server processes can share one file.
    MariaDB: READ COMMITTED, since REPEATABLE READ deadlocks under SKIP LOCKED.
    """
    kwargs: dict = {"echo": echo, "future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
                      pool_recycle=3600)
    if url.startswith(("mysql", "mariadb")):
        kwargs["isolation_level"] = "READ COMMITTED"
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            # let BEGIN IMMEDIATE be issued by us: one writer at a time, no lock upgrades
            dbapi_conn.isolation_level = None

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # pragma: no cover - trivial
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    return engine


def create_schema(engine: Engine) -> None:
    """Create every table that does not exist yet (``panda db upgrade`` runs migrations)."""
    metadata.create_all(engine)
