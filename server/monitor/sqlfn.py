"""SQL expressions the three databases spell differently: seconds between two timestamps and
time buckets (for histograms over time), so every aggregate stays in SQL."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import Float, Integer, cast, func, literal_column, text

EPOCH = dt.datetime(1970, 1, 1)


def seconds_between(start, end, dialect: str):
    """``end - start`` in seconds (NULL when either is NULL)."""
    if dialect == "postgresql":
        return func.extract("epoch", end - start)
    if dialect in ("mysql", "mariadb"):
        return func.timestampdiff(literal_column("MICROSECOND"), start, end) / 1e6
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def epoch_seconds(column, dialect: str):
    """Seconds since 1970 of a naive-UTC timestamp column."""
    if dialect == "postgresql":
        return func.extract("epoch", column)
    if dialect in ("mysql", "mariadb"):
        return func.timestampdiff(literal_column("SECOND"), text("'1970-01-01 00:00:00'"),
                                  column)
    return cast(func.strftime("%s", column), Integer)


def bucket(column, width_s: int, dialect: str):
    """The index of ``width_s``-wide time bucket the column falls in (since 1970)."""
    return cast(func.floor(cast(epoch_seconds(column, dialect), Float) / width_s), Integer)


def bucket_start(index: int, width_s: int) -> dt.datetime:
    return EPOCH + dt.timedelta(seconds=int(index) * width_s)


def bucket_width(span_s: float, max_buckets: int = 60) -> int:
    """A round bucket width that cuts ``span_s`` into at most ``max_buckets``."""
    for width in (60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
                  7 * 86400):
        if span_s / width <= max_buckets:
            return width
    return 30 * 86400
