"""The monitor's heaviest views on PostgreSQL with a million jobs in the tables.

A fresh PostgreSQL database gets N jobs (default 1,000,000) in one server-side INSERT ...
SELECT: created uniformly over 30 days at 50 sites, 200 tasks and 20 users; jobs of the last
two hours in the active states, an activated backlog of older jobs, the rest finished, failed
(with pilot, payload, dispatcher, data-service and task-buffer codes) or cancelled. All of them
stay in the live ``jobs`` table (the worst case: the archiver has not moved any). Then
``VACUUM ANALYZE``, a ``panda server`` on it, and sequential requests for the job list, the error
summary and the dashboard pages (HTML, default windows): p50 and p95 per view. Target: p95 <
300 ms each. The database is dropped afterwards.

    python benchmarks/monitor.py [--quick] [--jobs N] [--requests N]

The last line is JSON: jobs_p95_ms, errors_p95_ms, dash_p95_ms, jobs_in_db, db (and the p50s).
``--quick`` seeds 100,000 jobs and says so in jobs_in_db.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from server import db  # noqa: E402

PG_ADMIN = os.environ.get("PANDA_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
VIEWS = {"jobs": "/monitor/jobs", "errors": "/monitor/errors", "dash": "/monitor/dash"}
N_SITES, N_TASKS, N_USERS = 50, 200, 20

SEED = """
INSERT INTO jobs (task_id, serial, attempt_nr, max_attempts, status, site, owner,
    prod_source_label, share, priority, current_priority, transformation, job_pars, cores,
    memory_mb, walltime_s, disk_mb, creation_time, modification_time, state_changed,
    start_time, end_time, pilot_error_code, pilot_error_diag, exe_error_code, exe_error_diag,
    dispatcher_error_code, dispatcher_error_diag, ddm_error_code, ddm_error_diag,
    task_buffer_error_code, task_buffer_error_diag, cpu_consumption_time, max_rss,
    working_group)
SELECT 1 + i % :tasks, i, 1 + (i % 7 = 0)::int, 3, st, 'SITE_' || lpad((i % :sites)::text, 3, '0'),
    'user' || (i % :users), CASE WHEN i % 4 = 0 THEN 'user' ELSE 'managed' END,
    CASE WHEN i % 4 = 0 THEN 'analysis' ELSE 'production' END, 1000, 1000, '/bin/sh',
    '-c true', CASE WHEN i % 10 = 0 THEN 8 ELSE 1 END, 2000, 3600, 1000,
    t - interval '20 minutes', t, t, t - interval '15 minutes',
    CASE WHEN st IN ('finished', 'failed', 'cancelled') THEN t END,
    CASE WHEN st = 'failed' AND i % 5 = 0 THEN 1099 WHEN st = 'failed' AND i % 5 = 1 THEN 1305
         ELSE 0 END,
    CASE WHEN st = 'failed' AND i % 5 IN (0, 1) THEN 'pilot diag ' || (i % 13) END,
    CASE WHEN st = 'failed' AND i % 5 = 2 THEN 65 ELSE 0 END,
    CASE WHEN st = 'failed' AND i % 5 = 2 THEN 'payload exited with 65' END,
    CASE WHEN st = 'failed' AND i % 5 = 3 THEN 100 ELSE 0 END,
    CASE WHEN st = 'failed' AND i % 5 = 3 THEN 'lost heartbeat' END,
    CASE WHEN st = 'failed' AND i % 5 = 4 THEN 100 ELSE 0 END,
    CASE WHEN st = 'failed' AND i % 5 = 4 THEN 'input not placed' END,
    CASE WHEN st = 'cancelled' THEN 300 ELSE 0 END,
    CASE WHEN st = 'cancelled' THEN 'killed' END,
    CASE WHEN st IN ('finished', 'failed') THEN 600.0 END,
    CASE WHEN st IN ('finished', 'failed') THEN 1000000 END, 'AP_' || (i % 5)
