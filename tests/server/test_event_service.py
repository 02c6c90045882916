"""The event service on the server: one pool of ranges shared by a task's consumer jobs, range
outputs recorded and checked, ranges of ended or silent consumers back to the pool, and the
merge job created once every range is done (on SQLite, PostgreSQL and MariaDB)."""
from __future__ import annotations

import json
import zlib

import pytest

from dbkit import BlockingDispatcher
from logic_kit import put_file, site, submitter
from panda_core.wire import encode_job, range_output_lfn
from server.auth import Identity
from server.dispatcher import Dispatcher, ProtocolError
from server.eventranges import EventRangeService
from server.jobcreator import TaskSpec, TaskSpecError
from server.watcher import Watcher

SITE = "ES_SITE"
PILOT = Identity("pilot1", "pilot", SITE)
TASK = {"name": "es", "scope": "s", "transformation": "/usr/bin/python3",
        "job_parameters": "payload.py", "input_dataset": "es.in", "output_dataset": "es.out",
        "outputs": ["${TASK}.merged.${SN}"], "site": SITE, "events_per_file": 20,
        "events_per_range": 5, "max_attempts": 3,
        "event_service": {"consumers": 2, "range_timeout_s": 600,
                          "merge": {"transformation": "/bin/sh",
                                    "job_parameters": "-c 'cat ${IN} > ${OUT}'"}},
        "resources": {"memory_mb": 100, "walltime_s": 60}}


@pytest.fixture
def tb(taskbuffer, tmp_path):
    taskbuffer.sites.sync([site(SITE, "SE_ES", f"file://{tmp_path}")])
    files = [put_file(tmp_path, "s", f"evts{i}.root", b"e" * 10) for i in range(2)]
    taskbuffer.data.add_dataset_files("es.in", "s", files, "SE_ES")
    return taskbuffer


@pytest.fixture
def disp(tb):
    return BlockingDispatcher(Dispatcher(tb, keys=None))


def submit(tb, **over):
    return submitter(tb).submit({**TASK, **over}, owner="alice")


def running_consumers(tb, n):
    pids = [tb.jobs.dispatch(SITE, node="wn", actor="pilot1")["panda_id"] for _ in range(n)]
    for pid in pids:
        tb.pilots.update(pid, "running", {}, actor="pilot1")
    return pids


def get(disp, pid, n=1):
    return disp.get_event_ranges({"pandaID": str(pid), "nRanges": str(n)}, PILOT)


def output(rng, scope="s", data=b"out"):
    return {"lfn": range_output_lfn(rng["eventRangeID"]), "fsize": len(data),
            "adler32": f"{zlib.adler32(data):08x}", "scope": scope}


def report(disp, rng, status="finished", out=None):
    body = [{"zipFile": out if out is not None else (output(rng) if status == "finished"
                                                       else None),
             "eventRanges": [{"eventRangeID": rng["eventRangeID"], "eventStatus": status}]}]
    return disp.update_event_ranges({"eventRanges": json.dumps(body), "version": "1"}, PILOT)


def test_task_file_asks_for_an_event_service_task(tb):
    res = submit(tb)
    assert len(res.job_ids) == 2                               # the consumers
    jobs = [tb.jobs.get(pid) for pid in res.job_ids]
    assert {j["event_service"] for j in jobs} == {1}
    assert all(not [f for f in j["files"] if f["type"] == "output"] for j in jobs)
    assert EventRangeService(tb).summary(res.task_id) == {"ready": 8}      # 2 files x 4
    spec = encode_job(jobs[0], "SE_ES", "SE_ES")
    assert spec["eventService"] == "True" and "eventServiceMerge" not in spec


