"""``panda simulate WORKLOAD [--db URL] [--out DIR] [--processes N]``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="panda simulate",
        description="Replay a workload (sites, shares, tasks) against the real server and its "
                    "brokerage with simulated pilots; write a report, SVG plots and a summary.")
    p.add_argument("workload", help="the workload file (YAML or JSON; docs/simulate.md)")
    p.add_argument("--db", help="database URL (default: a new SQLite file in --out); the "
                                "database must hold no jobs")
    p.add_argument("--out", default="simulation", help="folder for the report (default: "
                                                       "./simulation)")
    p.add_argument("--processes", type=int, default=1, help="server processes (default 1)")
    p.add_argument("--speed", type=float, help="simulated seconds per real second "
                                               "(overrides the workload's)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from .report import build_report, summary_table, write_report
    from .run import SimulationError, simulate
    from .workload import WorkloadError, load_workload

    if args.processes < 1 or args.processes > 64:
        p.error("--processes: from 1 to 64")
    try:
        w = load_workload(args.workload)
    except WorkloadError as exc:
        sys.stderr.write(f"panda simulate: {exc}\n")
        return 2
    if args.speed is not None:
        if not 0.01 <= args.speed <= 10**6:
            p.error("--speed: from 0.01 to 1000000")
        w.speed = args.speed
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        sys.stderr.write(f"panda simulate: --out {out}: {exc.strerror or exc}\n")
        return 2
    db_url = args.db or f"sqlite:///{(out / 'simulation.db').resolve()}"
    if args.db is None and (out / "simulation.db").exists():
        (out / "simulation.db").unlink()
    from ..db import make_engine
    from ..taskbuffer import TaskBuffer
    try:
        run = simulate(w, db_url, out, processes=args.processes)
    except SimulationError as exc:
        sys.stderr.write(f"panda simulate: {exc}\n")
        return 2
    engine = make_engine(db_url, pool_size=1)
    try:
        report = build_report(TaskBuffer(engine), run)
    finally:
        engine.dispose()
    write_report(report, run, out)
    sys.stdout.write(summary_table(report))
    sys.stdout.write(f"\nreport, plots and summary in {out}/\n")
    return 0 if report["completed"] and report["every_job_ended"] else 1
