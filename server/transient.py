"""Transient database failures, told from refusals, and the server's own bounded retries.

A database that restarts, a backend killed by an operator (``pg_terminate_backend``), a
deadlock victim, a serialization failure, a statement or lock timeout: none of these says the
request was wrong, and the same request moments later succeeds. :func:`is_transient` tells them
from everything else (a constraint violated, a value out of a column's range, a bug);
:func:`retrying` runs blocking database work again after such a failure, a few times with
growing, jittered pauses. SQLAlchemy invalidates its pool when it meets a dead connection, so
the next try reconnects; that is the server's "reconnect" (no pre-ping: it would cost a round
trip on every checkout, i.e. every request).

When the tries are used up the error goes on to the handlers, which answer what the caller can
act on: the pilot protocol StatusCode 10 ("try again", ``panda_core.client.try_again``), the
``/api/v1`` JSON API a 503 with ``Retry-After`` (docs/protocol.md). Nothing is lost: every
statement that failed was rolled back, and the caller still holds its request.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: PostgreSQL SQLSTATEs of failures that pass: serialization failure, deadlock, statement
#: timeout / cancel, lock not available, too many connections, out of memory or disk for now,
#: admin / crash shutdown and "cannot connect now" (a backend terminated or a restart)
PG_TRANSIENT = frozenset({"40001", "40P01", "57014", "55P03", "53300", "53200", "53100",
                          "57P01", "57P02", "57P03", "57P05", "58000", "58030"})
#: MariaDB/MySQL error numbers of the same kind: lock wait timeout, deadlock, too many
#: connections, server shutdown, query interrupted, statement time limits, connection killed,
#: "can't connect", "server has gone away", "lost connection", idle disconnect
MYSQL_TRANSIENT = frozenset({1205, 1213, 1040, 1053, 1317, 3024, 1969, 1927, 2002, 2003,
                             2006, 2013, 2055, 4031})
#: the pauses between tries (seconds, each +-25 % jitter): about 1.5 s in all before the
#: caller is told to try again later
RETRY_DELAYS_S = (0.05, 0.25, 1.0)
#: what a 503 asks the API's caller to wait (Retry-After, seconds)
RETRY_AFTER_S = 5
MESSAGE = "the database is temporarily unavailable; try again later"


class TransientFailure(Exception):
    """A request that met only transient database failures, as many times as it may."""


def _mro_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _driver_transient(orig: BaseException) -> bool:
    """A driver's exception (psycopg, pymysql, sqlite3) of a failure that passes."""
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        return sqlstate in PG_TRANSIENT or sqlstate.startswith("08")
    module = type(orig).__module__ or ""
    names = _mro_names(orig)
    if module.startswith("pymysql"):
        code = orig.args[0] if orig.args else None
        if isinstance(code, int) and code in MYSQL_TRANSIENT:
            return True
        # pymysql's "(0, '')": the connection was closed under it
        return "InterfaceError" in names and code in (0, None)
    if module.startswith("psycopg"):
        # no SQLSTATE: the connection failed or broke (refused, reset, closed by the server)
        return "OperationalError" in names or "InterfaceError" in names
    if module == "sqlite3":
        text = str(orig).lower()
        return "locked" in text or "busy" in text
    return False


#: of the transient failures, those that mean the connection itself is gone
PG_CONNECTION_LOST = frozenset({"57P01", "57P02", "57P03"})
MYSQL_CONNECTION_LOST = frozenset({1053, 1927, 2006, 2013, 2055, 4031})


def is_connection_lost(orig: BaseException) -> bool:
    """A driver's error that says the connection is dead (terminated backend, restart, lost
    link): the pool's other connections are as old, so the pool is best dropped whole
    (``db.make_engine`` tells SQLAlchemy so when its own check missed it)."""
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        return sqlstate in PG_CONNECTION_LOST or sqlstate.startswith("08")
    module = type(orig).__module__ or ""
    names = _mro_names(orig)
    if module.startswith("pymysql"):
        code = orig.args[0] if orig.args else None
        return code in MYSQL_CONNECTION_LOST or ("InterfaceError" in names and code in (0, None))
    if module.startswith("psycopg"):
        return "OperationalError" in names or "InterfaceError" in names
    return False


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` is a database failure that passes (the same request may then succeed),
    rather than a refusal or a bug. Looks through SQLAlchemy's wrapper to the driver's error."""
    if exc is None:
        return False
    if isinstance(exc, TransientFailure):
        return True
    names = _mro_names(exc)
    module = type(exc).__module__ or ""
    if module.startswith("sqlalchemy"):
        if getattr(exc, "connection_invalidated", False):
            return True                       # SQLAlchemy saw a disconnect
        if "TimeoutError" in names:          # no pooled connection came free in time
            return True
        orig = getattr(exc, "orig", None)
        return orig is not None and _driver_transient(orig)
    if module.startswith(("psycopg", "pymysql")) or module == "sqlite3":
        return _driver_transient(exc)
    return False


#: MariaDB's refusals of a value: data too long, out of range, incorrect value, truncated
MYSQL_BAD_VALUE = frozenset({1406, 1264, 1366, 1292, 1265, 1367, 1690})
BAD_VALUE_MESSAGE = "a value the database cannot store (too long, too large or not text)"


def is_bad_value(exc: BaseException | None) -> bool:
    """Whether the database (or its driver) refused a *value* of the request: too long for
    its column, out of its range, text with NUL. A refusal (4xx, StatusCode 30), not a
    failure; the last line of defence behind the parameter checks."""
    if exc is None:
        return False
    if isinstance(exc, OverflowError):            # sqlite3: an int beyond 64 bits
        return True
    orig = getattr(exc, "orig", None) if (type(exc).__module__ or "").startswith(
        "sqlalchemy") else exc
    if orig is None:
        return False
    if isinstance(orig, OverflowError):
        return True
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate:
        return sqlstate.startswith("22")          # data exception
    module = type(orig).__module__ or ""
    if module.startswith("pymysql"):
        code = orig.args[0] if orig.args else None
        return code in MYSQL_BAD_VALUE or "DataError" in _mro_names(orig)
    if module.startswith("psycopg"):              # NUL in text: refused before it is sent
        return "DataError" in _mro_names(orig)
    return False


def _pause(attempt: int) -> float:
    return RETRY_DELAYS_S[attempt] * random.uniform(0.75, 1.25)


def retrying(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)``, tried again after a transient failure (:data:`RETRY_DELAYS_S`); the
    last failure goes to the caller as it was. For blocking work in the thread pool: each try
    must be one or more whole transactions (a failed one was rolled back)."""
    for attempt in range(len(RETRY_DELAYS_S) + 1):
        try:
            return func(*args)
        except Exception as exc:
            if attempt == len(RETRY_DELAYS_S) or not is_transient(exc) or _sqlite_busy(exc):
                raise
            pause = _pause(attempt)
            log.warning("%s: transient database failure (%s); try %d again in %.2f s",
                        getattr(func, "__qualname__", func), _short(exc), attempt + 2, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def _sqlite_busy(exc: BaseException) -> bool:
    """SQLite's "database is locked" came after its busy timeout (30 s, ``db.make_engine``)
    was spent waiting already: transient for the caller, not worth more waiting here."""
    orig = getattr(exc, "orig", None) or exc
    return type(orig).__module__ == "sqlite3"


def _short(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())
    return f"{type(orig).__name__}: {text[:200]}"


def describe(exc: BaseException) -> str:
    """One line for the log about a transient failure that used up its tries."""
    return _short(exc)
