"""Revoked bearer tokens: the ``jti`` of each, kept until the token would have expired, so
every server process can refuse it (server/tokens.py's RevocationList reads them)."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from .. import db
from .base import Store


class RevokedTokens:
    def __init__(self, store: Store):
        self.store = store

    def revoke(self, jti: str, expires: float, by: str, subject: str | None = None,
               reason: str | None = None) -> bool:
        """Record ``jti`` as revoked; False when it already was."""
        values = dict(jti=jti, subject=subject, revoked_by=by, reason=(reason or None),
                      expires=dt.datetime.fromtimestamp(expires, dt.timezone.utc)
                      .replace(tzinfo=None), revoked_at=self.store.clock())
        try:
            with self.store.engine.begin() as conn:
                conn.execute(insert(db.revoked_tokens).values(**values))
        except IntegrityError:
            return False
        return True

    def active(self) -> list[str]:
        """The jti of every revoked token that has not expired yet."""
        with db.read(self.store.engine) as conn:
            return list(conn.execute(select(db.revoked_tokens.c.jti).where(
                db.revoked_tokens.c.expires >= self.store.clock())).scalars())

    def list(self) -> list[dict]:
        with db.read(self.store.engine) as conn:
            rows = conn.execute(select(db.revoked_tokens).where(
                db.revoked_tokens.c.expires >= self.store.clock())
                .order_by(db.revoked_tokens.c.revoked_at)).all()
        return [dict(r._mapping) for r in rows]

    def purge(self) -> int:
        """Forget tokens that have expired (they are refused for that already)."""
        with self.store.engine.begin() as conn:
            return conn.execute(delete(db.revoked_tokens).where(
                db.revoked_tokens.c.expires < self.store.clock())).rowcount
