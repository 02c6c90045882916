"""Flat cost as the grid grows (issue 19): dispatch, brokerage, monitor and archiver at 1M jobs.

One run on PostgreSQL, two databases side by side, each with its own ``panda server``
(2 processes), measured phase by phase in turn with 50 simulated pilots (``dispatch.Conn``):
  - baseline: 10,000 activated jobs at one site (topped up so it never drops below 10,000),
    and 20,000 over the same 100 sites as below (200 each) for the 100-site baseline;
  - big: 1,000,000 activated jobs at one site, 1,000,000 ended ones in the table (10 % failed,
    older than the archive age, with higher PandaIDs than the live ones) and 1,000,000 more
    activated jobs over 100 other sites (10,000 each).
Jobs are in two shares (mc, analysis: the share ranking is on the getJob path) and have no
files (the dispatch statement is index-bound either way; files would only slow the seeding).
Phases: getJob only, and full cycles (getJob, running, finished), against the baseline, the big
site, and the 100 sites (each pilot bound to one; against the 10k one-site baseline as the issue
asks, and against the small 100-site baseline, which tells a cost of the table's size from a
cost of the number of sites). Then, on the big database:
  - brokerage of one task of 100,000 jobs over 1,000 sites (``Brokerage.plan``, in process;
    half the jobs with an input held at one of the sites), against the per-job ``choose`` of
    before, measured on 200 jobs;
  - the monitor's overview ``/`` (p50 of 10 requests), also on the baseline;
  - the archiver: ms per 1,000 jobs moved (20,000 moved), the live rows ahead of them, and on
    the baseline (10,000 ended jobs, few live rows ahead);
  - one pass of the priority recompute (50,000 jobs from its cursor).

    python benchmarks/scale.py [--quick]

``--quick`` seeds 100,000 instead of 1,000,000 per big set (and says so: "big_jobs"), fewer
requests, one round. The last line is one JSON object: getjob_ratio_1m_vs_10k,
cycle_ratio_1m_vs_10k, cycle_ratio_1m_100sites_vs_10k (targets >= 0.8), getjob_p99_ms_1m
(< 50), broker_100k_1000sites_s (< 10), monitor_overview_ms_1m (< 100),
archive_ms_per_1000_1m (< 50), and the rates and same-run baselines behind them (the
absolute times move with the machine's load; the ratios much less).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import dispatch as d  # noqa: E402  (the dispatch benchmark's helpers: database, client, CPU)

BIG_SITE = "BIG_SITE"
BASE_SITE = "BASE_SITE"
N_SITES = 100
PILOTS = 50
BASE_ENDED = 10_000
BASE_SPREAD = 20_000            # 200 per site: what two rounds of cycles take, and more


def site_name(i: int) -> str:
    return f"S{i:03d}"


# ---------------------------------------------------------------------- seeding
JOB_INSERT = """
INSERT INTO jobs (task_id, serial, attempt_nr, max_attempts, status, site, owner,
  prod_source_label, share, priority, current_priority, transformation, job_pars, cores,
  memory_mb, walltime_s, disk_mb, creation_time, modification_time, state_changed,
  pilot_error_code, pilot_error_diag, exe_error_code, dispatcher_error_code, ddm_error_code,
  task_buffer_error_code)
SELECT :task, g, 1, 1, {status}, {site}, 'bench', 'managed',
  CASE WHEN g % 5 = 0 THEN 'analysis' ELSE 'mc' END, 1000, 1000, '/bin/true', '', 1, 1000,
  600, 100, :t, :t, :t, {pec}, {diag}, 0, 0, 0, 0
