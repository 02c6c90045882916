"""Alarms: raised by the monitor's checks and by the ``alarm/raise`` API, shown on every page,
acknowledged by a shifter, cleared when their condition is gone, notified once each.

An alarm has a ``key`` (what it is about, e.g. ``duration:running:SITE_A``); while it is not
cleared, ``open_key`` holds the key under a unique constraint, so raising the same thing again,
from any process, counts up the one open alarm instead of adding another.
"""
from __future__ import annotations

import logging

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from .. import db
from ..taskbuffer import Conflict, NotFound

log = logging.getLogger(__name__)

SEVERITIES = ("warning", "critical")
STATES = ("active", "acknowledged", "cleared")
MAX_KEY = 255


class Alarms:
    def __init__(self, tb):
        self.tb = tb

    def raise_alarm(self, key: str, title: str, *, severity: str = "warning",
                    source: str = "api", message: str | None = None, site: str | None = None,
                    raised_by: str | None = None) -> dict:
        """Open the alarm ``key`` or, if it is open, count it up (its text and severity are
        the latest). Returns the alarm."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}")
        if not key or len(key) > MAX_KEY:
            raise ValueError(f"key must be 1 to {MAX_KEY} characters")
        a = db.alarms.c
        now = self.tb.clock()
        for _ in range(3):
            with self.tb.engine.begin() as conn:
                res = conn.execute(update(db.alarms).where(a.open_key == key).values(
                    count=a.count + 1, last_raised=now, title=title[:255], message=message,
                    severity=severity, site=site))
                if res.rowcount:
                    return dict(conn.execute(select(db.alarms).where(a.open_key == key))
                                .first()._mapping)
                try:
                    with conn.begin_nested():
                        alarm_id = conn.execute(insert(db.alarms).values(
                            key=key, open_key=key, source=source, severity=severity,
                            title=title[:255], message=message, site=site, raised_by=raised_by,
                            state="active", first_raised=now, last_raised=now, count=1)
                        ).inserted_primary_key[0]
                except IntegrityError:
                    continue          # another process opened it a moment ago: count it up
            log.warning("alarm %s raised: %s", key, title, extra={"site": site})
            return self.get(int(alarm_id))
        raise Conflict(f"alarm {key} could not be raised")

    def get(self, alarm_id: int) -> dict:
        with db.read(self.tb.engine) as conn:
            row = conn.execute(select(db.alarms).where(db.alarms.c.alarm_id == alarm_id)).first()
        if row is None:
            raise NotFound(f"no alarm {alarm_id}")
        return dict(row._mapping)

    def acknowledge(self, alarm_id: int, by: str) -> dict:
        """A shifter has seen it: it stays open (its condition may hold) but is not pending."""
        a = db.alarms.c
        with self.tb.engine.begin() as conn:
            res = conn.execute(update(db.alarms).where(a.alarm_id == alarm_id,
                                                       a.state == "active").values(
                state="acknowledged", acknowledged_by=by, acknowledged_at=self.tb.clock()))
        alarm = self.get(alarm_id)
        if not res.rowcount and alarm["state"] == "cleared":
            raise Conflict(f"alarm {alarm_id} is already cleared")
        return alarm

    def clear(self, alarm_id: int | None = None, key: str | None = None) -> int:
        a = db.alarms.c
        cond = a.alarm_id == alarm_id if alarm_id is not None else a.open_key == key
        with self.tb.engine.begin() as conn:
            return conn.execute(update(db.alarms).where(cond, a.state != "cleared").values(
                state="cleared", open_key=None, cleared_at=self.tb.clock())).rowcount

    def reconcile(self, source: str, current: dict[str, dict]) -> tuple[int, int]:
        """A check's whole finding: raise each alarm of ``current`` (key -> raise_alarm
        keywords) and clear the open ones of ``source`` it no longer finds."""
        for key, spec in current.items():
            self.raise_alarm(key, source=source, **spec)
        a = db.alarms.c
        with db.read(self.tb.engine) as conn:
            open_keys = [k for (k,) in conn.execute(select(a.open_key).where(
                a.source == source, a.open_key.is_not(None)))]
        gone = [k for k in open_keys if k not in current]
        for key in gone:
            self.clear(key=key)
        return len(current), len(gone)

    def listing(self, states: tuple[str, ...] = ("active", "acknowledged"),
                limit: int = 200, before: int | None = None) -> list[dict]:
        a = db.alarms.c
        q = select(db.alarms).where(a.state.in_(states))
        if before is not None:
            q = q.where(a.alarm_id < before)
        with db.read(self.tb.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(
                q.order_by(a.alarm_id.desc()).limit(limit))]

    def open_counts(self) -> dict[tuple[str, str], int]:
        """(state, severity) -> open alarms (an index range of ``ix_alarms_state``)."""
        a = db.alarms.c
        with db.read(self.tb.engine) as conn:
            return {(state, severity): n for state, severity, n in conn.execute(
                select(a.state, a.severity, func.count()).where(
                    a.state.in_(("active", "acknowledged"))).group_by(a.state, a.severity))}

    def counts(self) -> dict[str, int]:
        """Open alarms by state and the critical ones among the active: every page's banner."""
        out = {"active": 0, "acknowledged": 0, "critical": 0}
        for (state, severity), n in self.open_counts().items():
            out[state] += n
            if state == "active" and severity == "critical":
                out["critical"] += n
        return out

    def claim_unnotified(self, limit: int = 50) -> list[dict]:
        """Active alarms nobody was told about yet, each claimed by this caller only."""
        a = db.alarms.c
        with db.read(self.tb.engine) as conn:
            ids = [i for (i,) in conn.execute(select(a.alarm_id).where(
                a.state == "active", a.notified_at.is_(None)).order_by(a.alarm_id).limit(limit))]
        claimed = []
        for alarm_id in ids:
            with self.tb.engine.begin() as conn:
                if conn.execute(update(db.alarms).where(
                        a.alarm_id == alarm_id, a.notified_at.is_(None)).values(
                        notified_at=self.tb.clock())).rowcount:
                    claimed.append(alarm_id)
        return [self.get(i) for i in claimed]

    def unclaim(self, alarm_id: int) -> None:
        """A notification that failed: try again on the next pass."""
        with self.tb.engine.begin() as conn:
            conn.execute(update(db.alarms).where(db.alarms.c.alarm_id == alarm_id)
                         .values(notified_at=None))

