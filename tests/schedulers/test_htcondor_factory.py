"""The pilot factory with the htcondor backend: real pilots, started by the fake condor tools,
take jobs from a real server and finish them."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

from testkit import put_input, start_server, stop_server
from panda_core.client import ApiClient
from schedulers.factory import Factory
from site_configs import EXAMPLES_DIR, parse_site_config

sys.path.insert(0, str(Path(__file__).resolve().parent / "fakes"))
import fake_condor  # noqa: E402

SITE = "CONDOR_FTEST"


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["installed", "onefile"])
def test_factory_runs_real_pilots_through_htcondor(tmp_path, monkeypatch, launch):
    """``onefile``: the batch script through the submit description's ``arguments`` (one line,
    ``$`` as ``$(DOLLAR)``), Debian's python3 without panda-wms, and the minimal environment
    HTCondor gives a job (no HOME: the pilot file is cached in the temporary folder)."""
    bin_dir = fake_condor.install(tmp_path / "bin")
    monkeypatch.setenv("FAKE_CONDOR_DIR", str(tmp_path / "condor"))
    monkeypatch.setenv("FAKE_CONDOR_SCHEDD", "schedd.test")
    monkeypatch.setenv("PANDA_SE_ROOT", str(tmp_path / "se"))
    data = yaml.safe_load((EXAMPLES_DIR / "LOCAL_DEMO.yaml").read_text())
    data["name"] = SITE
    data["scheduler"] = {"backend": "htcondor",
                         "options": {"condor_bin": str(bin_dir), "schedd": "schedd.test",
                                     "log_dir": str(tmp_path / "condor-logs")}}
    data["pilots"].update({"max_queued": 2, "max_running": 2, "walltime_s": 600})
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / f"{SITE}.yaml").write_text(yaml.safe_dump(data))
    server = start_server(tmp_path / "srv", site_dir=sites)
    factory = None
    try:
        user = ApiClient(server.url, server.token("user", "alice"))
        files = []
        for i in range(2):
            files.append(put_input(tmp_path / "se", "ct", f"c.in.{i}.txt",
                                   f"input {i}\n".encode() * 10))
        user.add_files("c.inputs", "ct", files, "LOCAL_SE")
        task_id = user.submit_task({
            "name": "ctask", "scope": "ct", "transformation": "/bin/sh",
            "job_parameters": "-c 'cat ${IN} > ${OUT}'", "input_dataset": "c.inputs",
            "output_dataset": "c.outputs", "outputs": ["ctask.${SN}.out"], "site": SITE,
            "files_per_job": 1, "max_attempts": 1,
            "resources": {"cores": 1, "memory_mb": 100, "walltime_s": 120, "disk_mb": 100}})
        token = server.token("pilot", "condor-factory", site=SITE)
        site = parse_site_config(data, env={"PANDA_SE_ROOT": str(tmp_path / "se")})
        factory = Factory(server.url, [site], token=token, pilot_token=token,
                          state_dir=tmp_path / "factory", factory_id="condor-ft",
                          server_key_fingerprint=server.key_fingerprint(),
                          pilot_launch=launch, node_python="/usr/bin/python3")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            factory.run_once()
            if user.task_details(task_id)["jobs"] == {"finished": 2}:
                break
            time.sleep(0.5)
        logs = [p.read_text()[-1500:] for p in (tmp_path / "condor-logs").glob("pilot.*")]
        assert user.task_details(task_id)["jobs"] == {"finished": 2}, logs
        assert {p.backend for p in factory.pilots.values()} == {"htcondor"}
        assert all(p.batch_id.endswith(".0") for p in factory.pilots.values())
    finally:
        if factory is not None:
            factory.cancel_all()
        stop_server(server)
