"""Pilot overhead: pilot start -> payload start, and payload end -> pilot exit.

Each run starts ``panda pilot`` against a local dispatcher (the tests' faithful fake, on
127.0.0.1) that hands out one job with no input files; the payload writes the time it started and
the time it ended. The baseline, measured in the same run, is the bare cost of ``python -c pass``.
Prints one line per run, then one JSON object: start_to_payload_s, payload_end_to_exit_s,
python_start_s, pilot_rss_mb (medians), and ratios against python_start_s.
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "pilot")]

from pilotkit import TOKEN, make_job, pilot_cmd, pilot_env, site_config  # noqa: E402
from fakepanda import FakePanda  # noqa: E402


def timed_wait(proc: subprocess.Popen) -> tuple[float, int]:
    """Wait for ``proc``; return (exit time, max RSS in kB) from wait4."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.time(), usage.ru_maxrss


def python_start() -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.time() - t0


def pilot_run(fake: FakePanda, base: Path, i: int, with_log: bool) -> tuple[float, float, float]:
    marks = base / f"marks{i}"
    script = f"date +%s.%N > {marks}.start; date +%s.%N > {marks}.end"
    fake.add_job(make_job(1000 + i, script, log=with_log))
    cmd = pilot_cmd(fake, base / "wd", "--max-jobs", "1", "--no-recovery")
    env = pilot_env({"PANDA_LOG_LEVEL": "WARNING"})
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_exit, maxrss_kb = timed_wait(proc)
    if proc.returncode != 0 or not fake.final(1000 + i):
        raise SystemExit(f"pilot run {i} failed (exit {proc.returncode})")
    start = float(Path(f"{marks}.start").read_text())
    end = float(Path(f"{marks}.end").read_text())
    return start - t0, t_exit - end, maxrss_kb / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--no-log", action="store_true", help="jobs without a log tarball")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        se = base / "se"
        se.mkdir()
        fake = FakePanda(site_config(se), token=TOKEN).start()
        try:
            pilot_run(fake, base, 0, not args.no_log)      # warm the page cache
            python_start()
            py, s2p, e2x, rss = [], [], [], []
            for i in range(1, args.runs + 1):
                py.append(python_start())
                a, b, c = pilot_run(fake, base, i, not args.no_log)
                s2p.append(a)
                e2x.append(b)
                rss.append(c)
                print(f"run {i}: python_start {py[-1]:.3f} s  start_to_payload {a:.3f} s  "
                      f"payload_end_to_exit {b:.3f} s  pilot_rss {c:.1f} MB")
        finally:
            fake.stop()
    out = {"start_to_payload_s": round(statistics.median(s2p), 4),
           "payload_end_to_exit_s": round(statistics.median(e2x), 4),
           "python_start_s": round(statistics.median(py), 4),
           "pilot_rss_mb": round(statistics.median(rss), 1),
           "runs": args.runs, "with_log": not args.no_log}
    out["start_to_payload_vs_python"] = round(out["start_to_payload_s"] / out["python_start_s"], 2)
    out["end_to_exit_vs_python"] = round(out["payload_end_to_exit_s"] / out["python_start_s"], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
