"""Database fixtures for the server's tests: the same test runs on SQLite, PostgreSQL and MariaDB.

Fixtures (use them from any test under tests/server/):

- ``db_url``: a SQLAlchemy URL of a database at the current schema head, emptied before each
  test. Parametrized over ``sqlite`` (a file in a temporary folder), ``postgresql``
  (``postgresql+psycopg://postgres@127.0.0.1:5432/<fresh db>``, marker ``postgres``) and
  ``mysql`` (``mysql+pymysql://root@127.0.0.1:3306/<fresh db>``, marker ``mysql``). Each backend's
  database is created once per test session (each xdist worker is one) under a fresh name
  (``panda_test_<pid>_<random>``) and dropped at the end; ones left by killed sessions (pid
  gone) are dropped at the next start: a live sibling worker's pid is never gone.
- ``db_backend``: "sqlite", "postgresql" or "mysql" (the parameter of the current test).
- ``fresh_db_url``: a brand-new *empty* database (no tables) on the same backend, dropped after
  the test: for migration tests.
- ``clock``: a :class:`ManualClock`, a callable returning naive UTC datetimes that only moves when
  told (``clock.advance(seconds)``, ``clock.set(datetime)``): for heartbeat, retry and archive
  tests without sleeping.
- ``taskbuffer``: a ``server.taskbuffer.TaskBuffer`` on ``db_url`` driven by ``clock``.

Select backends with ``-m "not mysql"`` and the like, or the environment variable
``PANDA_TEST_DBS=sqlite,postgresql`` (default: all three). Server addresses can be changed with
``PANDA_TEST_PG_URL`` / ``PANDA_TEST_MYSQL_URL`` (admin URLs without a database name). A
selected backend whose server does not answer fails the test with the reason: a green run never
hides a database that was not tested.
"""
from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from server import db
from server.taskbuffer import TaskBuffer

PG_ADMIN = os.environ.get("PANDA_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
MY_ADMIN = os.environ.get("PANDA_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306")
SELECTED = {b.strip() for b in os.environ.get("PANDA_TEST_DBS", "sqlite,postgresql,mysql")
            .split(",") if b.strip()}

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    pytest.param("mysql", id="mysql", marks=pytest.mark.mysql),
]


class ManualClock:
    """A clock for the task buffer that moves only when the test says so."""

    def __init__(self, start: dt.datetime | None = None):
        self.now = start or dt.datetime(2026, 1, 1, 12, 0, 0)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float = 0, **kw: float) -> dt.datetime:
        """Move on by ``seconds`` (and/or timedelta keywords: ``minutes=5``)."""
        self.now += dt.timedelta(seconds=seconds, **kw)
        return self.now

    def set(self, when: dt.datetime) -> None:
        self.now = when


# ---------------------------------------------------------------------- databases on servers
def _admin_url(backend: str) -> str:
    return PG_ADMIN + "/postgres" if backend == "postgresql" else MY_ADMIN + "/"


def create_database(backend: str, tmp_dir: Path) -> str:
    """Create an empty database with a fresh name; returns its URL."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_dir / f'panda-{uuid.uuid4().hex[:8]}.db'}"
    if backend not in SELECTED:
        pytest.skip(f"{backend} not selected (PANDA_TEST_DBS={','.join(sorted(SELECTED))})")
    marker = "postgres" if backend == "postgresql" else "mysql"
    name = f"panda_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(_admin_url(backend), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if backend == "postgresql":
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            else:
                conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 "
                                  "COLLATE utf8mb4_bin"))
    except Exception as exc:  # noqa: BLE001 - name the server and the way out
        pytest.fail(f"cannot create a {backend} test database at {_admin_url(backend)}: {exc}\n"
                    f"start the server, or deselect it (-m 'not {marker}' or PANDA_TEST_DBS)",
                    pytrace=False)
    finally:
        admin.dispose()
    base = PG_ADMIN if backend == "postgresql" else MY_ADMIN
    return f"{base}/{name}"


def drop_stale_databases(backend: str) -> None:
    """Drop test databases left by sessions that were killed (their pid is gone)."""
    admin = create_engine(_admin_url(backend), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if backend == "postgresql":
                names = conn.execute(text("SELECT datname FROM pg_database "
                                          "WHERE datname LIKE 'panda_test_%'")).scalars().all()
            else:
                names = conn.execute(text("SHOW DATABASES LIKE 'panda\\_test\\_%'")
                                     ).scalars().all()
            for name in names:
                pid = name.split("_")[2]
                if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
                    quoted = f'"{name}"' if backend == "postgresql" else f"`{name}`"
                    force = " WITH (FORCE)" if backend == "postgresql" else ""
                    conn.execute(text(f"DROP DATABASE IF EXISTS {quoted}{force}"))
    except Exception:  # noqa: BLE001 - hygiene only; create_database reports real trouble
        pass
    finally:
        admin.dispose()


def drop_database(url: str) -> None:
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(u.database + suffix).unlink(missing_ok=True)
        return
    admin = create_engine(_admin_url("postgresql" if backend == "postgresql" else "mysql"),
                          isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if backend == "postgresql":
            conn.execute(text(f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)'))
        else:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{u.database}`"))
    admin.dispose()


def empty_tables(url: str) -> None:
    """Delete every row of every table (faster than a new database per test)."""
    engine = create_engine(url)
    names = [t.name for t in reversed(db.metadata.sorted_tables)]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("TRUNCATE " + ", ".join(names)))
        else:
            for name in names:
                conn.execute(text(f"DELETE FROM {name}"))
    engine.dispose()


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session", params=BACKENDS)
def db_backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def _session_dbs() -> Iterator[dict[str, str]]:
    """backend -> URL of this session's migrated database on it, made on first use, dropped
    when the session ends.

    Not ``_session_db`` itself: pytest holds one parameter of a parametrized session fixture at
    a time and tears the fixture down when a test asks for another. A serial run groups the
    tests by backend, so that is rare; an xdist worker runs whole modules whose tests alternate
    backends, and would create and migrate a database per module and backend (seconds each on
    MariaDB)."""
    made: dict[str, str] = {}
    yield made
    for url in made.values():
        drop_database(url)


@pytest.fixture(scope="session")
def _session_db(db_backend, _session_dbs, tmp_path_factory) -> str:
    url = _session_dbs.get(db_backend)
    if url is None:
        if db_backend != "sqlite" and db_backend in SELECTED:
            drop_stale_databases(db_backend)
        url = create_database(db_backend, tmp_path_factory.mktemp(f"db-{db_backend}"))
        engine = db.make_engine(url, pool_size=1)
        try:
            db.upgrade_schema(engine)
        except BaseException:
            drop_database(url)
            raise
        finally:
            engine.dispose()
        _session_dbs[db_backend] = url
    return url


@pytest.fixture
def db_url(_session_db) -> str:
    empty_tables(_session_db)
    return _session_db


@pytest.fixture
def fresh_db_url(db_backend, tmp_path) -> Iterator[str]:
    url = create_database(db_backend, tmp_path)
    yield url
    drop_database(url)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def taskbuffer(db_url, clock) -> Iterator[TaskBuffer]:
    engine = db.make_engine(db_url, pool_size=4)
    yield TaskBuffer(engine, clock=clock)
    engine.dispose()
