"""What every part of the task buffer shares: the engine, its dialect's abilities, the clock,
the cache of built statements, and the errors callers catch."""
from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    """Naive UTC now: what every timestamp column stores."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class NotFound(LookupError):
    """No such task, job or site."""


class Conflict(RuntimeError):
    """The request is valid but the object's state does not allow it."""


class Store:
    """One database and one clock. ``skip_locked``: the database has ``FOR UPDATE SKIP
    LOCKED`` (PostgreSQL, MariaDB); ``autocommit``: the engine for single statements that are
    their own transaction (no BEGIN/COMMIT round trips)."""

    def __init__(self, engine: Engine, clock: Clock = utcnow):
        self.engine = engine
        self.clock = clock
        self.dialect = engine.dialect.name
        self.skip_locked = self.dialect in ("postgresql", "mysql", "mariadb")
        self.autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._statements: dict[Any, Any] = {}

    def statement(self, key: Any, build: Callable[[], Any]) -> Any:
        """The statement ``build()`` makes, built once per ``key`` (None: not cached).
        Building a Core statement costs more client CPU than running it."""
        if key is None:
            return build()
        stmt = self._statements.get(key)
        if stmt is None:
            stmt = build()
            if len(self._statements) < 1000:
                self._statements[key] = stmt
        return stmt


def is_retryable(exc: DBAPIError) -> bool:
    """A deadlock victim or a lock wait timeout: the transaction was rolled back, try again.
    PostgreSQL SQLSTATE 40P01/40001; MariaDB errors 1213 (deadlock) and 1205 (lock wait)."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in ("40P01", "40001"):
        return True
    args = getattr(orig, "args", ())
    return bool(args) and args[0] in (1213, 1205)
