"""The database schema (SQLAlchemy Core tables) and engine creation for SQLite, PostgreSQL, MariaDB.

Core, not the ORM, on purpose: the dispatcher's hot path (pick a job, mark it sent, record
history) costs about 5x less client CPU with Core statements (../shared/notes/measured-limits.md),
and every module here works with plain rows and dicts anyway.
"""
from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import (JSON, BigInteger, Boolean, Column, DateTime, Float, Index, Integer, MetaData,
                        SmallInteger,
                        String, Table, Text, UniqueConstraint, create_engine, event, inspect,
                        literal_column, text)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Engine

from .transient import is_connection_lost

log = logging.getLogger(__name__)

metadata = MetaData()

# BigInteger ids that are still auto-incrementing INTEGER PRIMARY KEY on SQLite
Id = BigInteger().with_variant(Integer(), "sqlite")
# MariaDB's DATETIME drops fractions of a second unless asked: keep microseconds everywhere
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

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
    Column("created", Timestamp, nullable=False),
    Column("modified", Timestamp, nullable=False),
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
        Column("creation_time", Timestamp, nullable=False),
        Column("modification_time", Timestamp, nullable=False),
        Column("state_changed", Timestamp, nullable=False),
        Column("start_time", Timestamp),
        Column("end_time", Timestamp),
        Column("heartbeat_time", Timestamp),
        Column("node", String(255)),
        Column("pilot_id", String(512)),
        Column("batch_id", String(255)),
        Column("pilot_owner", String(255)),               # identity that took the job
        Column("pilot_nonce", String(64)),                # sha256 of its getJob's pilotNonce
        Column("pilot_error_code", Integer, nullable=False, default=0),
        Column("pilot_error_diag", Text),
        Column("trans_exit_code", Integer),
        Column("exe_error_code", Integer, nullable=False, default=0),
        Column("exe_error_diag", Text),
        Column("dispatcher_error_code", Integer, nullable=False, default=0),
        Column("dispatcher_error_diag", Text),
        Column("ddm_error_code", Integer, nullable=False, default=0),     # data service
        Column("ddm_error_diag", Text),
        Column("task_buffer_error_code", Integer, nullable=False, default=0),
        Column("task_buffer_error_diag", Text),
        Column("cpu_consumption_time", Float),
        Column("max_rss", BigInteger),
        Column("n_events", BigInteger),
        Column("job_metrics", Text),
        Column("working_group", String(64)),              # the task's working group, if any
        Column("vo", String(64)),                         # the task's virtual organisation
        Column("destination_se", String(255)),            # outputs go on to this SE (T1)
        Column("excluded_sites", Text),                   # JSON list: failed there (site's fault)
        Column("event_service", SmallInteger),            # PanDA's: 1 consumer, 2 merge job
        Column("debug_request", String(300)),             # debug mode: the view asked for
        Column("debug_view", Text),                       # the latest view the pilot sent (JSON)
        # the worker node as its pilot describes it (panda_core.workernode), for the monitor
        Column("wn_cpu_model", String(128)),
        Column("wn_cores", Integer),
        Column("wn_mem_mb", BigInteger),
        Column("wn_mem_available_mb", BigInteger),
        Column("wn_load1", Float),
        Column("wn_disk_free_mb", BigInteger),
        Column("wn_pilot_version", String(128)),
    ]


jobs = Table(
    "jobs", metadata, *_job_columns(),
    Index("ix_jobs_task_status", "task_id", "status"),
    Index("ix_jobs_status_changed", "status", "state_changed"),
    Index("ix_jobs_owner_created", "owner", "creation_time"),
    # archived jobs keep their PandaIDs: SQLite must never hand one out again (migration 0020)
    sqlite_autoincrement=True,
)

