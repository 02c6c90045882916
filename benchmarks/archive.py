"""The tiered archive's cost: moving N jobs with their files and history (server/archive.py),
as a ratio to moving the job rows only (the single-table archive it replaced), both measured
in this run on the same database and the same seeded rows.

    python benchmarks/archive.py [--db URL] [--jobs N]

Each job has 3 files and 1 history row (tests/server/dbkit.py's seed). Last line: one JSON
object with ``ratio_vs_jobs_only``, ``tiered_ms_per_1000``, ``jobs_only_ms_per_1000``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "server"))

from sqlalchemy import delete, insert, literal, select  # noqa: E402

from server import archivetiers, db  # noqa: E402
from server.archive import archive_jobs  # noqa: E402
from server.taskbuffer import TaskBuffer  # noqa: E402


def jobs_only(tb: TaskBuffer, batch: int = 1000) -> int:
    """The old way: job rows only, files and history left in the live tables."""
    now, j, moved = tb.clock(), db.jobs.c, 0
    names = [c.name for c in db.jobs.columns]
    while True:
        with tb.engine.begin() as conn:
            ids = [r[0] for r in conn.execute(select(j.panda_id).where(
                j.status == "finished").order_by(j.panda_id).limit(batch))]
            if not ids:
                return moved
            conn.execute(insert(db.jobs_archive).from_select(
                [*names, "archived_at"], select(*[j[n] for n in names],
                                                literal(now, db.Timestamp)).where(
                    j.panda_id.in_(ids))))
            conn.execute(delete(db.jobs).where(j.panda_id.in_(ids)))
        moved += len(ids)


def main() -> int:
    from dbkit import add_site, seed_jobs

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", help="database URL (default: a new SQLite file)")
    ap.add_argument("--jobs", type=int, default=5000)
    args = ap.parse_args()
    url = args.db or f"sqlite:///{tempfile.mkdtemp()}/archive-bench.db"
    engine = db.make_engine(url, pool_size=2)
    db.upgrade_schema(engine)
    clock = [dt.datetime(2026, 1, 1)]
    tb = TaskBuffer(engine, clock=lambda: clock[0])
    add_site(tb)
    results = {}
    for rnd in range(2):                     # alternate, so neither always runs on a warm cache
        for name, fn in (("jobs_only", jobs_only), ("tiered", None)):
            clock[0] = dt.datetime(2026, 1, 1)
            seed_jobs(tb, "SITE_A", args.jobs, status="finished")
            clock[0] += dt.timedelta(days=2)
            archivetiers.ensure_months(engine, clock[0])     # (the tiered run does this itself)
            t0 = time.perf_counter()
            moved = fn(tb) if fn else archive_jobs(tb, older_than_s=3600)
            took = (time.perf_counter() - t0) * 1000 / moved * 1000
            results.setdefault(name, []).append(took)
            print(f"round {rnd + 1}: {name}: {moved} jobs, {took:.1f} ms per 1,000", flush=True)
            with engine.begin() as conn:                         # same start for the next
                for table in (db.jobs_archive, db.files, db.job_history, db.files_archive,
                              db.job_history_archive):
                    conn.execute(delete(table))
    engine.dispose()
    tiered, only = min(results["tiered"]), min(results["jobs_only"])
    print(json.dumps({"backend": engine.dialect.name, "jobs": args.jobs,
                      "tiered_ms_per_1000": round(tiered, 1),
                      "jobs_only_ms_per_1000": round(only, 1),
                      "ratio_vs_jobs_only": round(tiered / only, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
