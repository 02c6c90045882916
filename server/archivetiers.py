"""Month partitions of the archive tier (jobs_archive, files_archive, job_history_archive).

Why a module of its own: the archiver (server/archive.py) and migration 0020 both need to make
month partitions and to drop old ones, and each backend spells that differently. PostgreSQL:
declarative partitioning (``PARTITION BY RANGE (archived_at)``), one table per month named
``<table>_pYYYY_MM``. MariaDB: RANGE partitions on ``TO_DAYS(archived_at)`` named ``pYYYY_MM``,
added in increasing order only. SQLite: no partitions; old months go by bounded DELETEs.
Months are calendar months of ``archived_at`` (naive UTC timestamps, as everywhere here).
"""
from __future__ import annotations

import datetime as dt
import logging
import re

from sqlalchemy import delete, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from . import db

log = logging.getLogger(__name__)

#: the archive tables, parents before children (the order partitions are made and dropped in)
TABLES = tuple(archive.name for _live, archive in db.ARCHIVE_TIERS)
_PG_NAME = re.compile(r"^(?P<table>[a-z_]+)_p(?P<y>\d{4})_(?P<m>\d{2})$")
_MY_NAME = re.compile(r"^p(?P<y>\d{4})_(?P<m>\d{2})$")


def is_partition(table_name: str) -> bool:
    """Whether a table name is one of our PostgreSQL month partitions (schema comparisons
    skip them: the declared schema has their parents)."""
    m = _PG_NAME.match(table_name)
    return bool(m) and m["table"] in TABLES


def month_start(t: dt.datetime | dt.date) -> dt.date:
    return dt.date(t.year, t.month, 1)


def add_months(month: dt.date, n: int) -> dt.date:
    k = month.year * 12 + month.month - 1 + n
    return dt.date(k // 12, k % 12 + 1, 1)


def partitioned(conn: Connection) -> bool:
    return conn.dialect.name in ("postgresql", "mysql", "mariadb")


def _months_now(conn: Connection, table: str) -> list[dt.date]:
    """:func:`existing_months` in a transaction of its own (DDL follows in others)."""
    with conn.begin():
        return existing_months(conn, table)


def existing_months(conn: Connection, table: str) -> list[dt.date]:
    """The months that have a partition of ``table``, oldest first (empty on SQLite)."""
    if conn.dialect.name == "postgresql":
        names = conn.execute(text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace "
            "WHERE p.relname = :t AND n.nspname = current_schema()"), {"t": table}).scalars()
        pattern = _PG_NAME
    elif conn.dialect.name in ("mysql", "mariadb"):
        names = conn.execute(text(
            "SELECT PARTITION_NAME FROM information_schema.PARTITIONS WHERE TABLE_SCHEMA = "
            "DATABASE() AND TABLE_NAME = :t AND PARTITION_NAME IS NOT NULL"), {"t": table}
        ).scalars()
        pattern = _MY_NAME
    else:
        return []
    months = []
    for name in names:
        m = pattern.match(name)
        if m and (pattern is _MY_NAME or m["table"] == table):
            months.append(dt.date(int(m["y"]), int(m["m"]), 1))
    return sorted(months)


def _bound(month: dt.date) -> str:
    return month.strftime("%Y-%m-%d")


def _mariadb_month(month: dt.date) -> str:
    """One MariaDB partition definition: the rows archived in ``month`` (or before, if lowest)."""
    return (f"PARTITION p{month:%Y_%m} VALUES LESS THAN "
            f"(TO_DAYS('{_bound(add_months(month, 1))}'))")


def create_month(conn: Connection, table: str, month: dt.date) -> None:
    """Add the partition of ``month`` to ``table`` (PostgreSQL: any month not there yet;
    MariaDB: a month after the newest partition)."""
    nxt = add_months(month, 1)
    if conn.dialect.name == "postgresql":
        conn.execute(text(
            f"CREATE TABLE IF NOT EXISTS {table}_p{month:%Y_%m} PARTITION OF {table} "
            f"FOR VALUES FROM ('{_bound(month)}') TO ('{_bound(nxt)}')"))
    elif conn.dialect.name in ("mysql", "mariadb"):
        conn.execute(text(f"ALTER TABLE {table} ADD PARTITION ({_mariadb_month(month)})"))


def mariadb_partition_clause(months: list[dt.date]) -> str:
    """``PARTITION BY ...`` for an ``ALTER TABLE`` that partitions an existing table."""
    parts = ", ".join(_mariadb_month(m) for m in months)
    return f"PARTITION BY RANGE (TO_DAYS(archived_at)) ({parts})"