# The dispatcher's query: activated jobs of a site in dispatch order, read from the index. On
# PostgreSQL and SQLite both dispatch indexes hold activated jobs only (partial): a job's later
# state changes then add no entries to them, and they stay the size of the queue. Queries must
# say ``status = 'activated'`` as a literal to use them (taskbuffer.Jobs.pick_conditions does).
ACTIVATED_ONLY = jobs.c.status == literal_column("'activated'")
_ACTIVATED_INDEX = literal_column("status") == literal_column("'activated'")
Index("ix_jobs_dispatch_order", jobs.c.site, jobs.c.status, jobs.c.current_priority.desc(),
      jobs.c.panda_id, postgresql_where=_ACTIVATED_INDEX, sqlite_where=_ACTIVATED_INDEX)
# the share-aware dispatcher asks share by share (server/shares.py: ShareChooser.plan)
Index("ix_jobs_share_dispatch", jobs.c.site, jobs.c.status, jobs.c.share,
      jobs.c.current_priority.desc(), jobs.c.panda_id, postgresql_where=_ACTIVATED_INDEX,
      sqlite_where=_ACTIVATED_INDEX)

# the waiting queue in PandaID order: the priority recompute walks it a batch at a time
# (server/shares.py). Partial on PostgreSQL and SQLite (queries say both literal conditions,
# see WAITING_ONLY). Not on MariaDB: without partial indexes it would hold every job, and its
# optimizer then chose it to find a row to update, locking index ranges (deadlocks seen at 50
# pilots); there the walk reads the (status, state_changed) index.
_WAITING_INDEX = text("status IN ('assigned', 'activated')")
WAITING_ONLY = literal_column("status").in_([literal_column("'assigned'"),
                                             literal_column("'activated'")])
Index("ix_jobs_waiting", jobs.c.status, jobs.c.panda_id, postgresql_where=_WAITING_INDEX,
      sqlite_where=_WAITING_INDEX, info={"dialects": ("postgresql", "sqlite")}
      ).ddl_if(dialect=("postgresql", "sqlite"))

# the monitor's time windows and its "active jobs whatever the window" (server/monitor)
Index("ix_jobs_modified", jobs.c.modification_time)
Index("ix_jobs_status_modified", jobs.c.status, jobs.c.modification_time, jobs.c.site)

# The archive tier (server/archive.py, docs/database.md): a job's row, its files and its state
# history move here together, stamped with the time they moved (``archived_at``). On PostgreSQL
# the three tables are partitioned by month of ``archived_at`` (declarative partitioning, made
# by migration 0020 and the archiver), on MariaDB by RANGE month partitions, on SQLite plain
# tables; the partition key must be part of every unique key, hence the two-column primary keys.
jobs_archive = Table(
    "jobs_archive", metadata, *[c._copy() for c in _job_columns()],
    Column("archived_at", Timestamp, primary_key=True, nullable=False),
    Index("ix_jobs_archive_task", "task_id"),
    Index("ix_jobs_archive_modified", "modification_time"),
    Index("ix_jobs_archive_owner_created", "owner", "creation_time"),
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
    Index("ix_files_task", "task_id"),
    sqlite_autoincrement=True,      # archived rows keep their ids (see jobs)
)

datasets = Table(
    "datasets", metadata,
    Column("name", String(255), primary_key=True),
    Column("scope", String(255), nullable=False),
    Column("created", Timestamp, nullable=False),
    Column("owner", String(255)),                      # the account that created it
)

# who may write a scope (server/taskbuffer/owners.py); user.<name> scopes are made on first use
scopes = Table(
    "scopes", metadata,
    Column("name", String(255), primary_key=True),
    Column("owner", String(255), nullable=False),
    Column("production", Boolean, nullable=False, default=False),
    Column("created", Timestamp, nullable=False),
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
    Column("created", Timestamp, nullable=False),
    UniqueConstraint("dataset", "scope", "lfn", name="uq_dataset_file"),
    Index("ix_dataset_files_lfn", "scope", "lfn"),     # one lfn's entries in every dataset
)

replicas = Table(
    "replicas", metadata,
    Column("row_id", Id, primary_key=True, autoincrement=True),
    Column("scope", String(255), nullable=False),
    Column("lfn", String(255), nullable=False),
    Column("ddm_endpoint", String(128), nullable=False),
    Column("surl", Text),
    Column("created", Timestamp, nullable=False),
    UniqueConstraint("scope", "lfn", "ddm_endpoint", name="uq_replica"),
)

