"""Data placement end to end with the real server, real storage elements and our pilot:
inputs that sit on another storage element are moved to the job's site by the data service
(HTTP third-party copy between two ``panda se``; ``xrdcp`` between two XRootD servers) before the
pilot runs the job, and a task with a destination storage element (its T1) ends with its outputs
there: its jobs wait in ``transferring`` until the data service has copied them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zlib

import pytest

from dbkit import start_server, stop_server
from logic_kit import site
from panda_core.client import ApiClient
from panda_core.replicas import replica_path
from peers import start_se, start_xrootd, xrootd_available

DATA = b"placed by the data service\n" * 5000


def _record(lfn: str, data: bytes) -> dict:
    return {"lfn": lfn, "fsize": len(data), "checksum": f"ad:{zlib.adler32(data):08x}"}


def _run_pilot(srv, site_name: str, workdir, copytool_env: dict | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(copytool_env or {})
    env["PANDA_AUTH_TOKEN"] = srv.token("pilot", "p1", site=site_name)
    return subprocess.run([sys.executable, "-m", "panda_wms.cli", "pilot", "--server", srv.url,
                           "--site", site_name, "--workdir", str(workdir),
                           "--monitor-interval", "0.2", "--server-backoff", "0.3",
                           "--public-key", str(srv.public_key_file())],
                          env=env, capture_output=True, text=True, timeout=180)


def _wait(fn, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _http_site(name: str, se_name: str, se) -> dict:
    cfg = site(name, se_name, se.url)
    cfg["copytools"] = {"input": {"name": "http", "options": {}},
                        "output": {"name": "http", "options": {}}}
    return cfg


def test_inputs_moved_over_http_and_outputs_aggregated_to_the_t1(tmp_path):
    se_b = start_se(tmp_path / "se_b")
    se_a = start_se(tmp_path / "se_a", extra_args=["--tpc-allow", f"127.0.0.1:{se_b.port}"])
    se_t1 = start_se(tmp_path / "se_t1", extra_args=["--tpc-allow", f"127.0.0.1:{se_a.port}"])
    sites = tmp_path / "sites"
    sites.mkdir()
    for name, se_name, se in (("SITE_A", "SE_A", se_a), ("SITE_B", "SE_B", se_b),
                              ("T1", "SE_T1", se_t1)):
        cfg = _http_site(name, se_name, se)
        if name == "T1":
            cfg["status"] = "offline"          # a storage-only site: no jobs go there
        (sites / f"{name}.yaml").write_text(json.dumps(cfg))
    srv = start_server(tmp_path / "srv", site_dir=sites, extra=["--watcher-interval", "0.2"])
    try:
        user = ApiClient(srv.url, srv.token("user", "alice"))
        path = se_b.root / replica_path("s", "in.txt")
        path.parent.mkdir(parents=True)
        path.write_bytes(DATA)
        user.add_files("agg.in", "s", [_record("in.txt", DATA)], "SE_B")
        with pytest.raises(Exception, match="destination_se"):
            user.submit_task({"name": "bad", "scope": "s", "transformation": "/bin/true",
                              "n_jobs": 1, "destination_se": "NO_SUCH_SE"})
        task_id = user.submit_task({
            "name": "agg", "scope": "s", "transformation": "/bin/sh",
            "job_parameters": "-c 'cat ${IN} ${IN} > ${OUT}'", "input_dataset": "agg.in",
            "output_dataset": "agg.out", "outputs": ["agg.${SN}.out"], "site": "SITE_A",
            "destination_se": "SE_T1", "max_attempts": 1,
            "resources": {"memory_mb": 500, "walltime_s": 300}})
        _wait(lambda: user.task_details(task_id)["jobs"] == {"activated": 1},
              "the data service did not bring the input to SE_A")
        assert (se_a.root / replica_path("s", "in.txt")).read_bytes() == DATA
        assert "third-party copy" in se_a.log()
        res = _run_pilot(srv, "SITE_A", tmp_path / "wd")
        assert res.returncode == 0, res.stderr[-3000:]
        details = _wait(lambda: (d := user.task_details(task_id))["status"] == "done" and d,
                        "the task did not end after its outputs were aggregated")
        assert details["jobs"] == {"finished": 1}
        out = se_t1.root / replica_path("s", "agg.000001.out")
        assert out.read_bytes() == DATA * 2
        job_id = user.jobs(task_id)[0]["PandaID"]
        history = [h["new_status"] for h in user.call("job", "get_history", job_id=job_id)]
        assert history[-2:] == ["transferring", "finished"], history
    finally:
        stop_server(srv)
        for se in (se_a, se_b, se_t1):
            se.stop()


@pytest.mark.xrootd
def test_inputs_moved_between_xrootd_servers(tmp_path):
    why = xrootd_available()
    if why:
        pytest.skip(why)
    x_src, x_dst = start_xrootd(), start_xrootd()
    sites = tmp_path / "sites"
    sites.mkdir()
    out_se = tmp_path / "out"
    out_se.mkdir()
    for name, se_name, xr in (("SITE_X", "XRD_DST", x_dst), ("SITE_Y", "XRD_SRC", x_src)):
        cfg = site(name, se_name, xr.url, out_se=f"{name}_OUT", out_url=f"file://{out_se}")
        cfg["copytools"] = {"input": {"name": "xrdcp", "options": {}},
                            "output": {"name": "cp", "options": {}}}
        (sites / f"{name}.yaml").write_text(json.dumps(cfg))
    srv = start_server(tmp_path / "srv", site_dir=sites, extra=["--watcher-interval", "0.2"])
    try:
        user = ApiClient(srv.url, srv.token("user", "alice"))
        path = x_src.data / replica_path("s", "xin.txt")
        path.parent.mkdir(parents=True)
        path.write_bytes(DATA)
        for p in [path, *path.parents]:
            if p == x_src.data:
                break
            shutil.chown(p, "xrootd")
        user.add_files("x.in", "s", [_record("xin.txt", DATA)], "XRD_SRC")
        task_id = user.submit_task({
            "name": "x", "scope": "s", "transformation": "/bin/sh",
            "job_parameters": "-c 'cat ${IN} > ${OUT}'", "input_dataset": "x.in",
            "output_dataset": "x.out", "outputs": ["x.${SN}.out"], "site": "SITE_X",
            "max_attempts": 1, "resources": {"memory_mb": 500, "walltime_s": 300}})
        _wait(lambda: user.task_details(task_id)["jobs"] == {"activated": 1},
              "the data service did not bring the input to XRD_DST")
        assert (x_dst.data / replica_path("s", "xin.txt")).read_bytes() == DATA
        res = _run_pilot(srv, "SITE_X", tmp_path / "wd")
        assert res.returncode == 0, res.stderr[-3000:]
        assert user.task_details(task_id)["status"] == "done"
        assert (out_se / replica_path("s", "x.000001.out")).read_bytes() == DATA
    finally:
        stop_server(srv)
        x_src.stop()
        x_dst.stop()
