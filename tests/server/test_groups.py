"""VO and working group: given at submission, checked against the token's groups, kept on the
task's jobs (ours and PanDA's names)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dbkit import start_server, stop_server
from logic_kit import site
from panda_core.client import ApiClient, Refused
from server.auth import Identity
from server.groups import refusal


def who(*groups, role="user"):
    return Identity("alice", role, groups=tuple(groups))


def test_the_rules():
    assert refusal(who("atlas/phys-higgs"), "atlas", "phys-higgs") is None
    assert refusal(who("atlas"), "atlas", None) is None
    assert refusal(who("/atlas/phys-higgs"), None, "phys-higgs") is None   # leading slash
    assert "VO 'cms'" in refusal(who("atlas/phys-higgs"), "cms", None)
    assert "working group 'phys-top'" in refusal(who("atlas/phys-higgs"), "atlas", "phys-top")
    assert refusal(who("cms/phys-higgs"), "atlas", "phys-higgs") is not None   # other VO's group
    assert refusal(who(role="admin"), "anything", "any") is None
    assert refusal(who(), None, None) is None
    assert "(none)" in refusal(who(), "atlas", None)


def test_submission_checks_the_token_groups(tmp_path):
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "G.yaml").write_text(json.dumps(site("G_SITE")))
    srv = start_server(tmp_path / "srv", site_dir=sites)
    try:
        token = subprocess.run(
            [sys.executable, "-m", "panda_wms.cli", "token", "issue", "--key-dir",
             str(srv.key_dir), "--role", "user", "--subject", "alice", "--group",
             "/atlas/phys-higgs"], check=True, capture_output=True, text=True).stdout.strip()
        alice = ApiClient(srv.url, token)
        bob = ApiClient(srv.url, srv.token("user", "bob"))
        base = {"scope": "s", "transformation": "/bin/true", "n_jobs": 1, "site": "G_SITE"}
        task_id = alice.submit_task({**base, "name": "h", "vo": "atlas",
                                     "working_group": "phys-higgs"})
        job = alice.jobs(task_id)[0]
        assert (job["vo"], job["working_group"]) == ("atlas", "phys-higgs")
        assert (job["VO"], job["workingGroup"]) == ("atlas", "phys-higgs")
        for who_, params, why in ((bob, {"vo": "atlas"}, "VO 'atlas'"),
                                  (alice, {"working_group": "phys-top"}, "phys-top"),
                                  (alice, {"vo": "cms"}, "VO 'cms'")):
            with pytest.raises(Refused) as err:
                who_.submit_task({**base, "name": "x", **params})
            assert err.value.http_status == 403 and why in err.value.reason
        admin = ApiClient(srv.url, srv.token("admin", "root"))
        with pytest.raises(Refused, match="field 'working_group': letters, digits"):
            admin.submit_task({**base, "name": "y", "working_group": "bad name!"})
        assert admin.submit_task({**base, "name": "z", "vo": "cms", "working_group": "any"})
    finally:
        stop_server(srv)
