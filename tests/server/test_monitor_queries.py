"""The monitor's SQL on SQLite, PostgreSQL and MariaDB: selections and their value syntax,
facets, the error summary, the dashboard, keyset pagination, the analyzer, alarms, the
operations history and the incidents logger."""
from __future__ import annotations

import datetime as dt
import logging

import pytest
from sqlalchemy import func, select

from server import db
from server.monitor import analyzer, dash, errorsview, history, incidents, jobsview, operations
from server.monitor.alarms import Alarms
from server.monitor.params import Args, ParamError
from server.monitor.selection import read_job_selection
from server.taskbuffer import Conflict
from monitorkit import FAILURES, STATES, seed_monitor


def sel_of(tb, query: str = "", **kw):
    args = Args({k: [v] for k, v in (p.split("=", 1) for p in query.split("&") if p)})
    sel = read_job_selection(args, tb.clock(), **kw)
    return sel, args


@pytest.fixture
def seeded(taskbuffer, tmp_path):
    return taskbuffer, seed_monitor(taskbuffer, tmp_path / "se")


def test_facets_count_every_state_and_error(seeded):
    tb, s = seeded
    facets, total = jobsview.facets(tb, sel_of(tb)[0])
    states = {v["value"]: v["count"] for v in facets["jobstatus"]}
    assert set(states) == set(STATES)
    assert states["failed"] == len(FAILURES) + 2 and states["assigned"] == 4
    assert total == sum(states.values()) == s.n_jobs - 1        # the archived one is old
    assert {v["value"] for v in facets["piloterrorcode"]} == {"1099"}
    assert {v["value"] for v in facets["jobdispatchererrorcode"]} == {"100"}
    assert {v["value"]: v["count"] for v in facets["resourcetype"]} == {"SCORE": total - 3,
                                                                       "MCORE_HIMEM": 3}
    assert {v["value"] for v in facets["workinggroup"]} == {"AP_MC"}


def test_value_syntax_wildcard_or_not_and_not_specified(seeded):
    tb, _ = seeded
    count = lambda q: jobsview.facets(tb, sel_of(tb, q)[0])[1]      # noqa: E731
    assert count("computingsite=SITE_A") == 18
    assert count("computingsite=site_*") == 20                       # case-insensitive
    assert count("computingsite=!SITE_A") == 6                        # NULL sites included
    assert count("computingsite=Not specified") == 4
    assert count("jobstatus=failed|finished") == 8
    assert count("jobstatus=!failed&computingsite=SITE_A") == 11
    assert count("produsername=bob&jobstatus=activated") == 2
    assert count("piloterrorcode=1099|65") == 1
    assert count("exeerrorcode=65") == 1


@pytest.mark.parametrize("query, reason", [
    ("bogus=1", "unknown parameter"), ("hours=x", "must be an integer"),
    ("hours=0", "between"), ("jobstatus=nope", "unknown state"),
    ("date_from=yesterday", "must be a date"), ("jeditaskid=abc", "takes integers"),
    ("hours=3&days=1", "one of hours"), ("computingsite=A%", "wildcard"),
    ("jobstatus=", "empty value"), ("limit=0", "between")])
def test_bad_parameters_say_why(seeded, query, reason):
    tb, _ = seeded
    with pytest.raises(ParamError, match=reason):
        sel, args = sel_of(tb, query)
        jobsview.read_page(args)
        args.finish()


def test_window_active_jobs_and_id_scope(seeded, clock):
    tb, s = seeded
    clock.advance(hours=24)                     # every job is now older than the window
    sel, _ = sel_of(tb)
    states = {v["value"] for v in jobsview.facets(tb, sel)[0]["jobstatus"]}
    assert states == {"defined", "assigned", "activated", "sent", "starting", "running",
                      "holding", "transferring"}            # active ones, whatever their age
    scoped, _ = sel_of(tb, f"jeditaskid={s.task_ids[0]}")
    assert not scoped.window.bounded
    facets, total = jobsview.facets(tb, scoped)
    assert total == 19 + 1                     # all of task 1, the archived job too
    pid, _ = sel_of(tb, f"pandaid={s.archived}")
    assert jobsview.facets(tb, pid)[1] == 1
    old, _ = sel_of(tb, "days=30&jobstatus=finished")
    assert jobsview.facets(tb, old)[1] == 2    # the live one and the archived one


