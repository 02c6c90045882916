"""The monitor's query string: BigPanDA's parameter names and value syntax, read strictly.

Every selection lives in the URL. A value may be ``a|b`` (either), ``!a`` (not), ``*`` inside a
text value (a wildcard, case-insensitive) and ``Not specified`` (empty). Any parameter a view
does not know, an empty value, a repeated key or a value of the wrong type is a
:class:`ParamError`: HTTP 400 with the reason, never a 500.
"""
from __future__ import annotations

import datetime as dt
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import and_, or_, true

#: keys that may come without a value
FLAG_KEYS = frozenset({"json", "timestamp"})
NOT_SPECIFIED = "not specified"
MAX_INT = 2**63 - 1


class ParamError(ValueError):
    """A bad monitor parameter: the reply is a 400 with this text."""


class Args:
    """The query arguments of one request; each read marks its key as known."""

    def __init__(self, query: dict[str, list[str]]):
        self.raw: dict[str, list[str]] = {}
        for key, values in query.items():
            self.raw.setdefault(key.lower(), []).extend(values)
        self.used: set[str] = set(FLAG_KEYS)

    @classmethod
    def from_request(cls, request) -> "Args":
        return cls({k: [v.decode("utf-8", "replace") for v in vs]
                    for k, vs in request.query_arguments.items()})

    def has(self, key: str) -> bool:
        self.used.add(key)
        return key in self.raw

    def text(self, key: str, default: str | None = None, max_len: int = 1000) -> str | None:
        self.used.add(key)
        values = self.raw.get(key)
        if values is None:
            return default
        if len(values) > 1:
            raise ParamError(f"parameter {key!r} is given {len(values)} times: give it once "
                             "(use | for either value)")
        value = values[0].strip()
        if not value and key not in FLAG_KEYS:
            raise ParamError(f"parameter {key!r} has an empty value")
        if len(value) > max_len:
            raise ParamError(f"parameter {key!r} is longer than {max_len} characters")
        if "%" in value:
            raise ParamError(f"parameter {key!r}: '%' is not allowed (use * as the wildcard)")
        return value

    def integer(self, key: str, default: int | None = None, lo: int = 0,
                hi: int = MAX_INT) -> int | None:
        value = self.text(key)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ParamError(f"parameter {key!r} must be an integer, got {value[:40]!r}") from None
        if not lo <= number <= hi:
            raise ParamError(f"parameter {key!r} must be between {lo} and {hi}, got {number}")
        return number

    def time(self, key: str) -> dt.datetime | None:
        value = self.text(key)
        if value is None:
            return None
        try:
            when = dt.datetime.fromisoformat(value.replace(" ", "T").rstrip("Z"))
        except ValueError:
            raise ParamError(f"parameter {key!r} must be a date (YYYY-MM-DD or "
                             f"YYYY-MM-DDTHH:MM[:SS]), got {value[:40]!r}") from None
        if when.tzinfo is not None:
            when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return when

    def choice(self, key: str, choices: Iterable[str], default: str) -> str:
        value = self.text(key)
        choices = list(choices)
        if value is None:
            return default
        if value not in choices:
            raise ParamError(f"parameter {key!r} must be one of {', '.join(choices)}, "
                             f"got {value[:40]!r}")
        return value

    def finish(self) -> None:
        """Refuse the parameters no read asked for."""
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            known = ", ".join(sorted(k for k in self.used if k not in FLAG_KEYS))
            raise ParamError(f"unknown parameter(s) {', '.join(unknown)}; this view knows: "
                             f"{known}")

    def query(self, drop: Iterable[str] = (), **changes: object) -> str:
        """This request's query string with ``changes`` (None removes a key): drill-down links."""
        drop = set(drop) | {"before"}
        items = {k: v[-1] for k, v in self.raw.items() if k not in drop}
        for key, value in changes.items():
            if value is None:
                items.pop(key, None)
            else:
                items[key] = str(value)
        return urllib.parse.urlencode(sorted(items.items()))