@pytest.mark.parametrize("over,words", [
    ({"event_service": {"consumers": 2}}, "event_service.merge"),
    ({"event_service": {"merge": {"transformation": ""}}}, "merge.transformation"),
    ({"event_service": {"merge": {"transformation": "x"}, "consumers": 0}}, "consumers"),
    ({"event_service": {"merge": {"transformation": "x"}, "bogus": 1}}, "bogus"),
    ({"event_service": "yes"}, "mapping"),
    ({"events_per_range": None}, "events_per_range"),
    ({"events_per_job": 10}, "events_per_job"),
])
def test_bad_event_service_task_files_are_refused(over, words):
    """The task file's checks need no database: TaskSpec refuses before anything is stored."""
    task = {**TASK, **over}
    task = {k: v for k, v in task.items() if v is not None}
    with pytest.raises(TaskSpecError) as err:
        TaskSpec.from_dict(task)
    assert words in str(err.value)


def test_too_many_ranges_are_refused_and_nothing_is_stored(tb):
    with pytest.raises(TaskSpecError, match="at most 100000"):
        submit(tb, events_per_file=10 ** 9, events_per_range=1)
    assert tb.tasks.find() == []


def test_consumers_share_one_pool_and_the_last_range_creates_the_merge_job(tb, disp):
    res = submit(tb)
    a, b = running_consumers(tb, 2)
    got_a = get(disp, a, 3)["eventRanges"]
    got_b = get(disp, b, 10)["eventRanges"]
    assert len(got_a) == 3 and len(got_b) == 5                 # one pool, no range twice
    starts = sorted((r["LFN"], r["startEvent"]) for r in got_a + got_b)
    assert starts == sorted((f"evts{i}.root", s) for i in range(2) for s in (0, 5, 10, 15))
    assert get(disp, a)["eventRangesPending"] == 5             # b holds them, a its own
    for rng in got_b + got_a[:2]:
        assert report(disp, rng)["Returns"] == [True]
    assert [j for j in tb.jobs.find(task_id=res.task_id) if j.get("event_service") == 2] == []
    assert report(disp, got_a[2])["Returns"] == [True]
    [merge] = [j for j in tb.jobs.find(task_id=res.task_id) if j.get("event_service") == 2]
    merge = tb.jobs.get(merge["panda_id"])
    assert merge["status"] == "activated" and merge["serial"] == 3
    ins = [f["lfn"] for f in merge["files"] if f["type"] == "input"]
    by_id = {r["eventRangeID"]: r for r in got_a + got_b}
    order = sorted(by_id, key=lambda i: (by_id[i]["LFN"], by_id[i]["startEvent"]))
    assert ins == [range_output_lfn(i) for i in order]         # in event order
    assert merge["job_pars"] == f"-c 'cat {','.join(ins)} > es.merged.000003'"
    assert tb.data.replica_endpoints("s", ins) == {lfn: {"SE_ES"} for lfn in ins}
    spec = encode_job(merge, "SE_ES", "SE_ES")
    assert spec["eventServiceMerge"] == "True" and spec["outFiles"].startswith("es.merged")
    # nothing left: the consumers are told so, and no second merge job appears
    reply = get(disp, a)
    assert reply["eventRanges"] == [] and reply["eventRangesPending"] == 0
    assert EventRangeService(tb).summary(res.task_id) == {"finished": 8}


def test_ranges_of_a_silent_consumer_go_back_to_the_pool(tb, disp, clock):
    res = submit(tb)
    a, b = running_consumers(tb, 2)
    held = get(disp, a, 2)["eventRanges"]
    clock.advance(seconds=300)
    get(disp, b, 1)                                             # b is alive, a is silent
    clock.advance(seconds=400)                                  # a: 700 s > 600 s
    assert EventRangeService(tb).reclaim_expired() == 2
    again = get(disp, b, 10)["eventRanges"]
    assert {(r["LFN"], r["startEvent"]) for r in held} <= \
        {(r["LFN"], r["startEvent"]) for r in again}
    # a's late reports are not taken: those ranges are b's now
    assert report(disp, held[0])["Returns"] == [False]
    assert EventRangeService(tb).summary(res.task_id)["sent"] == 8