sites = Table(
    "sites", metadata,
    Column("name", String(128), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("config", JSON, nullable=False),
    Column("updated", Timestamp, nullable=False),
    Column("auto_status", String(16)),        # set by the failure policy ("test"), else NULL
    Column("auto_reason", Text),
    Column("auto_changed", Timestamp),
)

job_history = Table(
    "job_history", metadata,
    Column("row_id", Id, primary_key=True, autoincrement=True),
    Column("panda_id", BigInteger, nullable=False),
    Column("old_status", String(32)),
    Column("new_status", String(32), nullable=False),
    Column("time", Timestamp, nullable=False),
    Column("actor", String(255)),
    Index("ix_history_panda", "panda_id"),
    sqlite_autoincrement=True,      # archived rows keep their ids (see jobs)
)

# the files and the state history of archived jobs (see jobs_archive above)
files_archive = Table(
    "files_archive", metadata,
    *[c._copy() for c in files.columns],
    Column("archived_at", Timestamp, primary_key=True, nullable=False),
    Index("ix_files_archive_panda", "panda_id"),
    Index("ix_files_archive_task", "task_id"),
)
files_archive.c.row_id.autoincrement = False

job_history_archive = Table(
    "job_history_archive", metadata,
    *[c._copy() for c in job_history.columns],
    Column("archived_at", Timestamp, primary_key=True, nullable=False),
    Index("ix_history_archive_panda", "panda_id"),
)
job_history_archive.c.row_id.autoincrement = False

# SQLite's retention deletes old archive rows by ``archived_at``; PostgreSQL and MariaDB drop
# whole month partitions and read archived rows by other keys, so there these indexes would
# only cost every archived row an entry (migration 0021)
Index("ix_jobs_archive_archived", jobs_archive.c.archived_at,
      info={"dialects": ("sqlite",)}).ddl_if(dialect="sqlite")
Index("ix_files_archive_archived", files_archive.c.archived_at,
      info={"dialects": ("sqlite",)}).ddl_if(dialect="sqlite")
Index("ix_history_archive_archived", job_history_archive.c.archived_at,
      info={"dialects": ("sqlite",)}).ddl_if(dialect="sqlite")

# the quota counts per working group (server/quotas.py: running now, submitted in the last
# 24 h, live and archived), as (owner, creation_time) serves the per-user ones; without them
# each count read both tables whole. Partial on PostgreSQL and SQLite (a count always names its
# group, which implies the condition): jobs without a group add no entry (migration 0022)
_GROUP_INDEX = text("working_group IS NOT NULL")
Index("ix_jobs_group_created", jobs.c.working_group, jobs.c.creation_time,
      postgresql_where=_GROUP_INDEX, sqlite_where=_GROUP_INDEX)
Index("ix_jobs_archive_group_created", jobs_archive.c.working_group, jobs_archive.c.creation_time,
      postgresql_where=_GROUP_INDEX, sqlite_where=_GROUP_INDEX)

#: each live table with its archive tier, in the order the archiver copies them
ARCHIVE_TIERS = ((jobs, jobs_archive), (files, files_archive), (job_history, job_history_archive))

pilots = Table(
    "pilots", metadata,
    Column("row_id", Id, primary_key=True, autoincrement=True),
    Column("factory", String(255), nullable=False),
    Column("batch_id", String(255), nullable=False),
    Column("site", String(128), nullable=False),
    Column("backend", String(64)),
    Column("state", String(16), nullable=False),
    Column("submitted", Timestamp),
    Column("updated", Timestamp, nullable=False),
    Column("exit_code", Integer),
    UniqueConstraint("factory", "batch_id", name="uq_pilot"),
    Index("ix_pilots_updated", "updated"),
)

factories = Table(
    "factories", metadata,
    Column("name", String(255), primary_key=True),
    Column("last_seen", Timestamp, nullable=False),
    Column("actor", String(255)),
    # per site: {"submitting": bool, "reason": str, "consecutive_failures": int}
    Column("site_status", JSON),
)


# jobs and cores per (site, share, status), kept by triggers on ``jobs`` (migration 0018):
# every write appends its +1/-1 to job_count_deltas in its own transaction; JobCounts
# (taskbuffer/counts.py) folds them into job_counts and reads the sum of both. ``site`` is ''
# for jobs without one.
job_counts = Table(
    "job_counts", metadata,
    Column("site", String(128), primary_key=True),
    Column("share", String(64), primary_key=True),
    Column("status", String(32), primary_key=True),
    Column("n", BigInteger, nullable=False),
    Column("cores", BigInteger, nullable=False),
)

job_count_deltas = Table(
    "job_count_deltas", metadata,
    Column("row_id", Id, primary_key=True, autoincrement=True),
    Column("site", String(128), nullable=False),
    Column("share", String(64), nullable=False),
    Column("status", String(32), nullable=False),
    Column("n", BigInteger, nullable=False),
    Column("cores", BigInteger, nullable=False),
)


# nested global shares (server/shares.py): one row per share, value in % of its parent
global_shares = Table(
    "global_shares", metadata,
    Column("name", String(64), primary_key=True),
    Column("parent", String(64)),
    Column("value", Float, nullable=False),
    Column("position", Integer, nullable=False, default=0),
    Column("updated", Timestamp, nullable=False),
)

# event ranges of jobs split by events within a file (server/eventranges.py)
event_ranges = Table(
    "event_ranges", metadata,
    Column("row_id", Id, primary_key=True, autoincrement=True),
    Column("task_id", BigInteger, nullable=False),
    Column("serial", Integer, nullable=False),         # the job (all its attempts) they belong to
    Column("panda_id", BigInteger),                    # the attempt holding them now
    Column("scope", String(255), nullable=False),
    Column("lfn", String(255), nullable=False),
    Column("guid", String(64), nullable=False),
    Column("start_event", BigInteger, nullable=False),
    Column("last_event", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),      # ready | sent | running | finished | failed
    Column("attempt", Integer, nullable=False, default=0),
    Column("cpu_consumption_time", Float),
    Column("modified", Timestamp, nullable=False),
    # the event service: the output the pilot stored for the range (docs/eventranges.md)
    Column("out_lfn", String(255)),
    Column("out_fsize", BigInteger),
    Column("out_checksum", String(64)),
    Column("out_endpoint", String(128)),
    Index("ix_event_ranges_job", "task_id", "serial", "status"),
    Index("ix_event_ranges_holder", "panda_id", "status"),
)


# ---------------------------------------------------------------------- operations (server/monitor)
# the incidents logger: what the server's components logged at WARNING and above
incidents = Table(
    "incidents", metadata,
    Column("row_id", Id, primary_key=True, autoincrement=True),
    Column("time", Timestamp, nullable=False),
    Column("component", String(128), nullable=False),   # the logger's name
    Column("level", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("site", String(128)),
    Column("panda_id", BigInteger),
    Column("host", String(255)),
    Column("suppressed", Integer, nullable=False, default=0),   # similar ones the rate limit dropped
    Index("ix_incidents_time", "time"),
    Index("ix_incidents_component_time", "component", "time"),
)

# alarms: raised by the monitor's checks and the alarm/raise API; one open alarm per key
# quotas per user and per group (server/quotas.py)
quotas = Table(
    "quotas", metadata,
    Column("kind", String(16), primary_key=True),        # user | group
    Column("name", String(255), primary_key=True),       # token subject, group, or '*'
    Column("max_running", Integer),
    Column("max_per_day", Integer),
    Column("updated", Timestamp, nullable=False),
)

# messages to users that a task's ``notify`` asked for (server/notifications.py)
notifications = Table(
    "notifications", metadata,
    Column("notification_id", Id, primary_key=True, autoincrement=True),
    Column("event_key", String(255), nullable=False),     # "task:<id>:end:<target>", ...
    Column("task_id", BigInteger, nullable=False),
    Column("panda_id", BigInteger),
    Column("kind", String(16), nullable=False),           # task_end | job_error
    Column("channel", String(16), nullable=False),        # email | webhook
    Column("target", String(512), nullable=False),
    Column("subject", String(512), nullable=False),
    Column("body", Text, nullable=False),
    Column("state", String(16), nullable=False),          # pending | sending | sent | failed
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
    Column("created", Timestamp, nullable=False),
    Column("sent", Timestamp),
    UniqueConstraint("event_key", name="uq_notifications_event_key"),
    Index("ix_notifications_state", "state"),
)

alarms = Table(
    "alarms", metadata,
    Column("alarm_id", Id, primary_key=True, autoincrement=True),
    Column("key", String(255), nullable=False),
    Column("open_key", String(255)),        # = key while not cleared, NULL after: unique
    Column("source", String(64), nullable=False),
    Column("severity", String(16), nullable=False),      # warning | critical
    Column("title", String(255), nullable=False),
    Column("message", Text),
    Column("site", String(128)),
    Column("raised_by", String(255)),
    Column("state", String(16), nullable=False),         # active | acknowledged | cleared
    Column("first_raised", Timestamp, nullable=False),
    Column("last_raised", Timestamp, nullable=False),
    Column("count", Integer, nullable=False, default=1),
    Column("acknowledged_by", String(255)),
    Column("acknowledged_at", Timestamp),
    Column("cleared_at", Timestamp),
    Column("notified_at", Timestamp),
    UniqueConstraint("open_key", name="uq_alarm_open_key"),
    Index("ix_alarms_state", "state", "last_raised"),
)

# the operations history: jobs per site and state, one row per snapshot (live states: how
# many are in it; final states: how many reached it since the snapshot before)
ops_snapshots = Table(
    "ops_snapshots", metadata,
    Column("row_id", Id, primary_key=True, autoincrement=True),
    Column("time", Timestamp, nullable=False),
    Column("site", String(128), nullable=False),
    Column("status", String(32), nullable=False),
    Column("n_jobs", Integer, nullable=False),
    UniqueConstraint("time", "site", "status", name="uq_ops_snapshot"),
)


# ---------------------------------------------------------------------- revoked bearer tokens
# a token's jti, kept until the token would have expired anyway (server/tokens.py)
revoked_tokens = Table(
    "revoked_tokens", metadata,
    Column("jti", String(255), primary_key=True),
    Column("subject", String(255)),
    Column("expires", Timestamp, nullable=False),
    Column("revoked_at", Timestamp, nullable=False),
    Column("revoked_by", String(255), nullable=False),
    Column("reason", String(255)),
    Index("ix_revoked_tokens_expires", "expires"),
)


def declared_on(dialect: str):
    """An alembic ``include_object`` filter: leaves out of a schema comparison on ``dialect``
    the indexes declared for other dialects only (``info={"dialects": (...)}``)."""
    def include(obj, _name, type_, reflected, _compare_to) -> bool:
        if type_ == "index" and not reflected:
            only = obj.info.get("dialects")
            return not only or dialect in only
        return True
    return include


#: the extra of setup.py that installs each database driver module
DRIVER_EXTRAS = {"psycopg": "postgres", "psycopg2": "postgres", "pymysql": "mysql",
                 "MySQLdb": "mysql"}


class MissingDriver(RuntimeError):
    """The database URL names a driver that is not installed; the message says which extra
    installs it."""

    def __init__(self, url: str, module: str):
        module = module.split(".")[0]
        scheme = url.split(":", 1)[0]
        hint = {"psycopg2": ": write postgresql+psycopg://... (psycopg 3, installed by "
                            "pip install 'panda-wms[postgres]')",
                "MySQLdb": ": write mysql+pymysql://... (installed by "
                           "pip install 'panda-wms[mysql]')"}.get(module)
        if hint is None:
            extra = DRIVER_EXTRAS.get(module)
            hint = (f": pip install 'panda-wms[{extra}]'" if extra else
                    ": install it, or use a URL whose driver is installed")
        super().__init__(f"the database URL {scheme}://... needs the Python module {module!r}, "
                         f"which is not installed{hint}")
        self.module = module


def make_engine(url: str, pool_size: int = 10, echo: bool = False) -> Engine:
    """Create an engine with settings that suit a dispatcher on each backend.

    SQLite: WAL and a busy timeout so several server processes can share one file.
    MariaDB: READ COMMITTED, since REPEATABLE READ deadlocks under SKIP LOCKED.
    """
    kwargs: dict = {"echo": echo, "future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        # no pre-ping: it costs a round trip per checkout, i.e. per request on the hot path;
        # a connection found dead (database restarted, backend terminated) invalidates the
        # pool instead, and the request that met it is tried again on a new connection
        # (server/transient.py)
        kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False,
                      pool_recycle=3600,
                      # a database host that accepts but never answers must not hang us
                      connect_args={"connect_timeout": 10})
    if url.startswith(("mysql", "mariadb")):
        kwargs["isolation_level"] = "READ COMMITTED"
    try:
        engine = create_engine(url, **kwargs)
    except ModuleNotFoundError as exc:
        raise MissingDriver(url, exc.name or str(exc)) from None
    if engine.dialect.name != "sqlite":
        @event.listens_for(engine, "handle_error")
        def _connection_lost(context):
            # a backend terminated or a server restarted: drop the whole pool (its other
            # connections are as dead), so the retry (server/transient.py) reconnects; some
            # of these errors (MariaDB's 1927 "connection was killed", PostgreSQL's 57P01)
            # SQLAlchemy's own check does not count as a disconnect
            if not context.is_disconnect and is_connection_lost(context.original_exception):
                context.is_disconnect = True
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
            # writers take the write lock up front (no upgrade deadlocks); readers (see
            # ``read``) take none: in WAL mode they never wait, even for a read nested in a
            # write transaction of the same thread
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY)
                                 else "BEGIN IMMEDIATE")
    return engine


