"""Data: datasets, their files, replicas at storage elements, and the outputs a job stored."""
from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection

from panda_core.replicas import replica_url, same_location

from .. import db
from .base import Store

_UPDATE_STORED_FILE = update(db.files).where(db.files.c.row_id == bindparam("b_row_id")).values(
    status="ready", fsize=bindparam("b_fsize"), checksum=bindparam("b_checksum"),
    guid=bindparam("b_guid"), ddm_endpoint=bindparam("b_endpoint"))


class CatalogueConflict(ValueError):
    """A file registered again with other bytes: an lfn names one content, forever."""


def same_bytes(fsize, checksum, new_fsize, new_checksum) -> bool:
    """Whether a new registration may be the same file as an entry (a value one side does not
    give is not compared)."""
    if fsize is not None and new_fsize is not None and int(fsize) != int(new_fsize):
        return False
    if checksum and new_checksum and str(checksum).lower() != str(new_checksum).lower():
        return False
    return True


def stored_checksum(info: dict) -> str | None:
    """A stored file's checksum as the catalogue keeps it (``ad:<hex>`` or ``md5:<hex>``)."""
    if info.get("adler32"):
        return f"ad:{info['adler32']}"
    if info.get("md5sum"):
        return f"md5:{info['md5sum']}"
    return None


