"""Share-aware dispatch through a real server: getJob follows the share tree set by the API."""
from __future__ import annotations

import json

import requests

from dbkit import start_server, stop_server
from logic_kit import site
from panda_core.client import ApiClient


def test_getjob_serves_the_share_below_target_first(tmp_path):
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "S.yaml").write_text(json.dumps(site("S", "SE_S", f"file://{tmp_path}")))
    srv = start_server(tmp_path / "srv", site_dir=sites, extra=["--watcher-interval", "0"])
    try:
        admin = ApiClient(srv.url, srv.token("admin", "root"))
        admin.call("shares", "set", "POST", shares=[{"name": "analysis", "value": 70},
                                                    {"name": "production", "value": 30}])
        base = {"scope": "s", "transformation": "/bin/true", "site": "S",
                "resources": {"memory_mb": 100, "walltime_s": 60}}
        admin.submit_task({**base, "name": "prod", "share": "production", "priority": 5000,
                           "n_jobs": 3})
        admin.submit_task({**base, "name": "ana", "share": "analysis", "priority": 10,
                           "n_jobs": 3})
        hdr = {"Accept": "application/json",
               "Authorization": f"Bearer {srv.token('pilot', 'p', site='S')}"}
        got = requests.post(f"{srv.url}/server/panda/getJob",
                            data={"siteName": "S", "nJobs": 1}, headers=hdr, timeout=10).json()
        [job] = got["jobs"]
        # analysis (70 %, nothing running) before production's far higher priority
        desc = admin.call("job", "get_description", job_ids=job["PandaID"])[0]
        assert desc["share"] == "analysis"
        usage = admin.call("shares", "usage", site="S")
        assert usage["running"] == {"analysis": 1}
        assert usage["activated"] == {"analysis": 2, "production": 3}
    finally:
        stop_server(srv)
