"""Issue 16 on the real ARC CE: the factory's one-file batch script through A-REX.

The CE runs jobs as 'nobody', who cannot enter /root where the project and its virtualenv live,
and whose HOME does not exist: the pilot comes only from the server's signed file, run by
Debian's /usr/bin/python3 and cached in the node's temporary folder. Inputs and outputs go
through the project's HTTP storage element (the http copytool, with the requests the file
carries).
"""
from __future__ import annotations

import subprocess
import time

import pytest
import yaml

from panda_core.client import ApiClient
from peers import start_se
from schedulers.factory import Factory
from site_configs import parse_site_config
from testkit import put_input, start_server, stop_server

pytestmark = [pytest.mark.arc, pytest.mark.slow]

SITE = "ARC_ONEFILE_TEST"
PYTHON = "/usr/bin/python3"
CE_PATIENCE_S = 300


def site_yaml(se_url: str, ce_options: dict) -> dict:
    return {
        "name": SITE, "region": "nordic", "status": "online",
        "resources": {"cores": 1, "memory_mb": 1000, "max_walltime_s": 3600, "max_disk_mb": 2000},
        "scheduler": {"backend": "arc", "options": ce_options},
        "pilots": {"max_queued": 1, "max_running": 1, "rate_per_minute": 60, "walltime_s": 1800},
        "storage": {"input": {"name": "ONEFILE_SE", "url": se_url},
                    "output": {"name": "ONEFILE_SE", "url": se_url}},
        "copytools": {"input": {"name": "http", "options": {}},
                      "output": {"name": "http", "options": {}}},
        "direct_read": False,
        "transfer": {"timeout_s": 60, "retries": 1},
        "limits": {"looping_s": 600, "min_free_disk_mb": 100, "max_workdir_mb": 2000,
                   "heartbeat_s": 30},
    }


def test_onefile_pilot_through_the_real_arc_ce(arc_ce, tmp_path):
    assert subprocess.run([PYTHON, "-E", "-s", "-c", "import panda_core"], cwd="/",
                          capture_output=True).returncode != 0
    se = start_se(tmp_path / "se")
    sites = tmp_path / "sites"
    sites.mkdir()
    config = site_yaml(se.url, arc_ce.options)
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(config))
    server = start_server(tmp_path / "srv", site_dir=sites)
    factory = None
    try:
        user = ApiClient(server.url, server.token("user", "alice"))
        files = [put_input(se.root, "onefile", f"of.{i}.txt", f"arc input {i}\n".encode() * 50)
                 for i in range(2)]
        assert user.add_files("onefile.inputs", "onefile", files, "ONEFILE_SE") == 2
        task_id = user.submit_task({
            "name": "arconefile", "scope": "onefile", "transformation": "/bin/sh",
            "site": SITE, "input_dataset": "onefile.inputs", "files_per_job": 2,
            "output_dataset": "onefile.outputs", "max_attempts": 1,
            "job_parameters": "-c 'cat of.0.txt of.1.txt | sha256sum > ${OUT}'",
            "outputs": ["${TASK}.${SN}.out"], "resources": {"memory_mb": 500, "walltime_s": 600}})
        token = server.token("pilot", "arc-onefile", site=SITE)
        factory = Factory(server.url, [parse_site_config(config)], token=token,
                          pilot_token=token, state_dir=tmp_path / "factory",
                          factory_id="arc-onefile", pilot_launch="onefile", node_python=PYTHON,
                          pilot_args=["--max-jobs", "1"],
                          server_key_fingerprint=server.key_fingerprint())
        admin = ApiClient(server.url, server.token("admin"))
        deadline = time.monotonic() + CE_PATIENCE_S
        jobs = {}
        while time.monotonic() < deadline:
            factory.run_once()
            jobs = admin.task_details(task_id)["jobs"]
            if jobs == {"finished": 1}:
                break
            time.sleep(2)
        pilots = list(factory.pilots.values())
        assert jobs == {"finished": 1}, (jobs, pilots, server.log()[-3000:],
                                         [arc_ce.log_tail(p.batch_id) for p in pilots])
        [out] = se.root.glob("onefile/*/*/arconefile.*.out")
        assert len(out.read_text().split()[0]) == 64
        # the pilot ended on the CE as a batch job that succeeded
        while time.monotonic() < deadline and not all(p.final for p in factory.pilots.values()):
            factory.run_once()
            time.sleep(2)
        assert {p.state for p in factory.pilots.values()} == {"done"}, factory.pilots
    finally:
        if factory is not None:
            factory.cancel_all()
        stop_server(server)
        se.stop()
