"""The data service with our real pilot: inputs registered at another site's storage element are
brought to the job's site by the server, then a ``panda pilot`` stages them in from there, runs
the payload and stores the output: the task is done."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from dbkit import start_server, stop_server
from logic_kit import put_file, site
from panda_core.client import ApiClient
from panda_core.replicas import replica_url


def test_pilot_runs_a_job_whose_inputs_the_data_service_moved(tmp_path):
    ses = {"SE_A": tmp_path / "se_a", "SE_B": tmp_path / "se_b"}
    sites = tmp_path / "sites"
    sites.mkdir()
    for name, se in (("SITE_A", "SE_A"), ("SITE_B", "SE_B")):
        ses[se].mkdir()
        (sites / f"{name}.yaml").write_text(json.dumps(site(name, se, f"file://{ses[se]}")))
    srv = start_server(tmp_path / "srv", site_dir=sites, extra=["--watcher-interval", "0.2"])
    try:
        user = ApiClient(srv.url, srv.token("user", "alice"))
        data = b"moved by the data service\n" * 100
        user.add_files("mv.in", "s", [put_file(ses["SE_B"], "s", "in.txt", data)], "SE_B")
        task_id = user.submit_task({
            "name": "mv", "scope": "s", "transformation": "/bin/sh",
            "job_parameters": "-c 'cat ${IN} ${IN} > ${OUT}'", "input_dataset": "mv.in",
            "output_dataset": "mv.out", "outputs": ["mv.${SN}.out"], "site": "SITE_A",
            "max_attempts": 1, "resources": {"memory_mb": 500, "walltime_s": 300}})
        deadline = time.monotonic() + 20
        while user.task_details(task_id)["jobs"] != {"activated": 1}:
            assert time.monotonic() < deadline, user.task_details(task_id)
            time.sleep(0.1)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["PANDA_AUTH_TOKEN"] = srv.token("pilot", "p1", site="SITE_A")
        res = subprocess.run([sys.executable, "-m", "panda_wms.cli", "pilot", "--server", srv.url,
                              "--site", "SITE_A", "--workdir", str(tmp_path / "wd"),
                              "--monitor-interval", "0.2", "--server-backoff", "0.3",
                              "--public-key", str(srv.public_key_file())],
                             env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-3000:]
        details = user.task_details(task_id)
        assert details["status"] == "done", (details, res.stderr[-3000:])
        out = replica_url(str(ses["SE_A"]), "s", "mv.000001.out")
        with open(out, "rb") as fh:
            assert fh.read() == data * 2
    finally:
        stop_server(srv)