def test_ranges_of_an_ended_consumer_are_reclaimed_by_the_next_ask(tb, disp):
    submit(tb)
    a, b = running_consumers(tb, 2)
    held = get(disp, a, 2)["eventRanges"]
    assert tb.jobs.kill(a, actor="alice")
    again = get(disp, b, 2)["eventRanges"]
    assert [r["startEvent"] for r in again] == [r["startEvent"] for r in held]
    assert {r["eventRangeID"] for r in again}.isdisjoint({r["eventRangeID"] for r in held})


def test_cancelled_and_failed_ranges_return_to_the_pool(tb, disp):
    res = submit(tb, max_attempts=2)
    a, = running_consumers(tb, 1)
    first, second = get(disp, a, 2)["eventRanges"]
    assert report(disp, first, "cancelled")["Returns"] == [True]
    assert report(disp, second, "failed")["Returns"] == [True]
    assert EventRangeService(tb).summary(res.task_id) == {"ready": 8}
    again = get(disp, a, 2)["eventRanges"]
    assert [r["startEvent"] for r in again] == [first["startEvent"], second["startEvent"]]
    assert report(disp, again[1], "failed")["Returns"] == [True]   # attempts used up
    assert EventRangeService(tb).summary(res.task_id)["failed"] == 1


@pytest.mark.parametrize("bad,words", [
    (None, "needs its output"),
    ({"lfn": "other.file", "fsize": 3, "adler32": "00000001", "scope": "s"}, "must be named"),
    ({"fsize": "x", "adler32": "00000001", "scope": "s"}, "fsize"),
    ({"fsize": 3, "adler32": "zz", "scope": "s"}, "adler32"),
    ({"fsize": 3, "adler32": "00000001", "scope": "../x"}, "scope"),
    ({"fsize": 3, "adler32": "00000001", "scope": "other"}, "is not the task's"),
])
def test_bad_range_outputs_are_refused_and_change_nothing(tb, disp, bad, words):
    if tb.dialect != "sqlite" and bad is not None:
        pytest.skip("the checks are the same on every database; one case per database")
    res = submit(tb)
    a, = running_consumers(tb, 1)
    [rng] = get(disp, a)["eventRanges"]
    if bad is not None and "lfn" not in bad:
        bad = {**bad, "lfn": range_output_lfn(rng["eventRangeID"])}
    body = [{"zipFile": bad, "eventRanges": [{"eventRangeID": rng["eventRangeID"],
                                              "eventStatus": "finished"}]}]
    with pytest.raises(ProtocolError) as err:
        disp.update_event_ranges({"eventRanges": json.dumps(body)}, PILOT)
    assert err.value.status_code == 30 and words in str(err.value)
    assert EventRangeService(tb).summary(res.task_id) == {"sent": 1, "ready": 7}


def test_watcher_pass_reclaims_and_the_retry_drains_nothing_twice(tb, disp, clock):
    """A consumer that died holding ranges: the watcher fails it, the ranges come back, and
    the finished ones stay finished (exactly once)."""
    res = submit(tb, event_service={**TASK["event_service"], "consumers": 1})
    a, = running_consumers(tb, 1)
    held = get(disp, a, 3)["eventRanges"]
    report(disp, held[0])
    clock.advance(hours=7)
    retry = Watcher(tb).check().retries[a]
    assert EventRangeService(tb).reclaim_expired() == 2
    while tb.jobs.dispatch(SITE, node="wn", actor="pilot1")["panda_id"] != retry:
        pass
    tb.pilots.update(retry, "running", {}, actor="pilot1")
    rest = get(disp, retry, 100)["eventRanges"]
    assert len(rest) == 7 and held[0]["startEvent"] not in \
        [r["startEvent"] for r in rest if r["LFN"] == held[0]["LFN"]]
    for rng in rest:
        report(disp, rng)
    assert EventRangeService(tb).summary(res.task_id) == {"finished": 8}
    assert len([j for j in tb.jobs.find(task_id=res.task_id) if j.get("event_service") == 2]) == 1


