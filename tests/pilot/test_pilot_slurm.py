"""The pilot inside a real Slurm job learns its wall time from Slurm (environment or squeue).

Uses the schedulers' private single-node Slurm helper (tests/schedulers/slurm_cluster.py), started
for this module only.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from pilotkit import SITE, TOKEN, fake, make_job, se  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "schedulers"))
import slurm_cluster  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = slurm_cluster.start()
    except slurm_cluster.SlurmUnavailable as exc:
        pytest.skip(f"no Slurm here: {exc}")
    yield cluster
    cluster.stop()


def test_pilot_takes_wall_time_from_slurm(slurm, fake, tmp_path):
    fake.add_job(make_job(801, "echo in-slurm", log=False, maxWalltime=60))
    out = tmp_path / "slurm.out"
    cmd = (f"{sys.executable} -m panda_wms.cli pilot --server {fake.url} --site {SITE} "
           f"--workdir {tmp_path / 'wd'} --reserve 20 --monitor-interval 0.2 "
           f"--public-key {fake.key_file}")
    env = {**os.environ, **slurm.env, "PANDA_AUTH_TOKEN": TOKEN}
    env.pop("SLURM_JOB_END_TIME", None)
    import subprocess
    res = subprocess.run(["sbatch", "--parsable", "--time=5", f"--output={out}", "--export=ALL",
                          "--wrap", cmd], capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    fake.wait_for(lambda: fake.final(801) is not None, timeout=60)
    get = [f for m, p, f in fake.requests if p == "/server/panda/getJob"][0]
    # 5 minutes of Slurm time, minus what passed before the pilot asked, minus the reserve
    assert 200 < int(get["remainingWalltime"]) <= 300 - 20, get
    assert get["batchID"] == job_id
    assert fake.final(801)["state"] == "finished"
    assert fake.final(801)["batchID"] == job_id
    deadline = time.monotonic() + 20
    while "pilot done" not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no output"
        time.sleep(0.2)
    assert "wall time from" in out.read_text()