FROM generate_series(1, :n) g
"""


def _site_config(name: str) -> dict:
    se = {"name": f"SE_{name}", "url": "file:///nonexistent"}
    return {"name": name, "status": "online", "resources": {"cores": 8},
            "pilots": {"max_running": 1000}, "storage": {"input": se, "output": se}}


def seed(url: str, *, base_jobs: int = 0, big: int = 0) -> None:
    """Schema, sites and jobs, set-based; ``big``: the size of each big set."""
    from sqlalchemy import text

    from server import db
    from server.taskbuffer import TaskBuffer, utcnow

    engine = db.make_engine(url, pool_size=1)
    db.upgrade_schema(engine)
    tb = TaskBuffer(engine)
    now = utcnow()
    old = now - dt.timedelta(days=7)
    sites = [BIG_SITE if not base_jobs else BASE_SITE] + [site_name(i) for i in range(N_SITES)]
    tb.sites.sync([_site_config(s) for s in sites])

    def task(conn, name: str, site: str | None) -> int:
        task_id = tb.tasks.insert(conn, name=name, owner="bench", params={"name": name},
                                  priority=1000, share="mc", site=site, max_attempts=1)
        tb.tasks.set_status(conn, task_id, "running")
        return task_id

    def insert(conn, task_id, n, status, site_sql, t, pec="0", diag="NULL"):
        conn.execute(text(JOB_INSERT.format(status=status, site=site_sql, pec=pec, diag=diag)),
                     {"task": task_id, "n": n, "t": t})

    with engine.begin() as conn:
        if base_jobs:
            insert(conn, task(conn, "base", BASE_SITE), base_jobs, "'activated'",
                   f"'{BASE_SITE}'", now)
            # the 100 sites' baseline: few jobs per site (what 100 sites cost at a small table)
            insert(conn, task(conn, "base-spread", None), BASE_SPREAD, "'activated'",
                   f"'S' || lpad((g % {N_SITES})::text, 3, '0')", now)
            # the archiver's and the monitor's baseline: ended jobs with few live rows ahead
            insert(conn, task(conn, "base-ended", BASE_SITE), BASE_ENDED,
                   "CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'finished' END", f"'{BASE_SITE}'",
                   old, pec="CASE WHEN g % 10 = 0 THEN 1305 ELSE 0 END",
                   diag="CASE WHEN g % 10 = 0 THEN 'payload failed' END")
        else:
            insert(conn, task(conn, "big", BIG_SITE), big, "'activated'", f"'{BIG_SITE}'", now)
            insert(conn, task(conn, "spread", None), big, "'activated'",
                   f"'S' || lpad((g % {N_SITES})::text, 3, '0')", now)
            insert(conn, task(conn, "ended", BIG_SITE), big,
                   "CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'finished' END", f"'{BIG_SITE}'",
                   old, pec="CASE WHEN g % 10 = 0 THEN 1305 ELSE 0 END",
                   diag="CASE WHEN g % 10 = 0 THEN 'payload failed' END")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()


# ---------------------------------------------------------------------- servers and pilots
def start_server(url: str, tmp: Path) -> tuple[subprocess.Popen, int, Path]:
    port = d.free_port()
    keys = tmp / "keys"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "panda_wms.cli", "server", "--db", url, "--port", str(port),
         "--host", "127.0.0.1", "--key-dir", str(keys), "--processes", "2", "--threads", "8",
         "--archive-interval", "0", "--watcher-interval", "0", "--ops-interval", "0",
         "--log-level", "WARNING"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    d.wait_port(port, proc, timeout=60)
    return proc, port, keys


def tokens(keys: Path, sites: list[str]) -> dict[str, str]:
    from server.auth import KeyStore
    store = KeyStore(keys)
    return {s: store.issue_token(f"bench-{s}", "pilot", s) for s in sites}


async def _phase(mode: str, port: int, pilots: list[tuple[str, str]], limit: int) -> dict:
    """``pilots``: (site, token) per simulated pilot; stops after ``limit`` jobs."""
    lat: dict[str, list[float]] = {"getJob": [], "updateJob": []}
    done = {"jobs": 0, "requests": 0, "errors": 0}
    conns = [(site, d.Conn(port, token)) for site, token in pilots]
    await asyncio.gather(*(c.open() for _, c in conns))
    tp = time.perf_counter

    async def worker(site: str, c) -> None:
        form = {"siteName": site, "node": "bench-wn", "prodSourceLabel": "managed",
                "cpu": "2000", "mem": "4000", "diskSpace": "20000"}
        while done["jobs"] < limit:
            t = tp()
            job = await c.post("getJob", form)
            lat["getJob"].append(tp() - t)
            done["requests"] += 1
            if job.get("StatusCode") != 0:
                done["errors"] += job.get("StatusCode") != 20
                return
            done["jobs"] += 1
            if mode == "getjob":
                continue
            base = {"jobId": job["PandaID"], "attemptNr": job["attemptNr"], "siteName": site}
            t = tp()
            r1 = await c.post("updateJob", {**base, "state": "running", "node": "bench-wn"})
            lat["updateJob"].append(tp() - t)
            stored = {lfn: {"guid": str(uuid.uuid4()), "fsize": 100,
                            "adler32": f"{zlib.adler32(lfn.encode()):08x}",
                            "surl": f"file:///se/bench/{lfn}"}
                      for lfn in filter(None, job.get("outFiles", "").split(","))}
            t = tp()
            r2 = await c.post("updateJob", {**base, "state": "finished", "transExitCode": 0,
                                            "xml": json.dumps(stored)})
            lat["updateJob"].append(tp() - t)
            done["requests"] += 2
            done["errors"] += (r1.get("StatusCode") != 0) + (r2.get("StatusCode") != 0)

    t0 = tp()
    await asyncio.gather(*(worker(s, c) for s, c in conns))
    took = tp() - t0
    for _, c in conns:
        c.close()
    return {"took": took, **done, "lat": lat}


def _client(args: tuple, queue) -> None:
    queue.put(asyncio.run(_phase(*args)))


def run_phase(mode: str, port: int, pilots: list[tuple[str, str]], limit: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_client, args=((mode, port, pilots, limit), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def rate(res: dict) -> tuple[float, float]:
    """(jobs/s, getJob p99 ms)."""
    return res["jobs"] / res["took"], d.pct(res["lat"]["getJob"], 0.99) * 1000


# ---------------------------------------------------------------------- the other costs
def broker_seconds(n_jobs: int, n_sites: int) -> tuple[float, float, dict[str, int]]:
    """(seconds to broker ``n_jobs`` over ``n_sites`` with a plan, ms per job with the
    per-job ``choose`` of before, jobs per site of the plan)."""
    from server.brokerage import Brokerage, JobNeeds
    from server.hookspecs import plugin_manager

    rng = random.Random(7)
    sites = [{"name": f"B{i:04d}", "config": {
        "status": "online", "resources": {"cores": 8, "memory_mb": 32000},
        "pilots": {"max_running": rng.choice([50, 200, 1000])},
        "storage": {"input": {"name": f"SE{i:04d}"}}}} for i in range(n_sites)]
    load = {s["name"]: {"running": rng.randrange(0, 500)} for s in sites}
    locality = {f"f{k}": {f"SE{rng.randrange(n_sites):04d}"} for k in range(n_jobs // 2)}
    broker = Brokerage(plugin_manager(load_entry_points=False).hook)
    needs = JobNeeds(cores=1, memory_mb=2000, walltime_s=3600, disk_mb=1000)
    t0 = time.perf_counter()
    plan = broker.plan(needs, sites, load)
    spread: dict[str, int] = {}
    for k in range(n_jobs):
        site = plan.site_for([f"f{k}"] if k < n_jobs // 2 else [], locality)
        spread[site] = spread.get(site, 0) + 1
    took = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_old = 200
    for k in range(n_old):
        broker.choose(JobNeeds(cores=1, memory_mb=2000, walltime_s=3600, disk_mb=1000,
                               input_lfns=[f"f{k}"]), sites, load, locality)
    per_job_ms = (time.perf_counter() - t0) * 1000 / n_old
    return took, per_job_ms, spread


def monitor_ms(port: int, n: int) -> float:
    import requests
    session = requests.Session()
    url = f"http://127.0.0.1:{port}/"
    for _ in range(2):
        session.get(url, timeout=120).raise_for_status()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.get(url, timeout=120).raise_for_status()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def archive_ms_per_1000(url: str, n: int) -> float:
    from server import db
    from server.archive import archive_jobs
    from server.taskbuffer import TaskBuffer
    engine = db.make_engine(url, pool_size=2)
    try:
        tb = TaskBuffer(engine)
        t0 = time.perf_counter()
        moved = archive_jobs(tb, older_than_s=86400, limit=n)
        return (time.perf_counter() - t0) * 1000 / max(1, moved) * 1000
    finally:
        engine.dispose()


def priority_pass_ms(url: str) -> float:
    from server import db
    from server.hookspecs import plugin_manager
    from server.shares import PriorityCursor, recompute_priorities
    from server.taskbuffer import TaskBuffer
    engine = db.make_engine(url, pool_size=2)
    try:
        tb = TaskBuffer(engine)
        hook = plugin_manager(load_entry_points=False).hook
        cursor = PriorityCursor()
        recompute_priorities(tb, hook, cursor=cursor)
        t0 = time.perf_counter()
        recompute_priorities(tb, hook, cursor=cursor)         # a pass from the middle
        return (time.perf_counter() - t0) * 1000
    finally:
        engine.dispose()


def dispatched_twice(url: str) -> int:
    from sqlalchemy import func, select

    from server import db
    engine = db.make_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            return len(conn.execute(
                select(db.job_history.c.panda_id).where(db.job_history.c.new_status == "sent")
                .group_by(db.job_history.c.panda_id).having(func.count() > 1)).all())
    finally:
        engine.dispose()


# ---------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="100,000 jobs per big set instead of 1,000,000; one round")
    ap.add_argument("--big", type=int, help="jobs per big set (default 1,000,000)")
    args = ap.parse_args()
    big = args.big or (100_000 if args.quick else 1_000_000)
    rounds = 1 if args.quick else 2
    n_get, n_cyc = (2000, 1000) if args.quick else (5000, 2500)
    base_jobs = 10_000 + rounds * (n_get + 2 * n_cyc) + 2 * PILOTS

    tmp = Path(tempfile.mkdtemp(prefix="panda-scale-"))
    base_url, big_url = d.create_db(), d.create_db()
    procs: list[subprocess.Popen] = []
    t_start = time.perf_counter()
    try:
        t = time.perf_counter()
        seed(base_url, base_jobs=base_jobs)
        seed(big_url, big=big)
        print(f"seeded {base_jobs} baseline jobs and 3 x {big} big ones in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        (tmp / "base").mkdir()
        (tmp / "big").mkdir()
        base_proc, base_port, base_keys = start_server(base_url, tmp / "base")
        big_proc, big_port, big_keys = start_server(big_url, tmp / "big")
        procs += [base_proc, big_proc]
        base_tok = tokens(base_keys, [BASE_SITE] + [site_name(i) for i in range(N_SITES)])
        big_tok = tokens(big_keys, [BIG_SITE] + [site_name(i) for i in range(N_SITES)])
        setups = {
            "10k": (base_port, [(BASE_SITE, base_tok[BASE_SITE])] * PILOTS),
            "1m": (big_port, [(BIG_SITE, big_tok[BIG_SITE])] * PILOTS),
            "1m_100sites": (big_port, [(site_name(i % N_SITES), big_tok[site_name(i % N_SITES)])
                                       for i in range(PILOTS)]),
            "10k_100sites": (base_port, [(site_name(i % N_SITES),
                                          base_tok[site_name(i % N_SITES)])
                                         for i in range(PILOTS)]),
        }
        for name, (port, pilots) in setups.items():          # warm-up: pools, plans, caches
            run_phase("cycles", port, pilots, 200)
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(rounds):
            for mode, n in (("getjob", n_get), ("cycles", n_cyc)):
                for name, (port, pilots) in setups.items():
                    if mode == "getjob" and name.endswith("100sites"):
                        continue
                    res = run_phase(mode, port, pilots, n)
                    if res["errors"]:
                        print(f"  {mode} {name}: {res['errors']} errors", flush=True)
                    jobs_s, p99 = rate(res)
                    results.setdefault((mode, name), []).append((jobs_s, p99))
                    print(f"{mode:7s} {name:12s} {jobs_s:7.0f} jobs/s, getJob p99 "
                          f"{p99:7.1f} ms", flush=True)

        def med(mode: str, name: str, i: int = 0) -> float:
            return statistics.median(v[i] for v in results[(mode, name)])

        overview_ms = monitor_ms(big_port, 5 if args.quick else 10)
        overview_base_ms = monitor_ms(base_port, 5 if args.quick else 10)
        print(f"monitor overview / at {3 * big} jobs: {overview_ms:.0f} ms (at "
              f"{base_jobs + BASE_ENDED}: {overview_base_ms:.0f} ms)", flush=True)
        for p in procs:
            d.stop(p)
        procs = []
        twice = dispatched_twice(base_url) + dispatched_twice(big_url)
        broker_s, choose_ms, spread = broker_seconds(100_000, 1000)
        print(f"brokerage 100,000 jobs over 1,000 sites: {broker_s:.2f} s (per-job choose: "
              f"{choose_ms:.2f} ms a job, {choose_ms * 100:.0f} s for 100,000); "
              f"{len(spread)} sites used", flush=True)
        prio_ms = priority_pass_ms(big_url)
        print(f"priority recompute pass (50,000 jobs) at {2 * big} waiting: {prio_ms:.0f} ms")
        arch_base = archive_ms_per_1000(base_url, 5000)
        arch = archive_ms_per_1000(big_url, 5000 if args.quick else 20000)
        print(f"archiver: {arch:.1f} ms per 1,000 jobs with {2 * big} live rows ahead "
              f"({arch_base:.1f} ms with {base_jobs})")
        out = {
            "getjob_ratio_1m_vs_10k": round(med("getjob", "1m") / med("getjob", "10k"), 3),
            "cycle_ratio_1m_vs_10k": round(med("cycles", "1m") / med("cycles", "10k"), 3),
            "cycle_ratio_1m_100sites_vs_10k": round(med("cycles", "1m_100sites")
                                                    / med("cycles", "10k"), 3),
            "getjob_p99_ms_1m": round(med("getjob", "1m", 1), 1),
            "broker_100k_1000sites_s": round(broker_s, 2),
            "monitor_overview_ms_1m": round(overview_ms, 1),
            "archive_ms_per_1000_1m": round(arch, 1),
            "getjob_jobs_per_s_10k": round(med("getjob", "10k"), 1),
            "getjob_jobs_per_s_1m": round(med("getjob", "1m"), 1),
            "cycles_per_s_10k": round(med("cycles", "10k"), 1),
            "cycles_per_s_1m": round(med("cycles", "1m"), 1),
            "cycles_per_s_1m_100sites": round(med("cycles", "1m_100sites"), 1),
            "cycles_per_s_10k_100sites": round(med("cycles", "10k_100sites"), 1),
            "cycle_ratio_1m_100sites_vs_10k_100sites": round(
                med("cycles", "1m_100sites") / med("cycles", "10k_100sites"), 3),
            "getjob_p99_ms_10k": round(med("getjob", "10k", 1), 1),
            "broker_choose_ms_per_job_1000sites": round(choose_ms, 3),
            "priority_pass_ms_1m": round(prio_ms, 1),
            "getjob_p99_ratio_1m_vs_10k": round(med("getjob", "1m", 1)
                                                / max(med("getjob", "10k", 1), 0.001), 3),
            "monitor_overview_ms_10k": round(overview_base_ms, 1),
            "archive_ms_per_1000_10k": round(arch_base, 1),
            "dispatched_twice": twice, "big_jobs": 3 * big, "quick": args.quick,
            "rounds": rounds, "pilots": PILOTS, "server_processes": 2,
            "total_s": round(time.perf_counter() - t_start, 1),
            "load_avg": round(os.getloadavg()[0], 2)}
        print(json.dumps(out))
        return 0 if twice == 0 else 1
    finally:
        for p in procs:
            d.stop(p)
        d.drop_db(base_url)
        d.drop_db(big_url)


if __name__ == "__main__":
    sys.exit(main())