def test_extending_an_event_service_task_is_refused(tb):
    res = submit(tb)
    with pytest.raises(TaskSpecError, match="cannot be extended"):
        submitter(tb).extend(res.task_id, "alice")


def test_a_new_consumer_takes_over_when_all_ended_with_ranges_left(tb, disp):
    res = submit(tb, event_service={**TASK["event_service"], "consumers": 1})
    a, = running_consumers(tb, 1)
    got = get(disp, a, 2)["eventRanges"]
    for rng in got:
        report(disp, rng)
    # out of wall time: the pilot stops asking and ends its job well, 6 ranges still ready
    tb.pilots.update(a, "finished", {"n_events": 10}, actor="pilot1")
    jobs = [j for j in tb.jobs.find(task_id=res.task_id) if j["panda_id"] != a]
    assert len(jobs) == 1 and jobs[0]["event_service"] == 1 and jobs[0]["serial"] == 2
    assert jobs[0]["status"] == "activated" and tb.tasks.get(res.task_id)["status"] != "done"
    # a consumer that got nothing done does not beget another; the task ends partly done
    b, = running_consumers(tb, 1)
    tb.pilots.update(b, "finished", {"n_events": 0}, actor="pilot1")
    assert len(tb.jobs.find(task_id=res.task_id)) == 2
    assert tb.tasks.get(res.task_id)["status"] == "finished"


def test_two_last_reports_at_once_make_one_merge_job(tb, disp):
    """Both consumers finish their last range at the same moment, each in its own transaction:
    the task row lock and the re-count under it leave exactly one merge job."""
    import threading

    res = submit(tb)
    a, b = running_consumers(tb, 2)
    held = {a: get(disp, a, 4)["eventRanges"], b: get(disp, b, 4)["eventRanges"]}
    for pid in (a, b):
        for rng in held[pid][:3]:
            report(disp, rng)
    service = EventRangeService(tb)
    start = threading.Barrier(2)
    errors = []
    if tb.dialect != "sqlite":
        # both transactions hold their last range finished, uncommitted, at the same moment
        # (SQLite has one writer at a time: there the second simply waits)
        both_updated = threading.Barrier(2, timeout=20)
        add_replica = tb.data._add_replica

        def held_open(*args, **kw):
            add_replica(*args, **kw)
            both_updated.wait()
        tb.data._add_replica = held_open

    def last(pid):
        rng = held[pid][3]
        item = {"eventRangeID": rng["eventRangeID"], "eventStatus": "finished",
                "_output": output(rng)}
        start.wait()
        try:
            assert service.update([item], PILOT) == [True]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=last, args=(pid,)) for pid in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    merges = [j for j in tb.jobs.find(task_id=res.task_id) if j.get("event_service") == 2]
    assert len(merges) == 1 and EventRangeService(tb).summary(res.task_id) == {"finished": 8}


def test_a_lost_merge_check_is_made_good_when_the_task_settles(tb, disp, monkeypatch):
    """The last report was taken but its merge check failed (a server killed in between):
    when the consumers end, the task settles and the merge job is created then."""
    import server.eventranges as er

    res = submit(tb, event_service={**TASK["event_service"], "consumers": 1})
    a, = running_consumers(tb, 1)
    monkeypatch.setattr(er, "create_merge_if_done", lambda *a, **k: 1 / 0)
    for rng in get(disp, a, 100)["eventRanges"]:
        report(disp, rng)
    monkeypatch.undo()
    assert not [j for j in tb.jobs.find(task_id=res.task_id) if j.get("event_service") == 2]
    tb.pilots.update(a, "finished", {"n_events": 40}, actor="pilot1")
    [merge] = [j for j in tb.jobs.find(task_id=res.task_id) if j.get("event_service") == 2]
    assert merge["status"] == "activated" and merge["site"] == SITE
    assert tb.tasks.get(res.task_id)["status"] not in ("done", "finished", "failed")
