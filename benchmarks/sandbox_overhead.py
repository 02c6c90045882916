"""What the bwrap sandbox adds to a pilot's start-to-payload time (issue 16: target <= 20 ms).

Pilot runs with ``sandbox: {runtime: none}`` and with ``{runtime: bwrap, network: false}``
alternate against the tests' fake dispatcher (one job, no inputs, no log tarball); the payload
writes the time it started into its own work dir (a sandboxed payload sees nothing else), kept
with ``--keep-workdirs``. The pilots share one job dirs' base, so only the first probes bwrap
(pilot.sandbox.ready records a working probe per node). The baseline is the unsandboxed run of the same round: the JSON's
``sandbox_extra_s`` is the median of (bwrap - none) over the rounds, ``sandbox_ratio`` their
medians' ratio. ``sandbox_extra(runs)`` is what benchmarks/pilot_overhead.py calls.
``sandbox_exec_extra_s`` is the same difference without the pilot (the exit-code wrapper
starting ``date`` bare and through bwrap, many rounds): on a loaded machine the whole-pilot
number is noise, this one is not.
"""
from __future__ import annotations

import argparse
import json
import shutil
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


def _run(fake: FakePanda, base: Path, panda_id: int, sandbox: dict) -> float:
    fake.site_config["sandbox"] = sandbox
    fake.add_job(make_job(panda_id, "date +%s.%N > marks.start", log=False))
    wd = base / "wd"        # one base for the node's pilots, as deployed (the probe record)
    cmd = pilot_cmd(fake, wd, "--max-jobs", "1", "--no-recovery", "--keep-workdirs")
    t0 = time.time()
    proc = subprocess.run(cmd, env=pilot_env({"PANDA_LOG_LEVEL": "WARNING"}),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    final = fake.final(panda_id)
    if proc.returncode != 0 or not final or final["state"] != "finished":
        raise SystemExit(f"pilot run {panda_id} ({sandbox['runtime']}) failed: "
                         f"{proc.stderr[-2000:]}")
    jobdir = next(wd.glob(f"panda_job_{panda_id}_*"))
    start = float((jobdir / "work" / "marks.start").read_text())
    shutil.rmtree(jobdir, ignore_errors=True)
    return start - t0


def sandbox_extra(runs: int = 7) -> dict:
    """Median start-to-payload with and without bwrap, and the median difference (seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        se = base / "se"
        se.mkdir()
        fake = FakePanda(site_config(se), token=TOKEN).start()
        try:
            none, bwrap = {"runtime": "none"}, {"runtime": "bwrap", "network": False}
            _run(fake, base, 1, none)                   # warm the page cache
            _run(fake, base, 2, bwrap)
            plain, boxed = [], []
            for i in range(runs):
                # alternate which goes first, so a drift of the machine's load cancels out
                order = [(plain, none), (boxed, bwrap)][:: 1 if i % 2 == 0 else -1]
                for j, (into, sandbox) in enumerate(order):
                    into.append(_run(fake, base, 10 + 2 * i + j, sandbox))
                print(f"round {i + 1}: none {plain[-1]:.4f} s  bwrap {boxed[-1]:.4f} s",
                      flush=True)
        finally:
            fake.stop()
    extra = statistics.median(b - p for p, b in zip(plain, boxed))
    return {"sandbox_extra_s": round(extra, 4),
            "start_to_payload_none_s": round(statistics.median(plain), 4),
            "start_to_payload_bwrap_s": round(statistics.median(boxed), 4),
            "sandbox_ratio": round(statistics.median(boxed) / statistics.median(plain), 3),
            "sandbox_runs": runs}


def exec_extra(rounds: int = 41) -> dict:
    """What bwrap adds between starting the payload and its first instruction, without a
    pilot around it (the machine's noise on a whole pilot run is larger than the sandbox):
    the pilot's own exit-code wrapper running ``date``, bare and through
    ``BwrapSandbox.wrap``, alternating; medians and the median of the differences."""
    from panda_core.siteconfig import SandboxConfig
    from pilot.payload import _WRAPPER
    from pilot.sandbox import SandboxSpec, load

    sandbox = load(SandboxConfig(runtime="bwrap", network=False))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "jobs" / "panda_job_1_1" / "work"
        work.mkdir(parents=True)
        argv = ["date", "+%s.%N"]

        def once(boxed: bool) -> float:
            cmd, env = argv, {"PATH": "/usr/bin:/bin"}
            if boxed:
                w = sandbox.wrap(SandboxSpec(argv=argv, env=env, workdir=work,
                                             hide=[Path(tmp) / "jobs"]))
                cmd, env = w.argv, w.env
            t0 = time.time()
            out = subprocess.run(["/bin/sh", "-c", _WRAPPER, "payload", *cmd], cwd=work,
                                 env=env, capture_output=True, text=True, check=True).stdout
            return float(out) - t0

        once(False), once(True)
        plain, boxed = [], []
        for i in range(rounds):
            for into, flag in [(plain, False), (boxed, True)][:: 1 if i % 2 == 0 else -1]:
                into.append(once(flag))
    return {"sandbox_exec_extra_s": round(statistics.median(b - p for p, b in
                                                              zip(plain, boxed)), 4),
            "payload_exec_none_s": round(statistics.median(plain), 4),
            "payload_exec_bwrap_s": round(statistics.median(boxed), 4),
            "exec_rounds": rounds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    if shutil.which("bwrap") is None:
        print("bwrap is not installed (Debian: bubblewrap)", file=sys.stderr)
        return 2
    out = exec_extra()
    print(f"payload exec: none {out['payload_exec_none_s']:.4f} s  bwrap "
          f"{out['payload_exec_bwrap_s']:.4f} s", flush=True)
    print(json.dumps({**sandbox_extra(args.runs), **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
