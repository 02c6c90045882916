"""Sites: their configs as the site-config folder or the API gave them, and a per-process cache
of them for the pilots' requests."""
from __future__ import annotations

import time

from sqlalchemy import insert, select, update

from .. import db
from .base import NotFound, Store


class Sites:
    def __init__(self, store: Store):
        self.store = store
        self._cache: dict[str, tuple[float, dict]] = {}

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
        return names

    def get(self, name: str) -> dict:
        with db.read(self.store.engine) as conn:
            row = conn.execute(select(db.sites).where(db.sites.c.name == name)).first()
        if row is None:
            raise NotFound(f"unknown site {name!r}")
        return effective(dict(row._mapping))

    def forget(self, name: str) -> None:
        """Drop this process's cached row of ``name`` (its status changed)."""
        self._cache.pop(name, None)

    def get_cached(self, name: str, max_age_s: float = 5.0) -> dict:
        """``get`` through a per-process cache: every getJob and updateJob needs the site's
        config, which changes rarely; a change is seen within ``max_age_s``."""
        row = self.cached(name)
        if row is None:
            row = self.get(name)
            self._cache[name] = (time.monotonic() + max_age_s, row)
        return row

    def cached(self, name: str) -> dict | None:
        """The site's row if the cache has it (no database read), else None."""
        hit = self._cache.get(name)
        return hit[1] if hit is not None and hit[0] > time.monotonic() else None

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
