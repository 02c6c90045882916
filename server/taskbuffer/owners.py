"""Data has owners: who may write a scope, a dataset, a catalogue entry.

Rules (docs/security.md, "Data has owners"):

- A scope belongs to an account or a group. ``user.<name>`` is the account ``<name>``'s, and
  only its (created on its first write); ``group.<name>`` belongs to the members of the
  token group ``<name>``. Any other scope is registered by an admin
  (``scope/add``: an owner, or ``production``), or, under the server's default
  ``--scope-policy claim``, belongs to the first account that writes to it; under
  ``--scope-policy registered`` an unregistered scope is refused. A production scope is
  written only by a production manager (the ``admin`` role here).
- A dataset belongs to the account that created it; files are added to it only by that account.
  A task may read anyone's dataset, but only the owner's tasks consume its files (another's task
  takes them all without marking them used, and cannot be extended).
- A catalogue entry (scope, lfn) never changes its bytes: registering an existing lfn with
  another size or checksum is an error, the same one again is a no-op (retries stay idempotent).

An admin identity may do all of it. Reading stays open to anyone.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from panda_core.replicas import MAX_NAME_LENGTH

from .. import db

SCOPE_POLICIES = ("claim", "registered")


class OwnershipError(PermissionError):
    """A write to data the caller does not own; the message says whose it is."""


GROUP_OWNER = "group:"      # a scope owned by a group: ``group:<name>``


@dataclass(frozen=True)
class Owner:
    """Who writes: the account (token subject or DN), its token's groups, and whether it is
    an admin."""
    subject: str
    admin: bool = False
    groups: tuple[str, ...] = ()

    @classmethod
    def of(cls, identity) -> "Owner":
        """Of an ``auth.Identity``."""
        groups = tuple(g.strip("/") for g in getattr(identity, "groups", ()) or ())
        return cls(identity.subject, identity.role == "admin", groups)

    def is_(self, owner: str | None) -> bool:
        """Whether a scope's ``owner`` (an account, or ``group:<name>``) is this writer."""
        if owner is None:
            return False
        if owner.startswith(GROUP_OWNER):
            return owner[len(GROUP_OWNER):].strip("/") in self.groups
        return owner == self.subject


def user_scope(subject: str) -> str:
    """The account's own scope: ``user.<subject>``, a certificate DN's characters that a name
    may not hold replaced by '_' (``/C=CH/O=x/CN=a b`` is ``user.C_CH_O_x_CN_a_b``)."""
    name = re.sub(r"[^A-Za-z0-9._+:-]+", "_", subject).strip("._-+:")
    name = re.sub(r"\.{2,}", ".", name)
    return f"user.{name or 'anonymous'}"[:MAX_NAME_LENGTH]


class Ownership:
    """The owners of scopes and datasets, in the task buffer's database."""

    def __init__(self, store, policy: str = "claim"):
        if policy not in SCOPE_POLICIES:
            raise ValueError(f"scope policy must be one of {', '.join(SCOPE_POLICIES)}")
        self.store = store
        self.policy = policy

    # ------------------------------------------------------------------ scopes
    def check_scope(self, conn: Connection, who: Owner, scope: str) -> None:
        """Raise OwnershipError unless ``who`` may write ``scope``; claims a free one (an
        admin writes anywhere and claims nothing: it acts for others)."""
        if who.admin:
            return
        row = conn.execute(select(db.scopes).where(db.scopes.c.name == scope)).first()
        if row is not None:
            if row.production:
                raise OwnershipError(f"scope {scope} is a production scope: writing it needs "
                                     "the production (admin) role")
            if who.is_(row.owner):
                return
            raise OwnershipError(f"scope {scope} belongs to {row.owner}")
        if scope.startswith("group."):         # Rucio's group.<name>: the group's members'
            group = GROUP_OWNER + scope[len("group."):].split(".")[0]
            if not who.is_(group):
                raise OwnershipError(f"scope {scope} belongs to the group "
                                     f"{group[len(GROUP_OWNER):]}, which your token does not "
                                     f"name (groups: {', '.join(who.groups) or 'none'})")
            self._insert_scope(conn, scope, group, False)
            return
        if scope.startswith("user.") and scope != user_scope(who.subject):
            raise OwnershipError(f"scope {scope} is another account's user scope; yours is "
                                 f"{user_scope(who.subject)}")
        if self.policy == "registered" and scope != user_scope(who.subject):
            raise OwnershipError(f"scope {scope} is not registered (an admin adds it with "
                                 f"scope/add); your own is {user_scope(who.subject)}")
        self._insert_scope(conn, scope, who.subject, False)
        if not who.is_(conn.execute(select(db.scopes.c.owner)
                                    .where(db.scopes.c.name == scope)).scalar()):
            raise OwnershipError(f"scope {scope} was just claimed by another account")

    def _insert_scope(self, conn: Connection, scope: str, owner: str, production: bool) -> None:
        try:
            with conn.begin_nested():
                conn.execute(insert(db.scopes).values(name=scope, owner=owner,
                                                      production=production,
                                                      created=self.store.clock()))
        except IntegrityError:
            pass                                  # a concurrent claim: the owner check decides

    def add_scope(self, scope: str, owner: str, production: bool = False) -> dict:
        """Register (or re-assign) a scope: an admin's call."""
        with self.store.engine.begin() as conn:
            res = conn.execute(update(db.scopes).where(db.scopes.c.name == scope)
                               .values(owner=owner, production=production))
            if res.rowcount == 0:
                conn.execute(insert(db.scopes).values(name=scope, owner=owner,
                                                      production=production,
                                                      created=self.store.clock()))
        return {"scope": scope, "owner": owner, "production": production}

    def scopes(self) -> list[dict]:
        with db.read(self.store.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(db.scopes).order_by(db.scopes.c.name))]

    # ------------------------------------------------------------------ datasets
    def check_dataset(self, conn: Connection, who: Owner, dataset: str, scope: str,
                      create: bool = True) -> bool:
        """Raise OwnershipError unless ``who`` may add files to ``dataset``; create it (owned
        by ``who``) when it does not exist and ``create``. Returns whether it exists now."""
        row = conn.execute(select(db.datasets.c.owner).where(db.datasets.c.name == dataset)
                           ).first()
        if row is None:
            if not create:
                return False
            try:            # an admin's dataset has no owner: the first account to write it
                with conn.begin_nested():
                    conn.execute(insert(db.datasets).values(name=dataset, scope=scope,
                                                            owner=None if who.admin
                                                            else who.subject,
                                                            created=self.store.clock()))
                return True
            except IntegrityError:
                row = conn.execute(select(db.datasets.c.owner)
                                   .where(db.datasets.c.name == dataset)).first()
        if row.owner is None:           # made by an admin, or before datasets had owners
            if who.admin:
                return True
            conn.execute(update(db.datasets).where(db.datasets.c.name == dataset,
                                                   db.datasets.c.owner.is_(None))
                         .values(owner=who.subject))
            return True
        if row.owner != who.subject and not who.admin:
            raise OwnershipError(f"dataset {dataset} belongs to {row.owner}")
        return True

    def dataset_owner(self, dataset: str) -> str | None:
        with db.read(self.store.engine) as conn:
            return conn.execute(select(db.datasets.c.owner)
                                .where(db.datasets.c.name == dataset)).scalar()