# ---------------------------------------------------------------------- value syntax
@dataclass(frozen=True)
class Terms:
    """A parsed value: terms any of which matches, and terms none of which may match."""
    include: tuple[str, ...]
    exclude: tuple[str, ...]


def split_terms(key: str, value: str, numeric: bool) -> Terms:
    seps = ("|", ",") if numeric else ("|",)
    parts = [value]
    for sep in seps:
        parts = [p for part in parts for p in part.split(sep)]
    include, exclude = [], []
    for part in (p.strip() for p in parts):
        if not part or part == "!":
            raise ParamError(f"parameter {key!r}: empty term in {value[:60]!r}")
        (exclude if part.startswith("!") else include).append(part.lstrip("!"))
    if numeric:
        for term in include + exclude:
            if term.lower() == NOT_SPECIFIED:
                continue
            try:
                int(term)
            except ValueError:
                raise ParamError(f"parameter {key!r} takes integers (a|b, !a), got "
                                 f"{term[:40]!r}") from None
    return Terms(tuple(include), tuple(exclude))


def _like(term: str) -> str:
    escaped = term.replace("\\", "\\\\").replace("_", "\\_")
    return escaped.replace("*", "%")


def term_condition(column, term: str, numeric: bool):
    if term.lower() == NOT_SPECIFIED:
        return column.is_(None) if numeric else or_(column.is_(None), column == "")
    if numeric:
        return column == int(term)
    if "*" in term:
        return column.ilike(_like(term), escape="\\")
    return column == term


def value_condition(column, terms: Terms, numeric: bool):
    """SQL for ``terms`` on ``column``: (any include) AND NOT (any exclude)."""
    conds = []
    if terms.include:
        conds.append(or_(*[term_condition(column, t, numeric) for t in terms.include]))
    for term in terms.exclude:
        match = term_condition(column, term, numeric)
        conds.append(or_(column.is_(None), ~match) if term.lower() != NOT_SPECIFIED else ~match)
    return and_(*conds) if conds else true()


# ---------------------------------------------------------------------- time windows
@dataclass(frozen=True)
class Window:
    """The rows' time window; ``since`` None: no lower bound (an id-scoped query)."""
    since: dt.datetime | None
    until: dt.datetime | None
    label: str

    def condition(self, column):
        conds = []
        if self.since is not None:
            conds.append(column >= self.since)
        if self.until is not None:
            conds.append(column < self.until)
        return and_(*conds) if conds else true()

    @property
    def bounded(self) -> bool:
        return self.since is not None


MAX_DAYS = 400


def read_window(args: Args, now: dt.datetime, default_hours: int, scoped: bool) -> Window:
    """``hours=``, ``days=``, ``date_from``/``date_to``; none of them on an id-scoped query
    (``scoped``) means no time limit, else the view's default."""
    hours = args.integer("hours", lo=1, hi=24 * MAX_DAYS)
    days = args.integer("days", lo=1, hi=MAX_DAYS)
    date_from, date_to = args.time("date_from"), args.time("date_to")
    if sum(x is not None for x in (hours, days, date_from)) > 1:
        raise ParamError("give one of hours, days and date_from")
    if date_to is not None and date_from is None:
        raise ParamError("date_to needs date_from")
    if date_from is not None:
        until = date_to
        if until is not None and until <= date_from:
            raise ParamError("date_to must be after date_from")
        label = f"{date_from:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M}" if until else \
            f"since {date_from:%Y-%m-%d %H:%M}"
        return Window(date_from, until, label)
    if hours is None and days is None and scoped:
        return Window(None, None, "no time limit (an id-scoped query)")
    if days:
        return Window(now - dt.timedelta(days=days), None, f"last {days} day(s)")
    hours = hours or default_hours
    return Window(now - dt.timedelta(hours=hours), None, f"last {hours} hour(s)")