def test_cap_and_keyset_pagination_walk_the_whole_selection(seeded):
    tb, s = seeded
    sel, _ = sel_of(tb, "limit=5")
    assert jobsview.facets(tb, sel)[1] == 5
    for sortby in jobsview.SORTS:
        seen, cursor = [], None
        while True:
            page = jobsview.Page(sortby, 4, jobsview.parse_cursor(cursor, jobsview.SORTS[sortby][0])
                                 if cursor else None, jobsview.ROW_COLUMNS)
            rows, cursor = jobsview.rows(tb, sel_of(tb, "days=30")[0], page)
            seen += [r["panda_id"] for r in rows]
            if cursor is None:
                break
        assert len(seen) == len(set(seen)) == s.n_jobs, sortby
    ordered = jobsview.rows(tb, sel_of(tb)[0], jobsview.Page("pandaid-ascending", 3, None,
                                                             ("status",)))[0]
    assert [r["panda_id"] for r in ordered] == sorted(r["panda_id"] for r in ordered)


def test_error_summary_by_code_site_user_task(seeded):
    tb, s = seeded
    sel, _ = sel_of(tb, default_limit=errorsview.DEFAULT_ERROR_LIMIT)
    codes = {(r["component"], r["code"]): r for r in errorsview.by_code(tb, sel)}
    assert set(codes) == {("pilot", 1099), ("exe", 65), ("jobdispatcher", 100), ("ddm", 100),
                          ("taskbuffer", 300)}
    assert codes[("jobdispatcher", 100)]["count"] == 2
    assert codes[("jobdispatcher", 100)]["description"].startswith("lost heartbeat")
    assert codes[("ddm", 100)]["description"] != codes[("jobdispatcher", 100)]["description"]
    assert codes[("pilot", 1099)]["description"] == "stage-in failed"
    assert codes[("pilot", 1099)]["cpu_hours_lost"] > 0
    assert codes[("pilot", 1099)]["example_panda_id"] == s.failed["pilot_error_code"]
    groups = errorsview.by_group(tb, sel)
    site = next(r for r in groups["site"] if r["value"] == "SITE_A")
    assert (site["failed"], site["finished"]) == (7, 1)
    assert site["failure_pct"] == pytest.approx(87.5)
    assert [r["value"] for r in groups["user"]] == ["alice"]
    timeline = errorsview.over_time(tb, sel)
    assert sum(sum(v) for v in timeline["series"].values()) == 6       # one per code set
    assert 1 <= len(timeline["buckets"]) <= 61


def test_unfiltered_dashboard_counts_from_the_counters_as_from_the_tables(seeded):
    """The overview as it opens reads its active jobs from the job counters: the same
    numbers as counting the tables."""
    tb, _ = seeded
    sel = sel_of(tb)[0]
    assert not sel.terms
    assert dash.site_state_counts(tb, sel) == dash.grouped_site_state_counts(tb, sel)


def test_dashboard_counts_sites_states_and_pilots(seeded):
    tb, _ = seeded
    data = dash.dashboard(tb, sel_of(tb)[0])
    rows = {r["site"]: r for r in data["sites"]}
    assert set(rows) == {"SITE_A", "SITE_B", "SITE_C", "(no site)"}
    assert rows["SITE_A"]["states"]["failed"] == 7 and rows["SITE_A"]["states"]["running"] == 2
    assert rows["SITE_A"]["pilots"] == {"running": 2, "queued": 1, "done": 1}
    assert rows["SITE_B"]["site_status"] == "offline" and rows["SITE_B"]["region"] == "US"
    assert data["totals"]["assigned"] == 4
    assert dash.dashboard(tb, sel_of(tb)[0], region="US")["sites"][0]["site"] == "SITE_B"


def test_analyzer_says_why_jobs_wait(seeded):
    tb, _ = seeded
    groups = {(g["status"], g["site"]): g for g in analyzer.analyze(tb)}
    offline = " ".join(groups[("activated", "SITE_B")]["reasons"])
    assert "SITE_B is offline" in offline and "5 pilots failed in a row" in offline
    assert "no pilot reported" in offline
    nosite = groups[("assigned", None)]["reasons"][0]
    assert nosite.startswith("no online site fits") and "64000 MB" in nosite
    assert groups[("defined", None)]["reasons"][0].startswith("created but never brokered")
    placed = " ".join(groups[("assigned", "SITE_A")]["reasons"])
    assert "inputs not placed" in placed


