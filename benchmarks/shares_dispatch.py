"""What share-aware dispatch and the periodic passes cost.

Loads one site with N activated jobs spread over three shares and dispatches them through the
dispatcher's getJob function (no HTTP: the database work is what the chooser changes): the
baseline is the plain priority order measured in the same run, against the share chooser
asked share by share (its 2 s cache, and no cache), and against one ORDER BY CASE query. Then times one priority recompute over N waiting jobs and one watcher pass that
fails N silent jobs (with their retries). Prints one line per measurement, then one JSON object:
plain_dispatch_per_s, shares_dispatch_per_s, shares_nocache_dispatch_per_s,
case_order_dispatch_per_s, their ratios to plain, recompute_jobs_per_s, watcher_jobs_per_s.

    python benchmarks/shares_dispatch.py [--jobs 3000] [--dispatches 600] [--quick]
        [--pg postgresql+psycopg://postgres@127.0.0.1:5432]

Default SQLite (one scratch file per variant); ``--pg ADMIN_URL`` creates one scratch PostgreSQL
database per variant on that server and drops them at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "server")]

from logic_kit import ManualClock, site, submitter, task  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from server.auth import KeyStore  # noqa: E402
from server.db import create_schema, make_engine  # noqa: E402
from server.dispatcher import Dispatcher  # noqa: E402
from server.dispatchpath import GeneralPath, in_pool  # noqa: E402
from server.hookspecs import plugin_manager  # noqa: E402
from server.shares import ShareChooser, recompute_priorities  # noqa: E402
from server.taskbuffer import TaskBuffer  # noqa: E402
from server.watcher import Watcher  # noqa: E402

SITE = "BENCH"
SHARES = ("mc", "reprocessing", "analysis")


def fresh_tb(url: str, clock: ManualClock) -> TaskBuffer:
    engine = make_engine(url, pool_size=4)
    create_schema(engine)
    tb = TaskBuffer(engine, clock=clock)
    from sqlalchemy import delete

    from server import db
    with engine.begin() as conn:
        for table in reversed(db.metadata.sorted_tables):
            conn.execute(delete(table))
    tb.sites.sync([site(SITE, max_running=10 ** 6)])
    return tb


def load(tb: TaskBuffer, n: int) -> None:
    sub = submitter(tb)
    for i, share in enumerate(SHARES):
        sub.submit(task(f"b{i}", n_jobs=n // len(SHARES), site=SITE, share=share,
                        priority=1000 + i), owner=f"user{i}")


class CaseOrder(GeneralPath):
    """The chooser's ORDER BY shape only (no share steps): one query sorted by a CASE on the
    share."""

    def __init__(self, tb: TaskBuffer, chooser: ShareChooser):
        super().__init__(tb, in_pool())
        self.chooser = chooser

    def take_job(self, req, share):
        return self.tb.jobs.dispatch(req.site, order_by=self.chooser(req.site), **req.fit,
                                     **req.who)


def dispatch_rate(tb: TaskBuffer, keys: KeyStore, chooser, n: int) -> float:
    """getJobs per second through the dispatcher (its database work in the thread pool);
    ``chooser``: a job chooser, or a CaseOrder path."""
    if isinstance(chooser, CaseOrder):
        disp = Dispatcher(tb, keys, path=chooser)
    else:
        disp = Dispatcher(tb, keys, chooser)

    async def drain() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            reply = await disp.get_job({"siteName": SITE, "node": "wn"}, None)
            if reply.get("StatusCode") != 0:
                raise RuntimeError("ran out of jobs")
        return n / (time.perf_counter() - t0)
    return asyncio.run(drain())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=3000)
    p.add_argument("--dispatches", type=int, default=600)
    p.add_argument("--quick", action="store_true", help="1000 jobs, 200 dispatches")
    p.add_argument("--pg", metavar="ADMIN_URL",
                   help="run on PostgreSQL: server URL without a database name")
    args = p.parse_args()
    logging.disable(logging.WARNING)          # the watcher logs each job it fails
    if args.quick:
        args.jobs, args.dispatches = 1000, 200
    scratch: list[str] = []

    def new_url(tmp: str, name: str) -> str:
        if not args.pg:
            return f"sqlite:///{tmp}/{name}.db"
        db_name = f"panda_bench_{name}_{uuid.uuid4().hex[:6]}"
        admin = create_engine(args.pg.rstrip("/") + "/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db_name}"'))
        admin.dispose()
        scratch.append(db_name)
        return f"{args.pg.rstrip('/')}/{db_name}"

    try:
        return run(args, new_url)
    finally:
        if scratch:
            admin = create_engine(args.pg.rstrip("/") + "/postgres", isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                for db_name in scratch:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
            admin.dispose()


def run(args, new_url) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        url = new_url(tmp, "periodic")
        clock = ManualClock()
        results = {}
        keys = KeyStore(Path(tmp) / "keys")
        variants = {"plain": lambda tb: None,
                    "shares": lambda tb: ShareChooser(tb, ttl_s=2.0),
                    "shares_nocache": lambda tb: ShareChooser(tb, ttl_s=0),
                    "case_order": lambda tb: CaseOrder(tb, ShareChooser(tb, ttl_s=2.0))}
        setups = {}
        for name, make in variants.items():
            db_url = new_url(tmp, name)
            tb = fresh_tb(db_url, clock)
            load(tb, args.jobs)
            setups[name] = (tb, make(tb))
        # interleaved rounds, so load from other processes on the machine hits every variant
        rates: dict[str, list[float]] = {name: [] for name in variants}
        rounds = 5
        for _ in range(rounds):
            for name, (tb, chooser) in setups.items():
                rates[name].append(dispatch_rate(tb, keys, chooser, args.dispatches // rounds))
        for name, (tb, _) in setups.items():
            rate = statistics.median(rates[name])
            results[f"{name}_dispatch_per_s"] = round(rate, 1)
            print(f"{name:15s} dispatch: {rate:8.1f} jobs/s (median of {rounds} rounds; "
                  f"{args.jobs} activated, {args.dispatches} dispatched, {tb.dialect})")
            tb.engine.dispose()

        tb = fresh_tb(url, clock)
        load(tb, args.jobs)
        clock.advance(hours=3)
        t0 = time.perf_counter()
        changed = recompute_priorities(tb, plugin_manager(load_entry_points=False).hook)
        dt_rec = time.perf_counter() - t0
        print(f"priority recompute: {args.jobs} waiting jobs in {dt_rec:.3f} s ({changed} changed)")
        for _ in range(args.dispatches):
            tb.jobs.dispatch(SITE, node="wn", actor="bench")
        clock.advance(hours=2)
        t0 = time.perf_counter()
        report = Watcher(tb, batch=10 ** 6).check()
        dt_w = time.perf_counter() - t0
        print(f"watcher pass: {len(report.failed)} silent jobs failed and retried in {dt_w:.3f} s")
        tb.engine.dispose()
    plain = results["plain_dispatch_per_s"]
    results.update(
        shares_ratio_vs_plain=round(results["shares_dispatch_per_s"] / plain, 3),
        shares_nocache_ratio_vs_plain=round(results["shares_nocache_dispatch_per_s"] / plain, 3),
        case_order_ratio_vs_plain=round(results["case_order_dispatch_per_s"] / plain, 3),
        recompute_jobs_per_s=round(args.jobs / dt_rec, 1),
        watcher_jobs_per_s=round(len(report.failed) / dt_w, 1) if report.failed else None)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