class Data:
    def __init__(self, store: Store):
        self.store = store

    def add_dataset_files(self, dataset: str, scope: str, file_list: list[dict],
                          ddm_endpoint: str | None, se_url: str | None = None,
                          authorize: Callable[[Connection], Any] | None = None) -> int:
        """Register files of ``dataset`` (and their replicas at ``ddm_endpoint``). Idempotent:
        a file registered again with the same size and checksum is a no-op. ``authorize(conn)``
        runs first in the transaction (the owners' checks; it raises to refuse). A file whose
        (scope, lfn) is already in the catalogue with another size or checksum is refused
        (CatalogueConflict, nothing registered). ``se_url``: the storage element's root URL;
        a replica's SURL is then the one the server computes, a different one is refused."""
        now = self.store.clock()
        added = 0
        with self.store.engine.begin() as conn:
            if authorize is not None:
                authorize(conn)
            if conn.execute(select(db.datasets.c.name).where(db.datasets.c.name == dataset)
                            ).first() is None:
                conn.execute(insert(db.datasets).values(name=dataset, scope=scope, created=now))
            known = self.catalogue_entries(conn, scope, [f["lfn"] for f in file_list])
            conflicts = []
            for f in file_list:        # the same lfn twice in one call counts as well
                known.setdefault(f["lfn"], set())
                for fsize, checksum in list(known[f["lfn"]]):
                    if not same_bytes(fsize, checksum, f.get("fsize"), f.get("checksum")):
                        conflicts.append(f"{scope}:{f['lfn']} is registered with "
                                         f"{fsize} bytes, {checksum or 'no checksum'}")
                        break
                known[f["lfn"]].add((f.get("fsize"), f.get("checksum")))
                if se_url and f.get("surl"):
                    expected = replica_url(se_url, scope, f["lfn"])
                    if not same_location(f["surl"], expected):
                        conflicts.append(f"{scope}:{f['lfn']}: surl {f['surl'][:200]} is not "
                                         f"its path on {ddm_endpoint} ({expected})")
            if conflicts:
                raise CatalogueConflict("; ".join(conflicts[:20])
                                        + (f"; and {len(conflicts) - 20} more"
                                           if len(conflicts) > 20 else ""))
            have = {r.lfn for r in conn.execute(select(db.dataset_files.c.lfn).where(
                db.dataset_files.c.dataset == dataset, db.dataset_files.c.scope == scope))}
            for f in file_list:
                if f["lfn"] not in have:
                    conn.execute(insert(db.dataset_files).values(
                        dataset=dataset, scope=scope, lfn=f["lfn"],
                        guid=f.get("guid") or str(uuid.uuid4()), fsize=f.get("fsize"),
                        checksum=f.get("checksum"), created=now))
                    have.add(f["lfn"])
                    added += 1
                if ddm_endpoint:
                    surl = replica_url(se_url, scope, f["lfn"]) if se_url else f.get("surl")
                    self._add_replica(conn, scope, f["lfn"], ddm_endpoint, surl)
        return added

    @staticmethod
    def catalogue_entries(conn: Connection, scope: str, lfns: list[str]
                          ) -> dict[str, set[tuple]]:
        """lfn -> the (fsize, checksum) pairs its catalogue entries have, in every dataset."""
        out: dict[str, set[tuple]] = {}
        c = db.dataset_files.c
        for i in range(0, len(lfns), 1000):
            for r in conn.execute(select(c.lfn, c.fsize, c.checksum).where(
                    c.scope == scope, c.lfn.in_(lfns[i:i + 1000]))):
                out.setdefault(r.lfn, set()).add((r.fsize, r.checksum))
        return out

    def _add_replica(self, conn: Connection, scope: str, lfn: str, ddm_endpoint: str,
                     surl: str | None) -> None:
        exists = conn.execute(select(db.replicas.c.row_id).where(
            db.replicas.c.scope == scope, db.replicas.c.lfn == lfn,
            db.replicas.c.ddm_endpoint == ddm_endpoint)).first()
        if exists is None:
            conn.execute(insert(db.replicas).values(scope=scope, lfn=lfn, ddm_endpoint=ddm_endpoint,
                                                    surl=surl, created=self.store.clock()))

    def add_replica(self, scope: str, lfn: str, ddm_endpoint: str, surl: str | None) -> None:
        with self.store.engine.begin() as conn:
            self._add_replica(conn, scope, lfn, ddm_endpoint, surl)

    def dataset_files(self, dataset: str, unused_only: bool = False) -> list[dict]:
        q = select(db.dataset_files).where(db.dataset_files.c.dataset == dataset)
        if unused_only:
            q = q.where(db.dataset_files.c.task_id.is_(None))
        with db.read(self.store.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(q.order_by(db.dataset_files.c.lfn))]

    def replica_endpoints(self, scope: str, lfns: list[str]) -> dict[str, set[str]]:
        """lfn -> storage elements that hold it."""
        out: dict[str, set[str]] = {lfn: set() for lfn in lfns}
        if not lfns:
            return out
        with db.read(self.store.engine) as conn:
            for r in conn.execute(select(db.replicas.c.lfn, db.replicas.c.ddm_endpoint).where(
                    db.replicas.c.scope == scope, db.replicas.c.lfn.in_(lfns))):
                out[r.lfn].add(r.ddm_endpoint)
        return out

    def file_replicas(self, dids: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
        """(scope, lfn) -> {"fsize", "checksum", "replicas": [(endpoint, surl), ...]} for the
        files of ``dids`` that have at least one replica; size and checksum from the dataset
        entries (the first that knows them). Two queries whatever the number of files."""
        out: dict[tuple[str, str], dict] = {}
        if not dids:
            return out
        wanted = set(dids)
        lfns = sorted({lfn for _, lfn in wanted})
        with db.read(self.store.engine) as conn:
            for r in conn.execute(select(db.replicas.c.scope, db.replicas.c.lfn,
                                         db.replicas.c.ddm_endpoint, db.replicas.c.surl)
                                  .where(db.replicas.c.lfn.in_(lfns))
                                  .order_by(db.replicas.c.row_id)):
                if (r.scope, r.lfn) in wanted:
                    out.setdefault((r.scope, r.lfn), {"fsize": None, "checksum": None,
                                                      "replicas": []}
                                   )["replicas"].append((r.ddm_endpoint, r.surl))
            if out:
                for r in conn.execute(select(db.dataset_files.c.scope, db.dataset_files.c.lfn,
                                             db.dataset_files.c.fsize,
                                             db.dataset_files.c.checksum)
                                      .where(db.dataset_files.c.lfn.in_(lfns))):
                    entry = out.get((r.scope, r.lfn))
                    if entry is not None:
                        entry["fsize"] = entry["fsize"] if entry["fsize"] is not None else r.fsize
                        entry["checksum"] = entry["checksum"] or r.checksum
        return out

    def register_stored(self, conn: Connection, outs: list, stored: dict[str, dict],
                        endpoint: str | None, now: dt.datetime, se_url: str | None = None,
                        problems: list[str] | None = None) -> list[str]:
        """A job's stored outputs (``outs``: its output and log file rows; ``stored``: what the
        pilot reported, by lfn) into the catalogue: file rows, replicas at ``endpoint``, dataset
        entries. A few statements whatever the number of files (one executemany, bulk inserts
        that ignore duplicates). Returns the expected outputs that were not stored.

        ``se_url``: the storage element's root URL. A file the pilot says it stored elsewhere
        than at the SURL the server computes for it (``replica_url``) counts as not stored
        (the reason goes to ``problems``); the replica registered carries the server's SURL."""
        missing, file_rows, replica_rows, dataset_rows = [], [], [], []
        known: dict[tuple[str, str], set[tuple]] = {}
        by_scope: dict[str, list[str]] = {}
        for f in outs:
            if f.type == "output" and f.lfn in stored:
                by_scope.setdefault(f.scope, []).append(f.lfn)
        for scope, lfns in by_scope.items():      # usually no entry: the names are new
            for lfn, pairs in self.catalogue_entries(conn, scope, lfns).items():
                known[(scope, lfn)] = pairs
        for f in outs:
            info = stored.get(f.lfn)
            for fsize, checksum in known.get((f.scope, f.lfn), ()):
                if info is not None and not same_bytes(fsize, checksum, info.get("fsize"),
                                                       stored_checksum(info)):
                    if problems is not None:
                        problems.append(f"{f.scope}:{f.lfn} is in the catalogue with other "
                                        f"bytes ({fsize} bytes, {checksum})")
                    info = None
            surl = info.get("surl") if info is not None else None
            if info is not None and se_url:
                expected = replica_url(se_url, f.scope, f.lfn)
                if surl and not same_location(surl, expected):
                    if problems is not None:
                        problems.append(f"{f.lfn} reported at {surl[:300]}, not at {expected}")
                    info = None
                surl = expected
            if info is None:
                if f.type == "output":
                    missing.append(f.lfn)
                continue
            checksum = stored_checksum(info)
            guid = info.get("guid") or f.guid
            file_rows.append({"b_row_id": f.row_id, "b_fsize": info.get("fsize"),
                              "b_checksum": checksum, "b_guid": guid, "b_endpoint": endpoint})
            if endpoint:
                replica_rows.append({"scope": f.scope, "lfn": f.lfn, "ddm_endpoint": endpoint,
                                     "surl": surl, "created": now})
            if f.type == "output":
                dataset_rows.append({"dataset": f.dataset, "scope": f.scope, "lfn": f.lfn,
                                     "guid": guid, "fsize": info.get("fsize"),
                                     "checksum": checksum, "task_id": None, "created": now})
        if file_rows:
            conn.execute(_UPDATE_STORED_FILE, file_rows)
        if replica_rows:
            self._insert_ignore(conn, db.replicas, replica_rows)
        if dataset_rows:
            self._insert_ignore(conn, db.dataset_files, dataset_rows)
        return missing

    def _insert_ignore(self, conn: Connection, table, rows: list[dict]) -> None:
        """Bulk INSERT that skips rows violating a unique constraint (idempotent registers)."""
        conn.execute(self.store.statement(("insert_ignore", table.name),
                                          lambda: self._insert_ignore_stmt(table)), rows)

    def _insert_ignore_stmt(self, table):
        dialect = self.store.dialect
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert
            return pg_insert(table).on_conflict_do_nothing()
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert
            return sqlite_insert(table).on_conflict_do_nothing()
        return insert(table).prefix_with("IGNORE")
