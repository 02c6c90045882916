"""Scheduler overhead: the local backend and the factory cycle, against baselines of the same run.

1. local backend: submit N pilots running ``true`` and poll ``status`` until all are done, against
   the baseline of N bare ``subprocess.Popen(["true"])`` + wait.
2. factory cycle: ``Factory.run_once()`` for one online site with no activated jobs (one GET to the
   server), against the baseline of one bare ``requests.get`` of ``system/is_alive``; the server is
   a real ``panda server`` subprocess on 127.0.0.1.
3. with ``--slurm`` (root, slurm-wlm installed): submit -> done latency of one ``true`` pilot
   through a private single-node Slurm, against the local backend's.
Prints one line per measurement, then one JSON object.
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
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "schedulers")]

import requests  # noqa: E402
import yaml  # noqa: E402

from schedulers.base import FINAL_BATCH_STATES, BatchState, PilotSpec  # noqa: E402
from schedulers.factory import Factory  # noqa: E402
from schedulers.local import LocalBackend  # noqa: E402
from site_configs import EXAMPLES_DIR, parse_site_config  # noqa: E402


def bare_processes(n: int) -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["true"]) for _ in range(n)]
    for p in procs:
        p.wait()
    return time.perf_counter() - t0


def run_to_done(backend, specs: list[PilotSpec], poll: float = 0.01) -> float:
    t0 = time.perf_counter()
    ids = [backend.submit(s) for s in specs]
    while True:
        states = backend.status(ids)
        if all(s in FINAL_BATCH_STATES for s in states.values()):
            break
        time.sleep(poll)
    elapsed = time.perf_counter() - t0
    bad = [i for i, s in states.items() if s != BatchState.DONE]
    if bad:
        raise SystemExit(f"pilots did not end done: {bad}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pilots", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--slurm", action="store_true")
    args = ap.parse_args()
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        # 1. local backend
        local_t, bare_t = [], []
        for run in range(args.runs):
            backend = LocalBackend(slots=args.pilots, state_dir=str(base / f"local{run}"))
            specs = [PilotSpec(site="B", command=["true"], workdir=str(base / f"w{run}-{i}"))
                     for i in range(args.pilots)]
            bare_t.append(bare_processes(args.pilots))
            local_t.append(run_to_done(backend, specs))
            print(f"local run {run}: {args.pilots} pilots {local_t[-1]:.3f} s, "
                  f"bare Popen {bare_t[-1]:.3f} s")
        result["local_pilots"] = args.pilots
        result["local_submit_to_done_s"] = statistics.median(local_t)
        result["bare_popen_s"] = statistics.median(bare_t)
        result["local_vs_bare_ratio"] = result["local_submit_to_done_s"] / result["bare_popen_s"]

        # 2. factory cycle against a real server
        from conftest import start_server, stop_server
        sites = base / "sites"
        sites.mkdir()
        data = yaml.safe_load((EXAMPLES_DIR / "LOCAL_DEMO.yaml").read_text())
        (sites / "LOCAL_DEMO.yaml").write_text(yaml.safe_dump(data))
        server = start_server(base / "srv", site_dir=sites)
        try:
            token = server.token("pilot", "bench")
            site = parse_site_config(data, env={"PANDA_SE_ROOT": str(base / "se")})
            factory = Factory(server.url, [site], token=token, state_dir=base / "factory")
            session = requests.Session()
            cycle_t, get_t = [], []
            for run in range(args.runs * 4):
                t0 = time.perf_counter()
                session.get(server.url + "/api/v1/system/is_alive", timeout=10)
                get_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                factory.run_once()
                cycle_t.append(time.perf_counter() - t0)
            print(f"factory cycle {statistics.median(cycle_t) * 1000:.1f} ms, bare GET "
                  f"{statistics.median(get_t) * 1000:.1f} ms")
            result["factory_cycle_s"] = statistics.median(cycle_t)
            result["bare_get_s"] = statistics.median(get_t)
            result["factory_cycle_vs_get_ratio"] = result["factory_cycle_s"] / result["bare_get_s"]
        finally:
            stop_server(server)

        # 3. Slurm latency
        if args.slurm:
            import os

            import slurm_cluster
            from schedulers.slurm import SlurmBackend
            cluster = slurm_cluster.start()
            try:
                os.environ["SLURM_CONF"] = str(cluster.conf)
                slurm = SlurmBackend()
                local = LocalBackend(slots=2, state_dir=str(base / "lat"))
                s_t, l_t = [], []
                for run in range(args.runs):
                    s_t.append(run_to_done(slurm, [PilotSpec(site="B", command=["true"],
                                                             workdir=str(base / "sl"))], 0.05))
                    l_t.append(run_to_done(local, [PilotSpec(site="B", command=["true"],
                                                             workdir=str(base / "ll"))], 0.05))
                    print(f"slurm run {run}: {s_t[-1]:.3f} s, local {l_t[-1]:.3f} s")
                result["slurm_submit_to_done_s"] = statistics.median(s_t)
                result["slurm_vs_local_ratio"] = (result["slurm_submit_to_done_s"]
                                                  / statistics.median(l_t))
            finally:
                cluster.stop()
        shutil.rmtree(base / "factory", ignore_errors=True)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
