"""Event ranges: tasks split by events within a file, PanDA's getEventRanges/updateEventRanges
as the dispatcher answers them, retries of failed ranges, ranges of a dead attempt handed to
its retry, and bad input refused with PanDA's status codes."""
from __future__ import annotations

import json

import pytest
import requests

from dbkit import BlockingDispatcher, start_server, stop_server
from logic_kit import put_file, site, submitter
from panda_core.client import ApiClient
from server.auth import Identity
from server.dispatcher import Dispatcher, ProtocolError
from server.eventranges import EventRangeService, parse_range_id
from server.jobcreator import TaskSpecError
from server.watcher import Watcher

SITE = "E_SITE"
PILOT = Identity("pilot1", "pilot", SITE)
TASK = {"name": "ev", "scope": "s", "transformation": "/bin/echo",
        "job_parameters": "--skip ${SKIPEVENTS} --max ${MAXEVENTS} ${IN}",
        "input_dataset": "ev.in", "site": SITE, "events_per_file": 100, "events_per_job": 40,
        "events_per_range": 15, "max_attempts": 2,
        "resources": {"memory_mb": 100, "walltime_s": 60}}


@pytest.fixture
def tb(taskbuffer, tmp_path):
    taskbuffer.sites.sync([site(SITE, "SE_E", f"file://{tmp_path}")])
    files = [put_file(tmp_path, "s", f"evts{i}.root", b"e" * 10) for i in range(2)]
    taskbuffer.data.add_dataset_files("ev.in", "s", files, "SE_E")
    return taskbuffer


@pytest.fixture
def disp(tb):
    return BlockingDispatcher(Dispatcher(tb, keys=None))


def submit(tb, **over):
    return submitter(tb).submit({**TASK, **over}, owner="alice")


def take(tb, n=1):
    return [tb.jobs.dispatch(SITE, node="wn", actor="pilot1") for _ in range(n)]


def get(disp, pid, n=1, who=PILOT):
    return disp.get_event_ranges({"pandaID": str(pid), "nRanges": str(n), "jobsetID": "1"},
                                 who)["eventRanges"]


def update(disp, ranges, status, who=PILOT, version=1):
    items = [{"eventRangeID": r["eventRangeID"] if isinstance(r, dict) else r,
              "eventStatus": status} for r in ranges]
    body = [{"zipFile": None, "eventRanges": items}] if version else items
    return disp.update_event_ranges({"eventRanges": json.dumps(body), "version": str(version)},
                                    who)


def test_split_by_events_with_parameters_and_ranges(tb):
    res = submit(tb)
    assert len(res.job_ids) == 6                   # 40 + 40 + 20 events of each of 2 files
    jobs = [tb.jobs.get(i) for i in res.job_ids]
    assert [j["job_pars"].split()[:4] for j in jobs[:3]] == [
        ["--skip", "0", "--max", "40"], ["--skip", "40", "--max", "40"],
        ["--skip", "80", "--max", "20"]]
    assert jobs[0]["job_pars"].endswith("evts0.root") and jobs[3]["job_pars"].endswith("evts1.root")
    assert EventRangeService(tb).summary(res.task_id) == {"ready": 3 + 3 + 2 + 3 + 3 + 2}


@pytest.mark.parametrize("bad,words", [
    ({"events_per_file": None}, "needs 'input_dataset' and 'events_per_file'"),
    ({"events_per_job": None}, "'events_per_range': needs 'events_per_job'"),
    ({"events_per_range": 50}, "at most 'events_per_job'"),
    ({"events_per_job": 0}, "at least 1"),
])
def test_bad_event_splits_are_refused(tb, bad, words):
    with pytest.raises(TaskSpecError, match=words.replace("(", r"\(")):
        submit(tb, **bad)


