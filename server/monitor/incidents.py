"""The incidents logger: a standard ``logging.Handler`` that records what the server's
components (watcher, data service, brokerage, factory reports, alarms) log at WARNING and above
in the ``incidents`` table, for the monitor's incidents view.

Why a queue and a thread: a component may log while it holds a database transaction (on SQLite
the one write lock), so ``emit`` never touches the database; it only rate-limits and enqueues,
and a writer thread inserts in batches. The rate limit is per (logger, message template): at
most ``burst`` records per ``per_s`` seconds; the ones dropped are counted in the next record
that passes (``suppressed``). A full queue drops records and counts them too.
"""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass

from sqlalchemy import insert, select

from .. import db
from ..transient import retrying
from .params import Window

log = logging.getLogger(__name__)

#: the loggers whose incidents are recorded
COMPONENT_LOGGERS = ("server.watcher", "server.dataservice", "server.brokerage",
                     "server.submission", "server.taskbuffer.pilots", "server.api",
                     "server.monitor.alarms", "server.monitor.notify")
LEVELS = ("WARNING", "ERROR", "CRITICAL")


@dataclass
class _Bucket:
    start: float
    n: int = 0
    dropped: int = 0


class IncidentHandler(logging.Handler):
    def __init__(self, engine, burst: int = 20, per_s: float = 60.0, max_queue: int = 10000,
                 clock=None):
        super().__init__(logging.WARNING)
        self.engine = engine
        self.burst = burst
        self.per_s = per_s
        self.clock = clock
        self.host = socket.gethostname()[:255]
        self.queue: queue.Queue = queue.Queue(max_queue)
        self.buckets: dict[tuple[str, str], _Bucket] = {}
        self.lost = 0
        self.lock_ = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._writer, name="incidents", daemon=True)
        self.thread.start()

    def _admit(self, record: logging.LogRecord) -> int | None:
        """None: over the rate; else how many similar ones were dropped before it."""
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        with self.lock_:
            b = self.buckets.get(key)
            if b is None or now - b.start >= self.per_s:
                dropped = b.dropped if b else 0
                if len(self.buckets) > 5000:
                    self.buckets.clear()
                self.buckets[key] = _Bucket(now, 1)
                return dropped
            if b.n >= self.burst:
                b.dropped += 1
                return None
            b.n += 1
            dropped, b.dropped = b.dropped, 0
            return dropped

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(__name__):     # our own trouble: never recorded by us
            return
        dropped = self._admit(record)
        if dropped is None:
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is still an incident
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            message += f" ({type(record.exc_info[1]).__name__}: {record.exc_info[1]})"
        row = {"time": self.clock() if self.clock else _utc(record.created),
               "component": record.name[:128], "level": record.levelname[:16],
               "message": message[:4000], "site": _str(getattr(record, "site", None), 128),
               "panda_id": _int(getattr(record, "panda_id", None)), "host": self.host,
               "suppressed": dropped + self._take_lost()}
        try:
            self.queue.put_nowait(row)
        except queue.Full:
            with self.lock_:
                self.lost += 1

    def _take_lost(self) -> int:
        with self.lock_:
            lost, self.lost = self.lost, 0
        return lost

    def _writer(self) -> None:
        while not self.stopping.is_set() or not self.queue.empty():
            try:
                rows = [self.queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(rows) < 500:
                try:
                    rows.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                retrying(self._insert, rows)       # a database that blinked loses nothing
            except Exception as exc:  # noqa: BLE001 - the logger must never take the server down
                log.error("could not record %d incident(s): %s", len(rows), exc)
            finally:
                for _ in rows:
                    self.queue.task_done()

    def _insert(self, rows: list[dict]) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(db.incidents), rows)

    def flush(self) -> None:
        """Wait until every queued incident is written."""
        self.queue.join()

    def close(self) -> None:
        self.flush()
        self.stopping.set()
        self.thread.join(timeout=5)
        super().close()


def _utc(created: float):
    import datetime as dt
    return dt.datetime.fromtimestamp(created, dt.timezone.utc).replace(tzinfo=None)


def _str(value, n: int) -> str | None:
    return None if value is None else str(value)[:n]


def _int(value) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def install(engine, loggers=COMPONENT_LOGGERS, **kw) -> IncidentHandler:
    """Attach one incident handler to the components' loggers; returns it (``uninstall``)."""
    handler = IncidentHandler(engine, **kw)
    for name in loggers:
        logging.getLogger(name).addHandler(handler)
    return handler


def uninstall(handler: IncidentHandler, loggers=COMPONENT_LOGGERS) -> None:
    for name in loggers:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def listing(tb, window: Window, component: str | None = None, level: str | None = None,
            site: str | None = None, panda_id: int | None = None, limit: int = 200,
            before: int | None = None) -> list[dict]:
    """Incidents in the window, newest first, filtered; ``before``: keyset by row id."""
    i = db.incidents.c
    q = select(db.incidents).where(window.condition(i.time))
    if component:
        q = q.where(i.component == component) if "*" not in component else \
            q.where(i.component.like(component.replace("*", "%")))
    if level:
        q = q.where(i.level.in_([lv for lv in LEVELS if LEVELS.index(lv) >= LEVELS.index(level)]))
    if site:
        q = q.where(i.site == site)
    if panda_id is not None:
        q = q.where(i.panda_id == panda_id)
    if before is not None:
        q = q.where(i.row_id < before)
    with db.read(tb.engine) as conn:
        return [dict(r._mapping) for r in conn.execute(q.order_by(i.row_id.desc()).limit(limit))]
