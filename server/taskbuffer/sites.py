"""Sites: their configs as the site-config folder or the API gave them, and a per-process copy
of them for the pilots' requests."""
from __future__ import annotations

import threading
import time

from sqlalchemy import insert, select, update

from .. import db
from .base import NotFound, Store


class Sites:
    def __init__(self, store: Store):
        self.store = store
        # every site's row as one read saw them, and when that copy goes stale (monotonic)
        self._rows: dict[str, dict] = {}
        self._expires = 0.0
        self._refreshing = threading.Lock()

    def sync(self, configs: list[dict]) -> list[str]:
        """Insert or replace site configs (dicts from site_configs.SiteConfig.to_dict)."""
        now = self.store.clock()
        names = []
        with self.store.engine.begin() as conn:
            for cfg in configs:
                name = cfg["name"]
                values = {"status": cfg.get("status", "online"), "config": cfg, "updated": now}
                res = conn.execute(update(db.sites).where(db.sites.c.name == name).values(**values))
                if res.rowcount == 0:
                    conn.execute(insert(db.sites).values(name=name, **values))
                names.append(name)
        for name in names:          # this process sees its own change at once
            self.forget(name)
        return names

    def get(self, name: str) -> dict:
        with db.read(self.store.engine) as conn:
            row = conn.execute(select(db.sites).where(db.sites.c.name == name)).first()
        if row is None:
            raise NotFound(f"unknown site {name!r}")
        return effective(dict(row._mapping))

    def forget(self, name: str) -> None:
        """Drop this process's copy of ``name``'s row (its status changed): the next
        ``get_cached`` reads it again."""
        rows = dict(self._rows)
        if rows.pop(name, None) is not None:
            self._rows = rows

    def get_cached(self, name: str, max_age_s: float = 5.0) -> dict:
        """``get`` through a per-process copy of every site's row: every getJob and updateJob
        needs its site's config, which changes rarely; a change is seen within ``max_age_s``.

        The copy is read for all sites at once (one query per process every ``max_age_s``,
        by one thread while the others go on with the previous copy), not site by site: with
        a row per site expiring on its own, a grid of many sites paid a read, and on the
        PostgreSQL hot path an update through the general path, per site every few seconds.
        A site the copy does not hold (new since, or forgotten) is read by itself; an unknown
        one raises NotFound."""
        row = self.cached(name)
        if row is None:
            row = self._refresh(max_age_s).get(name)
            if row is None:
                row = self.get(name)
                self._rows = {**self._rows, name: row}
        return row

    def cached(self, name: str) -> dict | None:
        """The site's row if this process's copy has it and is fresh, or is being read again
        by another thread (no database read); else None."""
        if time.monotonic() < self._expires or self._refreshing.locked():
            return self._rows.get(name)
        return None

    def _refresh(self, max_age_s: float) -> dict[str, dict]:
        """Every site's row, read again if the copy is stale; while another thread reads
        them, its previous copy (only the very first callers wait)."""
        if time.monotonic() < self._expires:
            return self._rows
        if not self._refreshing.acquire(blocking=not self._rows):
            return self._rows
        try:
            if time.monotonic() < self._expires:          # read while we waited for the lock
                return self._rows
            rows = {row["name"]: row for row in self.all()}
            self._rows, self._expires = rows, time.monotonic() + max_age_s
            return rows
        finally:
            self._refreshing.release()

    def all(self) -> list[dict]:
        with db.read(self.store.engine) as conn:
            return [effective(dict(r._mapping)) for r in
                    conn.execute(select(db.sites).order_by(db.sites.c.name))]


def effective(row: dict) -> dict:
    """A site's row as everyone should see it: a status the failure policy set
    (``auto_status``, server/failurepolicy.py) overrides the config's, with its reason; the
    configured one stays in ``configured_status``."""
    row["configured_status"] = row["status"]
    if row.get("auto_status"):
        row["status"] = row["auto_status"]
        row["status_reason"] = row.get("auto_reason")
        row["config"] = {**(row.get("config") or {}), "status": row["auto_status"]}
    return row
