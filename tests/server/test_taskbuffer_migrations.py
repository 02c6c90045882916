"""Schema migrations on SQLite, PostgreSQL and MariaDB: from empty, from the pre-migration
schema, through ``panda db`` and at server start."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, insert, select, text

from server import archivetiers, db
from dbkit import free_port, start_server, stop_server


def panda_db(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "panda_wms.cli", "db", *args],
                          capture_output=True, text=True, timeout=120)


def schema_diff(url: str) -> list:
    engine = db.make_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={
                "compare_type": True, "include_object": db.declared_on(conn.dialect.name),
                "include_name": lambda name, type_, parent: not (
                    type_ == "table" and archivetiers.is_partition(name))})
            return compare_metadata(ctx, db.metadata)
    finally:
        engine.dispose()


def test_upgrade_from_empty_and_current(fresh_db_url):
    res = panda_db("current", "--db", fresh_db_url)
    assert res.returncode == 3, res.stderr
    assert res.stdout.startswith("none (empty")

    res = panda_db("upgrade", "--db", fresh_db_url)
    assert res.returncode == 0, res.stderr
    head = db.head_revision()
    assert f"schema at {head} (was empty)" in res.stdout

    res = panda_db("current", "--db", fresh_db_url)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{head} (head)"
    # what the migrations built is what the code declares
    assert schema_diff(fresh_db_url) == []

    again = panda_db("upgrade", "--db", fresh_db_url)
    assert again.returncode == 0 and f"(was {head})" in again.stdout


def test_upgrade_from_pre_migration_schema_keeps_rows(fresh_db_url):
    """A database made by the spine's create_all (no alembic_version) is stamped and upgraded."""
    engine = db.make_engine(fresh_db_url, pool_size=1)
    try:
        db.upgrade_schema(engine, db.BASELINE)
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
            conn.execute(insert(db.sites).values(name="OLD", status="online", config={"a": 1},
                                                 updated=dt.datetime(2026, 1, 1)))
        assert db.current_revision(engine) is None
        before, after = db.upgrade_schema(engine)
        assert (before, after) == (db.BASELINE, db.head_revision())
        with engine.connect() as conn:
            assert conn.execute(select(db.sites.c.config)).scalar_one() == {"a": 1}
        indexes = {ix["name"] for ix in inspect(engine).get_indexes("jobs")}
        assert "ix_jobs_task_status" in indexes and "ix_jobs_task" not in indexes
    finally:
        engine.dispose()
    assert schema_diff(fresh_db_url) == []


def test_microsecond_timestamps(db_url):
    """History rows written within one second keep their order by time (MariaDB included)."""
    engine = db.make_engine(db_url, pool_size=1)
    t = dt.datetime(2026, 1, 1, 12, 0, 0, 123456)
    try:
        with engine.begin() as conn:
            conn.execute(insert(db.job_history).values(panda_id=1, new_status="defined", time=t))
        with engine.connect() as conn:
            assert conn.execute(select(db.job_history.c.time)).scalar_one() == t
    finally:
        engine.dispose()


@pytest.mark.slow
def test_server_start_upgrades_empty_database(fresh_db_url, tmp_path):
    server = start_server(tmp_path / "srv", db_url=fresh_db_url)
    try:
        res = panda_db("current", "--db", fresh_db_url)
        assert res.returncode == 0 and "(head)" in res.stdout
    finally:
        stop_server(server)


def test_db_errors_are_clear(tmp_path):
    port = free_port()   # nothing listens there (port 1 is not reliably closed everywhere)
    res = panda_db("current", "--db", f"postgresql+psycopg://nobody@127.0.0.1:{port}/none")
    assert res.returncode == 1
    assert (f"panda db current: database postgresql+psycopg://127.0.0.1:{port}/none:"
            in res.stderr) and "nobody" not in res.stderr     # the URL without its user
    res = panda_db("archive", "--older-than", "-5", "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert res.returncode == 2 and "must be >= 0" in res.stderr