def test_pilot_fetches_ranges_in_order_and_reports_them(tb, disp):
    res = submit(tb)
    [job] = take(tb)
    pid = job["panda_id"]
    first = get(disp, pid, n=2)
    assert [(r["startEvent"], r["lastEvent"]) for r in first] == [(0, 14), (15, 29)]
    assert first[0]["LFN"] == "evts0.root" and first[0]["scope"] == "s"
    assert first[0]["GUID"] == job["files"][0]["guid"]
    assert parse_range_id(first[0]["eventRangeID"])[:2] == (res.task_id, pid)
    rest = get(disp, pid, n=10)
    assert [(r["startEvent"], r["lastEvent"]) for r in rest] == [(30, 39)]
    assert get(disp, pid) == []                              # no more
    reply = update(disp, first, "running")
    assert reply["StatusCode"] == 0 and reply["Returns"] == [True, True]
    assert update(disp, first + rest, "finished")["Returns"] == [True, True, True]
    assert update(disp, first, "finished")["Returns"] == [False, False]   # already done
    assert EventRangeService(tb).summary(res.task_id)["finished"] == 3


def test_failed_range_is_handed_out_again_until_attempts_run_out(tb, disp):
    res = submit(tb)
    pid = take(tb)[0]["panda_id"]
    [r1] = get(disp, pid)
    assert update(disp, [r1], "failed", version=0)["Returns"] == [True]
    [again] = get(disp, pid)
    assert (again["startEvent"], again["eventRangeID"][-2:]) == (0, "-2")   # attempt 2
    update(disp, [again], "failed")
    # max_attempts (2) used up: the range stays failed and the next one comes
    assert get(disp, pid)[0]["startEvent"] == 15
    assert EventRangeService(tb).summary(res.task_id)["failed"] == 1


def test_fatal_is_not_retried(tb, disp):
    submit(tb)
    pid = take(tb)[0]["panda_id"]
    [r1] = get(disp, pid)
    update(disp, [r1], "fatal")
    assert get(disp, pid)[0]["startEvent"] == 15


def test_dead_attempts_ranges_go_to_its_retry(tb, disp, clock):
    submit(tb)
    pid = take(tb)[0]["panda_id"]
    disp.tb.pilots.update(pid, "running", {}, actor="pilot1")
    held = get(disp, pid, n=3)
    update(disp, held[:1], "finished")
    clock.advance(hours=7)
    retry_id = Watcher(tb).check().retries[pid]
    # the dead attempt's late report changes nothing and is told to stop
    late = update(disp, held[1:], "finished")
    assert late["Returns"] == [False, False] and late["Command"] == {str(pid): "tobekilled"}
    # the retry (same serial) gets the two unfinished ranges
    while tb.jobs.dispatch(SITE, node="wn", actor="pilot1")["panda_id"] != retry_id:
        pass
    got = get(disp, retry_id, n=5)
    assert [(r["startEvent"], r["lastEvent"]) for r in got] == [(15, 29), (30, 39)]


def test_other_jobs_cannot_touch_these_ranges(tb, disp):
    submit(tb)
    a, b = [j["panda_id"] for j in take(tb, 2)]
    [ra] = get(disp, a)
    forged = ra["eventRangeID"].replace(f"-{a}-", f"-{b}-", 1)
    assert update(disp, [forged], "finished")["Returns"] == [False]
    other_site = Identity("p2", "pilot", "ELSEWHERE")
    with pytest.raises(ProtocolError) as err:
        update(disp, [ra], "finished", who=other_site)
    assert err.value.status_code == 70
    with pytest.raises(ProtocolError):
        get(disp, a, who=other_site)


def test_job_no_pilot_holds_gets_no_ranges(tb, disp):
    res = submit(tb)
    assert get(disp, res.job_ids[0]) == []                  # still activated


@pytest.mark.parametrize("form,code,words", [
    ({}, 80, "pandaID is missing"),
    ({"pandaID": "abc"}, 30, "pandaID must be"),
    ({"pandaID": "999999"}, 30, "no job 999999"),
    ({"pandaID": "9" * 40}, 30, "pandaID"),
    ({"pandaID": "1", "nRanges": "lots"}, 30, "nRanges must be"),
])
def test_bad_get_requests(disp, form, code, words):
    with pytest.raises(ProtocolError) as err:
        disp.get_event_ranges(form, PILOT)
    assert err.value.status_code == code and words in str(err.value)