READ_ONLY = "panda_read_only"


def read(engine: Engine):
    """A connection for reads only: on SQLite it takes no write lock (see make_engine)."""
    return engine.connect().execution_options(**{READ_ONLY: True})


MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BASELINE = "0001"   # the spine's schema, created before there were migrations


def alembic_config(url: str | None = None):
    """An alembic Config pointing at the migrations shipped inside the package."""
    from alembic.config import Config

    alembic_log = logging.getLogger("alembic")
    if alembic_log.level == logging.NOTSET:     # its per-step chatter: only when asked for
        alembic_log.setLevel(logging.WARNING)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at; None for an empty (or pre-migration) one."""
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _lock_migrations(conn) -> None:
    """Serialise migrations from several servers starting at once against one database."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(72616) ")
    elif conn.dialect.name in ("mysql", "mariadb"):
        conn.exec_driver_sql("SELECT GET_LOCK('panda_wms_migrations', 120)")
    # SQLite: the transaction is BEGIN IMMEDIATE, already one writer at a time


def upgrade_schema(engine: Engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Bring the schema to ``revision`` by running the alembic migrations; returns (from, to).

    An empty database gets every migration; one created by the spine's ``create_schema``
    (tables but no ``alembic_version``) is recognised as the baseline and upgraded from there.
    """
    from alembic import command
    from alembic.migration import MigrationContext

    cfg = alembic_config()
    with engine.begin() as conn:
        _lock_migrations(conn)
        before = MigrationContext.configure(conn).get_current_revision()
        if before is None and "jobs" in inspect(conn).get_table_names():
            log.info("database has the pre-migration schema: stamping it as %s", BASELINE)
            cfg.attributes["connection"] = conn
            command.stamp(cfg, BASELINE)
            before = BASELINE
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        after = MigrationContext.configure(conn).get_current_revision()
        if conn.dialect.name in ("mysql", "mariadb"):
            conn.exec_driver_sql("SELECT RELEASE_LOCK('panda_wms_migrations')")
    if before != after:
        log.info("database schema upgraded from %s to %s", before or "empty", after)
    return before, after


def create_schema(engine: Engine) -> None:
    """Create or upgrade every table (runs the migrations; idempotent)."""
    upgrade_schema(engine)
