"""The large ``panda simulate`` scenario (issue 19) against the CI-sized one, in one run.

Both run through the real command (``panda simulate``, a subprocess each) on PostgreSQL, each on
a fresh database of its own (dropped afterwards), with the same number of server processes:
  1. baseline: ``tests/server/data/simulate-ci.yaml`` (3 sites, 16 slots, 310 jobs);
  2. large: ``benchmarks/simulate-large.yaml`` (1,000 sites, 4,160 slots, 100,000 jobs in 20
     tasks of 5,000).
Ratios, large against baseline: dispatched jobs (attempts) per real second (``ratio_vs_ci``);
and the fraction of what the pilots asked for (slots x speed / mean payload duration) that the
server served (``served_ratio_vs_ci``: 1.0 when the large grid is kept up with as well as the
small one, lower when 1,000 sites, 4,160 pilots and 100,000 jobs slow it down).

    python benchmarks/simulate_large.py [--processes 2] [--workload FILE] [--keep DIR]

Run it under ``flock /work/bench.lock`` (it loads both cores for ~10 minutes). Prints each
run's summary table, then one JSON line: jobs, every_job_ended, dispatched_per_s (both),
ratio_vs_ci, throughput_per_hour (simulated), queue_time_p95_s (simulated), the largest share
deviation, the brokerage spread (attempts per slot over the sites) and the wall times.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from dispatch import PG_ADMIN, admin_connection  # noqa: E402 - after the path insert above

CI = REPO / "tests" / "server" / "data" / "simulate-ci.yaml"
LARGE = REPO / "benchmarks" / "simulate-large.yaml"


def create_db() -> str:
    """A fresh PostgreSQL database of this run (only this run's are ever dropped)."""
    from sqlalchemy import text
    name = f"panda_simlarge_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with admin_connection() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return f"{PG_ADMIN}/{name}"


def drop_db(url: str) -> None:
    from sqlalchemy import text
    with admin_connection() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))


def run_scenario(workload: Path, out: Path, processes: int) -> dict:
    """``panda simulate`` on a database of its own; its report (and the command's exit code)."""
    url = create_db()
    try:
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "panda_wms.cli", "simulate", str(workload),
                              "--db", url, "--out", str(out), "--processes", str(processes)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        elapsed = time.monotonic() - t0
    finally:
        drop_db(url)
    (out / "simulate.log").write_text(res.stdout)
    if not (out / "report.json").exists():
        sys.stderr.write(res.stdout[-4000:])
        raise SystemExit(f"{workload.name}: no report (exit {res.returncode})")
    report = json.loads((out / "report.json").read_text())
    report["exit_code"] = res.returncode
    report["command_s"] = round(elapsed, 1)
    sys.stdout.write((out / "summary.md").read_text() + "\n")
    return report


def dispatched_per_s(r: dict) -> float:
    return r["attempts"] / r["wall_s"] if r["wall_s"] else 0.0


def demand_per_s(path: Path) -> float:
    """Jobs per real second the workload's slots would take if the server answered at once:
    slots x speed / the mean payload duration (weighted by jobs)."""
    from server.simulate.workload import load_workload
    w = load_workload(path)
    mean = sum(t.n_jobs * t.duration_s for t in w.tasks) / max(1, w.n_jobs)
    return sum(s.slots for s in w.sites) * w.speed / mean if mean else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--workload", type=Path, default=LARGE, help="the large scenario")
    ap.add_argument("--baseline", type=Path, default=CI, help="the same-run baseline")
    ap.add_argument("--keep", type=Path, help="keep both runs' reports and plots here")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="simulate-large-"))
    os.environ.setdefault("PANDA_SIMULATE_SERVER_LOG", "WARNING")
    small = run_scenario(args.baseline, root / "baseline", args.processes)
    large = run_scenario(args.workload, root / "large", args.processes)
    small_rate, large_rate = dispatched_per_s(small), dispatched_per_s(large)
    # the fraction of what its pilots asked for that each run's server served: near 1 for
    # both means the large grid is dispatched as promptly as the small one
    small_served = small_rate / (demand_per_s(args.baseline) or 1)
    large_served = large_rate / (demand_per_s(args.workload) or 1)
    deviations = [abs(s["deviation"]) for s in large["shares"].values()
                  if s["deviation"] is not None]
    line = {
        "workload": large["workload"], "sites": large["sites"], "slots": large["slots"],
        "jobs": large["jobs"], "every_job_ended": large["every_job_ended"],
        "completed": large["completed"], "attempts": large["attempts"],
        "dispatched_per_s": round(large_rate, 1), "ci_dispatched_per_s": round(small_rate, 1),
        "ratio_vs_ci": round(large_rate / small_rate, 3) if small_rate else None,
        "served_of_demand": round(large_served, 3), "ci_served_of_demand": round(small_served, 3),
        "served_ratio_vs_ci": round(large_served / small_served, 3) if small_served else None,
        "throughput_per_hour": large["throughput_per_hour"],
        "queue_time_p95_s": large["queue_time_s"]["p95"],
        "share_deviation_max": round(max(deviations), 4) if deviations else None,
        "contended_samples": large["contended_samples"],
        "brokerage_spread": large["brokerage_spread"],
        "pilot_errors": large["n_pilot_errors"], "submit_errors": len(large["submit_errors"]),
        "speed": large["speed"], "wall_s": large["wall_s"], "ci_wall_s": small["wall_s"],
        "command_s": large["command_s"], "processes": args.processes,
    }
    print(f"dispatched jobs per real second: large {large_rate:.1f}, CI {small_rate:.1f} "
          f"(ratio {line['ratio_vs_ci']}); of what the pilots asked for: large "
          f"{large_served:.2f}, CI {small_served:.2f} (ratio {line['served_ratio_vs_ci']}); "
          f"reports in {root}")
    print(json.dumps(line))
    return 0 if large["every_job_ended"] and large["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