@pytest.mark.parametrize("form,code,words", [
    ({}, 80, "eventRanges is missing"),
    ({"eventRanges": "[not json"}, 30, "must be a JSON list"),
    ({"eventRanges": '"text"'}, 30, "must be a JSON list"),
    ({"eventRanges": '[{"eventRangeID": "1-2", "eventStatus": "finished"}]'}, 30, "malformed"),
    ({"eventRanges": '[{"eventRangeID": "1-2-3-4-5", "eventStatus": "exploded"}]'}, 30,
     "eventStatus 'exploded'"),
    ({"eventRanges": '[7]'}, 30, "must be an object"),
    ({"eventRanges": '[{"eventRangeID": "1-%s-3-4-5", "eventStatus": "finished"}]' % ("9" * 30)},
     30, "malformed"),
    ({"eventRanges": '[{"eventRangeID": "1-٣-3-4-5", "eventStatus": "finished"}]'}, 30,
     "malformed"),
])
def test_bad_update_requests(disp, form, code, words):
    with pytest.raises(ProtocolError) as err:
        disp.update_event_ranges(form, PILOT)
    assert err.value.status_code == code and words in str(err.value)


def test_over_http_json_and_urlencoded(tmp_path):
    se = tmp_path / "se"
    se.mkdir()
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "E.yaml").write_text(json.dumps(site(SITE, "SE_E", f"file://{se}")))
    srv = start_server(tmp_path / "srv", site_dir=sites, extra=["--watcher-interval", "0"])
    try:
        admin = ApiClient(srv.url, srv.token("admin", "root"))
        admin.add_files("ev.in", "s", [put_file(se, "s", "evts0.root", b"e")], "SE_E")
        admin.submit_task({**TASK, "events_per_file": 30, "events_per_job": 30,
                           "events_per_range": 10})
        hdr = {"Authorization": f"Bearer {srv.token('pilot', 'p1', site=SITE)}"}
        url = f"{srv.url}/server/panda/"
        job = requests.post(url + "getJob", data={"siteName": SITE},
                            headers={**hdr, "Accept": "application/json"}, timeout=10).json()
        pid = job["PandaID"]
        got = requests.post(url + "getEventRanges", data={"pandaID": pid, "nRanges": 2,
                                                          "jobsetID": job["jobsetID"],
                                                          "taskID": job["taskID"]},
                            headers={**hdr, "Accept": "application/json"}, timeout=10).json()
        assert got["StatusCode"] == 0 and len(got["eventRanges"]) == 2
        # without JSON in Accept: URL-encoded, eventRanges a JSON string (as PanDA sends it)
        raw = requests.post(url + "getEventRanges", data={"pandaID": pid}, headers=hdr,
                            timeout=10).text
        from urllib.parse import parse_qs
        qs = parse_qs(raw)
        assert qs["StatusCode"] == ["0"]
        [third] = json.loads(qs["eventRanges"][0])
        assert third["startEvent"] == 20
        done = requests.post(url + "updateEventRanges", data={
            "eventRanges": json.dumps([{"eventRanges": [
                {"eventRangeID": r["eventRangeID"], "eventStatus": "finished"}
                for r in got["eventRanges"] + [third]]}]), "version": 1},
            headers={**hdr, "Accept": "application/json"}, timeout=10).json()
        assert done == {"StatusCode": 0, "Returns": [True, True, True], "Command": {}}
        single = requests.post(url + "updateEventRange", data={
            "eventRangeID": third["eventRangeID"], "eventStatus": "finished"},
            headers={**hdr, "Accept": "application/json"}, timeout=10).json()
        assert single["Returns"] == [False]                 # already finished
        assert admin.call("event", "summary", task_id=job["taskID"]) == {"finished": 3}
        bad = requests.post(url + "getEventRanges", data={"pandaID": "x"},
                            headers={**hdr, "Accept": "application/json"}, timeout=10).json()
        assert bad["StatusCode"] == 30
    finally:
        stop_server(srv)


def test_extending_a_task_splits_new_files_by_events(tb, tmp_path):
    res = submit(tb)
    tb.data.add_dataset_files("ev.in", "s", [put_file(tmp_path, "s", "evts9.root", b"e")], "SE_E")
    new = submitter(tb).extend(res.task_id, "alice")
    assert len(new.job_ids) == 3
    pars = [tb.jobs.get(i)["job_pars"] for i in new.job_ids]
    assert pars[2].startswith("--skip 80 --max 20") and pars[2].endswith("evts9.root")
    assert EventRangeService(tb).summary(res.task_id) == {"ready": 16 + 8}
