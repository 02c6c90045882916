"""``panda simulate`` end to end: a CI-sized workload against the real server (SQLite) and its
brokerage; the report says every job ended and each share ran within its target's tolerance;
the plots and the summary are written; bad input gets a clear message and exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.simulate.workload import WorkloadError, parse_workload

DATA = Path(__file__).resolve().parent / "data"
#: how far a share's usage (fraction of running cores while every share had jobs waiting) may
#: sit from its target: the reprocessing inputs live at two of the three sites only
TOLERANCE = 0.1


def panda(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "panda_wms.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_a_small_scenario_runs_end_to_end(tmp_path):
    out = tmp_path / "sim"
    res = panda("simulate", str(DATA / "simulate-ci.yaml"), "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["completed"] and report["every_job_ended"]
    assert report["jobs"] == 310 and report["finished"] + report["failed"] == 310
    assert report["retries"] > 0                         # SITE_B fails 10 % of its payloads
    assert set(report["failures_by_site"]) == {"SITE_B"}
    assert report["n_pilot_errors"] == 0 and report["submit_errors"] == []
    assert report["contended_samples"] >= 10
    for name, share in report["shares"].items():
        assert abs(share["deviation"]) <= TOLERANCE, (name, share)
    # brokerage spread the jobs over every site; the reprocessing inputs drew it to A and B
    assert all(b["jobs"] > 0 for b in report["brokerage"].values())
    assert report["queue_time_s"]["p95"] >= report["queue_time_s"]["p50"] > 0
    for plot in ("share_usage.svg", "queue_times.svg", "throughput.svg", "sites.svg"):
        svg = (out / plot).read_text()
        assert svg.startswith("<svg") and "</svg>" in svg and "no data" not in svg
    summary = (out / "summary.md").read_text()
    assert "| reprocessing |" in summary and summary in res.stdout


def test_bad_workloads_get_a_clear_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites: [{name: A, slots: 0}]\ntasks: [{name: t, n_jobs: 1}]\n")
    res = panda("simulate", str(bad), "--out", str(tmp_path / "o"), timeout=60)
    assert res.returncode == 2 and "sites[0].slots: an integer from 1" in res.stderr
    assert "Traceback" not in res.stderr
    res = panda("simulate", str(tmp_path / "missing.yaml"), timeout=60)
    assert res.returncode == 2 and "cannot read" in res.stderr
    for data, words in [
            ({"sites": [{"name": "A"}], "tasks": []}, "tasks: a non-empty list"),
            ({"sites": [{"name": "A"}, {"name": "A"}], "tasks": [{"name": "t", "n_jobs": 1}]},
             "appears twice"),
            ({"sites": [{"name": "A"}], "tasks": [{"name": "t", "n_jobs": 1,
                                                   "inputs": {"files": 2, "at": ["B"]}}]},
             "inputs.at"),
            ({"sites": [{"name": "A"}], "tasks": [{"name": "t", "n_jobs": 1}], "oops": 1},
             "unknown key(s) oops"),
            ({"sites": [{"name": "A"}], "tasks": [{"name": "t", "n_jobs": 1}],
              "shares": [{"name": "x", "value": 50}]}, "add up to 100")]:
        with pytest.raises(WorkloadError, match=words.replace("(", r"\(").replace(")", r"\)")):
            parse_workload(data)


def test_a_database_with_jobs_is_refused(taskbuffer, tmp_path):
    from dbkit import add_site, seed_jobs
    from server.simulate.run import SimulationError, prepare_database
    add_site(taskbuffer, "SITE_X")
    seed_jobs(taskbuffer, "SITE_X", 1)
    w = parse_workload({"sites": [{"name": "A"}], "tasks": [{"name": "t", "n_jobs": 1}]})
    with pytest.raises(SimulationError, match="already holds 1 job"):
        prepare_database(taskbuffer, w, tmp_path)


def test_a_relative_out_folder_gives_absolute_storage_urls(tmp_path, monkeypatch):
    """``--out`` defaults to ``./simulation``: the sites' storage URLs must still be file URLs
    (a relative path has none, and the command stopped with a traceback)."""
    from server.simulate.run import site_config
    from server.simulate.workload import SimSite
    monkeypatch.chdir(tmp_path)
    config = site_config(SimSite("A"), Path("simulation") / "storage")
    assert config["storage"]["input"]["url"] == (tmp_path / "simulation" / "storage" /
                                                 "A").as_uri()
    assert config["storage"]["output"]["url"] == config["storage"]["input"]["url"]


def test_the_pilots_connection_pool_keeps_connections_and_reports_errors():
    """The simulated pilots' keep-alive pool: many requests over few connections, a chunked
    reply read whole, any status but 200 an HTTPError (the pilots retry it)."""
    import asyncio

    import tornado.web

    from server.simulate.httppool import ConnectionPool, HTTPError

    class Echo(tornado.web.RequestHandler):
        def post(self, how):
            if how == "busy":
                self.set_status(503)
                self.finish("try later")
            elif how == "chunked":
                self.write("x" * 70000)
                self.flush()
                self.finish("y")
            else:
                self.finish({"got": self.get_body_argument("a")})

    async def main():
        app = tornado.web.Application([(r"/(\w+)", Echo)])
        server = app.listen(0, "127.0.0.1")
        port = next(iter(server._sockets.values())).getsockname()[1]
        pool = ConnectionPool(f"http://127.0.0.1:{port}", size=2)
        try:
            replies = await asyncio.gather(*(pool.post("/plain", {"a": str(i)}, {})
                                             for i in range(20)))
            assert [json.loads(r)["got"] for r in replies] == [str(i) for i in range(20)]
            assert pool.opened == 2
            assert await pool.post("/chunked", {"a": "1"}, {}) == b"x" * 70000 + b"y"
            with pytest.raises(HTTPError, match="503"):
                await pool.post("/busy", {"a": "1"}, {})
        finally:
            pool.close()
            server.stop()

    asyncio.run(main())


def test_a_submission_without_a_reply_body_is_a_submit_error():
    """A request Tornado gave up on (599: timed out in its queue, no body) is reported as a
    submit error, not an exception that left the run waiting for a task that never came."""
    import asyncio
    from types import SimpleNamespace

    from server.simulate.run import RunData, Simulation
    w = parse_workload({"sites": [{"name": "A"}], "tasks": [{"name": "t", "n_jobs": 1}]})

    class GaveUp:
        async def fetch(self, *args, **kw):
            return SimpleNamespace(code=599, body=None, error="Timeout in request queue")

    sim = Simulation.__new__(Simulation)
    sim.w, sim.url, sim.admin, sim.data = w, "http://127.0.0.1:1", "token", RunData(w)
    sim.durations, sim.submit_client = {}, GaveUp()
    asyncio.run(sim.submit(w.tasks[0], start=0.0))
    assert sim.data.submit_errors == ["t: HTTP 599: Timeout in request queue"]
    assert sim.data.task_ids == {}


def test_the_share_plot_draws_a_bounded_number_of_points(tmp_path):
    """A long run's samples are thinned for share_usage.svg (the large scenario's 840 samples
    of six lines made a 518 KB file)."""
    import re

    from server.simulate.report import MAX_PLOT_POINTS, write_report
    from server.simulate.run import RunData, Sample
    w = parse_workload({"sites": [{"name": "A"}], "tasks": [{"name": "t", "n_jobs": 1}]})
    run = RunData(w, samples=[Sample(i * 60.0, {"mc": 1 + i % 3}, {"mc": 1}, i)
                              for i in range(3 * MAX_PLOT_POINTS + 1)])
    report = {"shares": {"mc": {"target": 1.0, "usage": 1.0, "deviation": 0.0}},
              "brokerage": {}, "brokerage_spread": {"min": 0, "mean": 0, "max": 0, "cv": 0},
              "failures_by_site": {}, "_series": {"queue_s": [1.0], "ends": [1.0]},
              "workload": "w", "completed": True, "every_job_ended": True, "sites": 1,
              "slots": 1, "jobs": 1, "finished": 1, "failed": 0, "attempts": 1, "retries": 0,
              "throughput_per_hour": 1.0, "wall_s": 1.0, "speed": 1.0, "n_pilot_errors": 0,
              "submit_errors": [], "contended_samples": 1,
              "queue_time_s": {"mean": 1.0, "p50": 1.0, "p95": 1.0}}
    write_report(report, run, tmp_path)
    svg = (tmp_path / "share_usage.svg").read_text()
    lines = re.findall(r'points="([^"]*)"', svg)
    assert len(lines) == 2                                   # the share and its target
    assert all(0 < len(pts.split()) <= MAX_PLOT_POINTS for pts in lines)


def test_the_share_snapshot_keeps_the_real_grids_proportion_to_the_jobs():
    """At speed 600 a real server's 2 s snapshot would be 1,200 simulated seconds, older than
    the jobs it counts: the simulation asks for 120 simulated seconds, within 0.05 .. 2 s."""
    from server.cli import _server_parser
    from server.simulate.run import share_counts_s
    assert share_counts_s(600) == pytest.approx(0.2)
    assert share_counts_s(1) == 2.0 and share_counts_s(60) == 2.0
    assert share_counts_s(1e6) == 0.05
    assert _server_parser().parse_args(["--share-counts-s", "0.2"]).share_counts_s == 0.2
    assert _server_parser().parse_args([]).share_counts_s == 2.0
    for bad in ("0", "-1", "nan", "61", "soon"):
        with pytest.raises(SystemExit):
            _server_parser().parse_args(["--share-counts-s", bad])
