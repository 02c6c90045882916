"""The re-brokerage pass's cost per retry (server/failurepolicy.py): a pass that plans once per
job shape and places a batch of retries (``Rebrokerage.process``), as a ratio to the per-job
``Brokerage.choose`` pass it replaced, both measured in this run on the same database.

    python benchmarks/rebrokerage.py [--db URL] [--retries N] [--sites N] [--old N]

Seeds ``--sites`` sites (1,000; one in 20 in test, one in 20 offline) and ``--retries`` waiting
retries (5,000: ``defined``, no site, a parent; three shapes; each with one input file and 1-3
excluded sites). The per-job pass of before runs on the first ``--old`` (200, its old batch)
retries, the new pass on all the others; every placement is checked (never an excluded, test
or offline site). Last line: one JSON object with ``speedup_vs_per_job`` (old ms per retry /
new ms per retry), both ms per retry, and the seconds of the new pass.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "server"))

from sqlalchemy import bindparam, select, update  # noqa: E402

from panda_core.states import JobState  # noqa: E402
from server import db  # noqa: E402
from server.brokerage import Brokerage, JobNeeds, input_endpoint  # noqa: E402
from server.failurepolicy import ACTOR, NO_SITE_LEFT, Rebrokerage  # noqa: E402
from server.hookspecs import plugin_manager  # noqa: E402
from server.taskbuffer import TaskBuffer  # noqa: E402

SHAPES = [(1, 1000), (1, 4000), (8, 16000)]          # (cores, memory MB)


def seed(tb: TaskBuffer, n_sites: int, n_retries: int, rng: random.Random) -> list[str]:
    """Sites and waiting retries, set-based (dbkit's seed, then one UPDATE per shape)."""
    from dbkit import seed_jobs, site_config
    names = [f"S{i:04d}" for i in range(n_sites)]
    tb.sites.sync([site_config(n, f"SE{i:04d}", cores=8, memory_mb=16000,
                               status="test" if i % 20 == 7 else
                               "offline" if i % 20 == 13 else "online")
                   for i, n in enumerate(names)])
    per = -(-n_retries // len(SHAPES))
    ids: list[int] = []
    for k, (cores, memory) in enumerate(SHAPES):
        _, got = seed_jobs(tb, None, min(per, n_retries - len(ids)), task_name=f"t{k}",
                           status=str(JobState.DEFINED), cores=cores, memory_mb=memory)
        ids += got
    with tb.engine.begin() as conn:
        conn.execute(update(db.jobs).where(db.jobs.c.panda_id == bindparam("pid")).values(
            parent_id=bindparam("pid"), excluded_sites=bindparam("ex")),
            [{"pid": pid, "ex": json.dumps(rng.sample(names, rng.randint(1, 3)))}
             for pid in ids])
    return names


def per_job_pass(tb: TaskBuffer, brokerage: Brokerage, limit: int) -> dict[int, str | None]:
    """The pass of before (one ``choose`` over every site, one transaction per retry)."""
    j = db.jobs.c
    with db.read(tb.engine) as conn:
        jobs = [dict(r._mapping) for r in conn.execute(
            select(db.jobs).where(j.status == str(JobState.DEFINED), j.site.is_(None),
                                  j.parent_id.is_not(None))
            .order_by(j.current_priority.desc(), j.panda_id).limit(limit))]
    sites, load = tb.sites.all(), tb.jobs.site_load()
    out: dict[int, str | None] = {}
    for job in jobs:
        pid = job["panda_id"]
        with db.read(tb.engine) as conn:
            inputs = [dict(r._mapping) for r in conn.execute(select(db.files).where(
                db.files.c.panda_id == pid, db.files.c.type == "input"))]
        excluded = set(json.loads(job["excluded_sites"] or "[]"))
        locality: dict[str, set[str]] = {}
        for f in inputs:
            locality.update(tb.data.replica_endpoints(f["scope"], [f["lfn"]]))
        needs = JobNeeds(cores=job["cores"], memory_mb=job["memory_mb"],
                         walltime_s=job["walltime_s"], disk_mb=job["disk_mb"],
                         prod_source_label=job["prod_source_label"],
                         input_lfns=[f["lfn"] for f in inputs])
        site, _ = brokerage.choose(needs, [s for s in sites if s["name"] not in excluded],
                                   load, locality)
        with tb.engine.begin() as conn:
            if site is None:
                tb.jobs.fail(conn, pid, [str(JobState.DEFINED)], actor=ACTOR, retry=False,
                             task_buffer_error_code=NO_SITE_LEFT)
            else:
                se = input_endpoint(next(s["config"] for s in sites if s["name"] == site))
                here = all(se in locality.get(f["lfn"], ()) for f in inputs)
                conn.execute(update(db.jobs).where(j.panda_id == pid, j.site.is_(None))
                             .values(site=site))
                tb.states.change(conn, pid, str(JobState.ACTIVATED if here else
                                                JobState.ASSIGNED),
                                 actor=ACTOR, expected=[str(JobState.DEFINED)])
        load.setdefault(site, {})["activated"] = load.get(site, {}).get("activated", 0) + 1
        out[pid] = site
    return out


def check(tb: TaskBuffer, placed: dict[int, str | None], usable: set[str]) -> None:
    """Every placement honours its retry's exclusions and the sites' status."""
    with db.read(tb.engine) as conn:
        rows = {r.panda_id: r for r in conn.execute(
            select(db.jobs.c.panda_id, db.jobs.c.site, db.jobs.c.excluded_sites))}
    for pid, site in placed.items():
        if site is not None:
            assert site in usable, (pid, site)
            assert site not in json.loads(rows[pid].excluded_sites), (pid, site)
            assert rows[pid].site == site, (pid, site, rows[pid].site)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", help="database URL (default: a new SQLite file)")
    ap.add_argument("--retries", type=int, default=5000)
    ap.add_argument("--sites", type=int, default=1000)
    ap.add_argument("--old", type=int, default=200, help="retries the per-job pass places")
    args = ap.parse_args()
    url = args.db or f"sqlite:///{tempfile.mkdtemp()}/rebrokerage-bench.db"
    engine = db.make_engine(url, pool_size=2)
    db.upgrade_schema(engine)
    tb = TaskBuffer(engine)
    rng = random.Random(19)
    names = seed(tb, args.sites, args.retries, rng)
    usable = {n for i, n in enumerate(names) if i % 20 not in (7, 13)}
    brokerage = Brokerage(plugin_manager(load_entry_points=False).hook)

    t0 = time.perf_counter()
    old = per_job_pass(tb, brokerage, args.old)
    old_ms = (time.perf_counter() - t0) * 1000 / max(1, len(old))
    check(tb, old, usable)
    print(f"per-job pass: {len(old)} retries, {old_ms:.2f} ms each", flush=True)

    t0 = time.perf_counter()
    new = Rebrokerage(tb, brokerage, per_pass=args.retries).process()
    took = time.perf_counter() - t0
    new_ms = took * 1000 / max(1, len(new))
    check(tb, new, usable)
    print(f"planned pass: {len(new)} retries in {took:.2f} s, {new_ms:.3f} ms each "
          f"({sum(1 for s in new.values() if s is None)} without a site)", flush=True)
    engine.dispose()
    print(json.dumps({"backend": engine.dialect.name, "sites": args.sites,
                      "retries": len(old) + len(new), "new_pass_s": round(took, 2),
                      "new_ms_per_retry": round(new_ms, 3),
                      "per_job_ms_per_retry": round(old_ms, 2),
                      "speedup_vs_per_job": round(old_ms / new_ms, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