FROM (
    SELECT i, t, CASE
        WHEN t > now() AT TIME ZONE 'utc' - interval '2 hours' THEN
            (ARRAY['running', 'running', 'running', 'activated', 'activated', 'starting',
                   'sent', 'holding', 'transferring', 'finished'])[1 + i % 10]
        WHEN i % 50 = 0 AND t > now() AT TIME ZONE 'utc' - interval '3 days' THEN 'activated'
        WHEN i % 20 < 16 THEN 'finished'
        WHEN i % 20 < 19 THEN 'failed'
        ELSE 'cancelled' END AS st
    FROM (SELECT i, now() AT TIME ZONE 'utc' - (i::float / :n) * interval '30 days' AS t
          FROM generate_series(1, :n) AS i) AS g
) AS s
"""


def create_db() -> str:
    name = f"panda_bench_monitor_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG_ADMIN + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{PG_ADMIN}/{name}"


def drop_db(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN + "/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def seed(url: str, n: int) -> int:
    engine = db.make_engine(url, pool_size=1)
    db.create_schema(engine)
    t0 = time.monotonic()
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tasks (name, status, owner, priority, share, site, "
                          "max_attempts, params, created, modified) SELECT 'task' || i, "
                          "'running', 'user' || (i % :u), 1000, 'production', NULL, 3, '{}', "
                          "now(), now() FROM generate_series(1, :t) AS i"),
                     {"u": N_USERS, "t": N_TASKS})
        conn.execute(text("INSERT INTO sites (name, status, config, updated) SELECT "
                          "'SITE_' || lpad(i::text, 3, '0'), 'online', json_build_object("
                          "'name', 'SITE_' || lpad(i::text, 3, '0'), 'region', 'R' || (i % 5)),"
                          " now() FROM generate_series(0, :s - 1) AS i"), {"s": N_SITES})
        conn.execute(text("INSERT INTO pilots (factory, batch_id, site, backend, state, "
                          "submitted, updated) SELECT 'fac', i::text, 'SITE_' || "
                          "lpad((i % :s)::text, 3, '0'), 'slurm', (ARRAY['queued', 'running', "
                          "'done'])[1 + i % 3], now() AT TIME ZONE 'utc' - (i % 360) * "
                          "interval '1 minute', now() AT TIME ZONE 'utc' - (i % 360) * "
                          "interval '1 minute' FROM generate_series(1, 20000) AS i"),
                     {"s": N_SITES})
        conn.execute(text(SEED), {"n": n, "tasks": N_TASKS, "sites": N_SITES,
                                  "users": N_USERS})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE"))
        total = conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()
    engine.dispose()
    print(f"seeded {total} jobs in {time.monotonic() - t0:.1f} s", flush=True)
    return int(total)


def start(url: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, str(REPO / "tests"))
    from peers import free_port
    port = free_port()
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "panda_wms.cli", "server", "--db", url,
                             "--port", str(port), "--key-dir", str(tmp / "keys"), "--no-auth",
                             "--watcher-interval", "0", "--ops-interval", "0",
                             "--archive-interval", "0", "--log-level", "WARNING"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(base + "/api/v1/system/is_alive", timeout=1)
            return proc, base
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError((tmp / "server.log").read_text())


def measure(base: str, path: str, n: int) -> list[float]:
    session = requests.Session()
    for _ in range(3):                                       # warm the caches and the plans
        session.get(base + path, timeout=60).raise_for_status()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        reply = session.get(base + path, timeout=60)
        out.append(1000.0 * (time.perf_counter() - t0))
        reply.raise_for_status()
    return out


def p95(values: list[float]) -> float:
    return round(statistics.quantiles(values, n=20)[-1], 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100,000 jobs, fewer requests")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--requests", type=int, default=None)
    args = ap.parse_args()
    n = args.jobs or (100_000 if args.quick else 1_000_000)
    reqs = args.requests or (20 if args.quick else 40)
    url = create_db()
    proc = None
    try:
        total = seed(url, n)
        with tempfile.TemporaryDirectory() as tmp:
            proc, base = start(url, Path(tmp))
            result: dict = {}
            for name, path in VIEWS.items():
                times = measure(base, path, reqs)
                result[f"{name}_p95_ms"] = p95(times)
                result[f"{name}_p50_ms"] = round(statistics.median(times), 1)
                print(f"{name:7s} {path:16s} p50 {result[f'{name}_p50_ms']:7.1f} ms  "
                      f"p95 {result[f'{name}_p95_ms']:7.1f} ms  ({reqs} requests)", flush=True)
            proc.terminate()
            proc.wait(timeout=20)
            proc = None
    finally:
        if proc is not None:
            proc.kill()
        drop_db(url)
    ok = all(result[f"{v}_p95_ms"] < 300 for v in VIEWS)
    print(f"target p95 < 300 ms each: {'met' if ok else 'NOT met'}")
    print(json.dumps({**{k: result[k] for k in ("jobs_p95_ms", "errors_p95_ms", "dash_p95_ms")},
                      "jobs_in_db": total, "db": "postgresql",
                      **{k: v for k, v in result.items() if k.endswith("p50_ms")},
                      "quick": n != 1_000_000}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
