"""How soon the arc backend sees a job end: REST states against ``fast_states``, same jobs, same run.

Needs root and Debian's nordugrid-arc packages (the test CE of tests/schedulers/arc_ce.py is
started, or an A-REX already running is used). N trivial jobs (``/bin/true``) are submitted at
once; two backends poll the same jobs every second, one reading REST states only, one with
``fast_states`` (the job manager's own state for jobs REST still shows running). Baseline: the
REST-only backend. Also the cost of one ``status`` call for the N jobs while they run.

    python benchmarks/arc_states.py [--jobs N]

Prints one line per measurement, then one JSON object with rest_s, fast_s (median submit -> done
seen), ratio_fast_vs_rest, status_call_ms_rest, status_call_ms_fast.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "schedulers")]

from arc_ce import start_ce  # noqa: E402
from schedulers.arc import ArcBackend  # noqa: E402
from schedulers.base import FINAL_BATCH_STATES, PilotSpec  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    ce = start_ce()
    try:
        rest = ArcBackend(**{**ce.options, "fast_states": False})
        fast = ArcBackend(**{**ce.options, "fast_states": True})
        submitted = {}
        for i in range(args.jobs):
            job_id = rest.submit(PilotSpec(site="BENCH", name=f"bench-{i}", walltime_s=600,
                                           command=["/bin/true"]))
            submitted[job_id] = time.monotonic()
        seen: dict[str, dict[str, float]] = {"rest": {}, "fast": {}}
        call_ms: dict[str, list[float]] = {"rest": [], "fast": []}
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and any(len(s) < args.jobs for s in seen.values()):
            for name, backend in (("rest", rest), ("fast", fast)):
                pending = [j for j in submitted if j not in seen[name]]
                if not pending:
                    continue
                t0 = time.perf_counter()
                states = backend.status(pending)
                call_ms[name].append((time.perf_counter() - t0) * 1000)
                now = time.monotonic()
                for job_id, state in states.items():
                    if state in FINAL_BATCH_STATES:
                        seen[name][job_id] = now - submitted[job_id]
            time.sleep(1)
        rest.client.clean(list(submitted))
    finally:
        ce.stop()
    if any(len(s) < args.jobs for s in seen.values()):
        sys.stdout.write(f"not all jobs ended within {args.timeout:g} s: {seen}\n")
        return 1
    rest_s = statistics.median(seen["rest"].values())
    fast_s = statistics.median(seen["fast"].values())
    result = {"jobs": args.jobs, "rest_s": round(rest_s, 1), "fast_s": round(fast_s, 1),
              "ratio_fast_vs_rest": round(fast_s / rest_s, 3),
              "status_call_ms_rest": round(statistics.median(call_ms["rest"]), 1),
              "status_call_ms_fast": round(statistics.median(call_ms["fast"]), 1)}
    sys.stdout.write(f"submit -> done seen, REST states only (baseline): {rest_s:.1f} s\n")
    sys.stdout.write(f"submit -> done seen, fast_states:                {fast_s:.1f} s "
                     f"({result['ratio_fast_vs_rest']:.2f}x the baseline)\n")
    sys.stdout.write(f"one status call for {args.jobs} running jobs: REST "
                     f"{result['status_call_ms_rest']} ms, fast_states "
                     f"{result['status_call_ms_fast']} ms\n")
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