def test_duration_alarms_raise_then_clear(seeded, clock):
    tb, _ = seeded
    limits = operations.DurationLimits.parse(["activated=12", "assigned=0", "defined=0"])
    alarms = Alarms(tb)
    raised, cleared = operations.check_durations(tb, limits, alarms)
    open_ = {a["key"]: a for a in alarms.listing()}
    offline = open_["duration:activated:SITE_B"]
    assert offline["severity"] == "critical" and "SITE_B is offline" in offline["message"]
    assert "duration:running:SITE_A" not in open_
    operations.check_durations(tb, limits, alarms)
    assert alarms.get(offline["alarm_id"])["count"] == 2          # counted up, not added
    with tb.engine.begin() as conn:
        conn.execute(db.jobs.update().where(db.jobs.c.site == "SITE_B").values(
            status="cancelled"))
    operations.check_durations(tb, limits, alarms)
    assert alarms.get(offline["alarm_id"])["state"] == "cleared"
    with pytest.raises(ValueError, match="STATE=HOURS"):
        operations.DurationLimits.parse(["running"])


def test_alarm_lifecycle(seeded):
    tb, s = seeded
    alarms = Alarms(tb)
    a = alarms.raise_alarm("x:1", "first", site="SITE_A")
    b = alarms.raise_alarm("x:1", "again", severity="critical")
    assert a["alarm_id"] == b["alarm_id"] and b["count"] == 2 and b["title"] == "again"
    assert alarms.counts() == {"active": 2, "acknowledged": 0, "critical": 2}
    acked = alarms.acknowledge(a["alarm_id"], "shifter")
    assert acked["state"] == "acknowledged" and acked["acknowledged_by"] == "shifter"
    claimed = alarms.claim_unnotified()
    assert [c["alarm_id"] for c in claimed] == [s.alarm_id]        # acknowledged: not sent
    assert alarms.claim_unnotified() == []
    assert alarms.clear(alarm_id=a["alarm_id"]) == 1
    with pytest.raises(Conflict):
        alarms.acknowledge(a["alarm_id"], "shifter")
    fresh = alarms.raise_alarm("x:1", "back")
    assert fresh["alarm_id"] != a["alarm_id"] and fresh["count"] == 1


def test_history_snapshots_once_per_interval(seeded, clock):
    tb, _ = seeded
    clock.advance(minutes=30)
    assert history.take_snapshot(tb, 900) > 0
    assert history.take_snapshot(tb, 900) == 0                     # same interval: taken
    with db.read(tb.engine) as conn:
        n = conn.execute(select(func.count()).select_from(db.ops_snapshots)).scalar()
    assert n > 0
    now = tb.clock()
    running = history.series(tb, now - dt.timedelta(days=2), now, "running")
    assert running["series"]["SITE_A"] and max(running["series"]["SITE_A"]) == 2
    assert len(running["times"]) == len(running["series"]["SITE_A"]) >= 2
    rows = history.table(tb, now - dt.timedelta(days=2), now)
    assert {"time", "status", "jobs"} <= set(rows[0])


def test_incident_handler_records_and_rate_limits(taskbuffer):
    tb = taskbuffer
    handler = incidents.install(tb.engine, loggers=("server.watcher",), burst=3, per_s=3600)
    log = logging.getLogger("server.watcher")
    try:
        for i in range(10):
            log.warning("job %s: lost heartbeat", i, extra={"panda_id": i, "site": "SITE_A"})
        log.error("something else")
        log.info("not an incident")
        handler.flush()
    finally:
        incidents.uninstall(handler, loggers=("server.watcher",))
    window = incidents.Window(None, None, "all")
    rows = incidents.listing(tb, window)
    assert len(rows) == 4
    beats = [r for r in rows if "heartbeat" in r["message"]]
    assert [r["panda_id"] for r in reversed(beats)] == [0, 1, 2]
    assert beats[0]["site"] == "SITE_A" and beats[0]["component"] == "server.watcher"
    assert [r["level"] for r in incidents.listing(tb, window, level="ERROR")] == ["ERROR"]