def _mariadb_split_lowest(conn: Connection, table: str, first: dt.date, lowest: dt.date) -> int:
    """Give the months from ``first`` up to ``lowest`` partitions of their own: MariaDB's lowest
    RANGE partition holds everything older, so it is reorganised into months."""
    months, month = [], first
    while month < lowest:
        months.append(month)
        month = add_months(month, 1)
    parts = ", ".join(_mariadb_month(m) for m in [*months, lowest])
    with conn.begin():
        conn.execute(text(f"ALTER TABLE {table} REORGANIZE PARTITION p{lowest:%Y_%m} "
                          f"INTO ({parts})"))
    log.info("made archive partitions %s to %s of %s", first.strftime("%Y-%m"),
             months[-1].strftime("%Y-%m"), table)
    return len(months)


def ensure_months(engine: Engine, upto: dt.datetime, ahead: int = 1) -> int:
    """Make sure every archive table has a partition for the month of ``upto`` and the
    ``ahead`` months after it. PostgreSQL: each missing one is made. MariaDB: months are added
    after the newest partition, without gaps (its lowest partition takes anything older).

    Returns how many partitions were made. Several servers may race here: a partition another
    one made meanwhile is taken as made.
    """
    made = 0
    first = month_start(upto)
    last = add_months(first, ahead)
    with engine.connect() as conn:
        if not partitioned(conn):
            return 0
        for table in TABLES:
            have = _months_now(conn, table)
            if conn.dialect.name == "postgresql":
                wanted = [add_months(first, i) for i in range(ahead + 1)]
            else:
                if have and first < have[0]:     # a clock behind the oldest partition
                    try:
                        made += _mariadb_split_lowest(conn, table, first, have[0])
                    except Exception:  # noqa: BLE001 - a racing server split it: fine if so
                        if _months_now(conn, table)[0] > first:
                            raise
                    have = _months_now(conn, table)
                wanted, month = [], add_months(have[-1], 1) if have else first
                while month <= last:
                    wanted.append(month)
                    month = add_months(month, 1)
            for month in wanted:
                if month in have:
                    continue
                try:
                    with conn.begin():
                        create_month(conn, table, month)
                    made += 1
                    log.info("made archive partition %s for %s", table, month.strftime("%Y-%m"))
                except Exception:  # noqa: BLE001 - a racing server made it: fine if it is there
                    if month not in _months_now(conn, table):
                        raise
    return made


def _drop_month(conn: Connection, table: str, month: dt.date, lock_timeout_s: float) -> None:
    """Drop one month partition, waiting at most ``lock_timeout_s`` for the table's lock."""
    if conn.dialect.name == "postgresql":
        with conn.begin():
            conn.execute(text(f"SET LOCAL lock_timeout = '{int(lock_timeout_s * 1000)}ms'"))
            conn.execute(text(f"DROP TABLE IF EXISTS {table}_p{month:%Y_%m}"))
        return
    old = conn.execute(text("SELECT @@SESSION.lock_wait_timeout")).scalar()
    conn.commit()
    try:
        conn.execute(text(f"SET SESSION lock_wait_timeout = {max(1, int(lock_timeout_s))}"))
        conn.execute(text(f"ALTER TABLE {table} DROP PARTITION p{month:%Y_%m}"))
        conn.commit()
    finally:
        conn.rollback()
        conn.execute(text(f"SET SESSION lock_wait_timeout = {int(old)}"))
        conn.commit()


def drop_months_before(engine: Engine, keep_from: dt.date, batch: int = 5000,
                       lock_timeout_s: float = 5.0) -> int:
    """Drop the archive older than ``keep_from`` (a month start): whole partitions on
    PostgreSQL and MariaDB, bounded DELETEs on SQLite. Returns partitions dropped (PostgreSQL,
    MariaDB) or rows deleted (SQLite). A partition whose lock is not had within
    ``lock_timeout_s`` (a long reader) ends the pass; the next one drops it."""
    gone = 0
    with engine.connect() as conn:
        if partitioned(conn):
            for table in reversed(TABLES):        # children first: a reader never sees orphans
                for month in _months_now(conn, table):
                    if month >= keep_from:
                        continue
                    try:
                        _drop_month(conn, table, month, lock_timeout_s)
                    except OperationalError as exc:
                        # a long reader holds the table: waiting would queue every other
                        # reader behind the drop; the next pass tries again
                        log.warning("archive partition %s of %s busy (%s): dropped at the next "
                                    "pass", month.strftime("%Y-%m"), table,
                                    str(exc.orig).strip().splitlines()[0])
                        return gone
                    gone += 1
                    log.info("dropped archive partition %s of %s", month.strftime("%Y-%m"), table)
            return gone
    cutoff = dt.datetime(keep_from.year, keep_from.month, 1)
    for _live, table in reversed(db.ARCHIVE_TIERS):
        key = table.c.panda_id if table is db.jobs_archive else table.c.row_id
        while True:
            with engine.begin() as conn:
                n = conn.execute(delete(table).where(table.c.archived_at < cutoff, key.in_(
                    select(key).where(table.c.archived_at < cutoff).limit(batch)
                    .scalar_subquery()))).rowcount
            gone += n
            if n < batch:
                break
    if gone:
        log.info("deleted %d archive row(s) archived before %s", gone, cutoff.date())
    return gone
